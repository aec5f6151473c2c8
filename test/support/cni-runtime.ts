import { spawn, type ChildProcess } from 'node:child_process';
import { readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pluginBuildPath } from '../../src/cni/install.js';
import type { PluginConf } from '../../src/cni/protocol.js';
import type { TopoPod } from '../../src/lab/topology.js';
import { createCgroup } from '../../src/util/cgroup.js';

/**
 * What a container runtime does around a chained CNI plugin, for tests: a
 * sandbox ("pause") process in the pod's netns and in a cgroup named after
 * the sandbox id below the pod cgroup (as containerd/cgroupfs lay it out),
 * then the plugin run with the CNI environment and its conf with prevResult
 * on stdin, then the pod's first process in a container cgroup.
 */

export const CNI_NAMESPACE = 'fsmt';

export interface PluginRun {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Start a process in the pod's netns, inside `cgroup`; it joins the cgroup before exec, so its first instruction runs there. */
export function spawnInPod(pod: TopoPod, cgroup: string, cmd: string, args: string[]): ChildProcess {
  const script = 'echo $$ > "$1/cgroup.procs" || exit 126; ns="$2"; shift 2; exec nsenter --net="$ns" -- "$@"';
  return spawn('/bin/sh', ['-c', script, 'fsm-pod', cgroup, join('/run/netns', pod.netns), cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
}

/** The sandbox process, returned once it runs in the pod's netns (a runtime calls CNI only after that). */
export async function startSandbox(pod: TopoPod, containerId: string): Promise<ChildProcess> {
  const cg = join(pod.cgroupPath, containerId);
  await createCgroup(cg);
  const child = spawnInPod(pod, cg, 'sleep', ['3600']);
  const want = `net:[${statSync(join('/run/netns', pod.netns)).ino}]`;
  for (let i = 0; i < 500; i++) {
    try {
      if (readlinkSync(`/proc/${child.pid}/ns/net`) === want) return child;
    } catch {
      // not started yet
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  child.kill('SIGKILL');
  throw new Error(`sandbox process of ${pod.name} never entered ${pod.netns}`);
}

export function prevResult(pod: TopoPod): object {
  return {
    cniVersion: '1.0.0',
    interfaces: [{ name: 'eth0', sandbox: join('/run/netns', pod.netns) }],
    ips: [{ address: `${pod.ip}/32`, gateway: pod.node.gateway, interface: 0 }],
  };
}

/** The stdin a runtime gives the chained plugin: its conflist entry, the network's name and version, the previous result. */
export function pluginStdin(conf: PluginConf, prev: object | undefined): string {
  return JSON.stringify({ cniVersion: '1.0.0', name: 'fsmt-net', ...conf, ...(prev ? { prevResult: prev } : {}) });
}

export function runPlugin(command: string, pod: TopoPod, containerId: string, stdin: string, opts: { namespace?: string; uid?: string; binary?: string } = {}): Promise<PluginRun> {
  const started = performance.now();
  const env = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    CNI_COMMAND: command,
    CNI_CONTAINERID: containerId,
    CNI_NETNS: join('/run/netns', pod.netns),
    CNI_IFNAME: 'eth0',
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${opts.namespace ?? CNI_NAMESPACE};K8S_POD_NAME=${pod.name};K8S_POD_INFRA_CONTAINER_ID=${containerId};K8S_POD_UID=${opts.uid ?? `uid-${pod.name}`}`,
    CNI_PATH: '/opt/cni/bin',
  };
  return new Promise((resolve, reject) => {
    const child = spawn(opts.binary ?? pluginBuildPath(), [], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr, ms: performance.now() - started }));
    child.stdin.end(stdin);
  });
}

/**
 * The pod's first process: bash connecting at once (its first command, about a
 * millisecond after exec) with /dev/tcp, one HTTP request to the lab echo
 * server, the answer on stdout. Returns the echo server's JSON answer.
 */
export async function firstConnection(pod: TopoPod, host: string, port: number): Promise<{ peer?: string; pod?: string; raw: string; code: number | null }> {
  const cg = join(pod.cgroupPath, 'main');
  await createCgroup(cg);
  const script = `exec 3<>/dev/tcp/${host}/${port} || exit 7; printf 'GET /first HTTP/1.0\\r\\n\\r\\n' >&3; timeout 5 cat <&3`;
  const child = spawnInPod(pod, cg, 'bash', ['-c', script]);
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
