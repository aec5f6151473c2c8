import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import type { PluginConf } from '../../src/cni/protocol.js';
import * as rt from '../../src/lab/cni-runtime.js';
import type { TopoPod } from '../../src/lab/topology.js';
import { createCgroup } from '../../src/util/cgroup.js';

/** The container runtime's part (src/lab/cni-runtime.ts) for topology pods of the kernel tests. */

export const CNI_NAMESPACE = 'fsmt';

const runtimePod = (pod: TopoPod, namespace = CNI_NAMESPACE, uid = `uid-${pod.name}`): rt.RuntimePod => ({
  namespace,
  name: pod.name,
  uid,
  netns: pod.netns,
  cgroupPath: pod.cgroupPath,
  ip: pod.ip,
  gateway: pod.node.gateway,
});

export const startSandbox = (pod: TopoPod, containerId: string): Promise<ChildProcess> => rt.startSandbox(pod, containerId);
export const prevResult = (pod: TopoPod): object => rt.prevResult(runtimePod(pod));
export const pluginStdin = (conf: PluginConf, prev: object | undefined): string => rt.pluginStdin(conf, prev, { name: 'fsmt-net', cniVersion: '1.0.0' });
export const runPlugin = (command: string, pod: TopoPod, containerId: string, stdin: string, opts: { namespace?: string; uid?: string } = {}): Promise<rt.PluginRun> =>
  rt.runPlugin(command, runtimePod(pod, opts.namespace, opts.uid), containerId, stdin);

/**
 * The pod's first process: bash connecting at once (its first command, about a
 * millisecond after exec) with /dev/tcp, one HTTP request to the lab echo
 * server, the answer on stdout. Returns the echo server's JSON answer.
 */
export async function firstConnection(pod: TopoPod, host: string, port: number): Promise<{ peer?: string; pod?: string; raw: string; code: number | null }> {
  const cg = join(pod.cgroupPath, 'main');
  await createCgroup(cg);
  const script = `exec 3<>/dev/tcp/${host}/${port} || exit 7; printf 'GET /first HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3`;
  const child = rt.spawnInPod(pod.netns, cg, 'bash', ['-c', script]);
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  const body = out.split('\r\n\r\n')[1]?.trim();
  try {
    return { ...(JSON.parse(body ?? '') as { peer: string; pod: string }), raw: out, code };
  } catch {
    return { raw: out, code };
  }
}
