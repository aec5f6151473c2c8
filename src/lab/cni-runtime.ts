import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { readlinkSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pluginBuildPath } from '../cni/install.js';
import type { PluginConf } from '../cni/protocol.js';
import { createCgroup } from '../util/cgroup.js';

/**
 * What a container runtime does around a chained CNI plugin, for the lab, the
 * tests and the bench: a sandbox ("pause") process in the pod's netns and in a
 * cgroup named after the sandbox id below the pod cgroup (as containerd with
 * cgroupfs lays it out), then the plugin run with the CNI environment and its
 * conflist entry with prevResult on stdin, then the pod's processes in
 * container cgroups beside the sandbox's.
 */

const NETNS_DIR = '/run/netns';

export interface RuntimePod {
  /** Kubernetes namespace and name (CNI_ARGS). */
  namespace: string;
  name: string;
  uid: string;
  /** The pod's network namespace name (under /run/netns). */
  netns: string;
  cgroupPath: string;
  ip: string;
  gateway: string;
}

export interface PluginRun {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Start a process in the netns, inside `cgroup`; it joins the cgroup before exec, so its first instruction runs there. */
export function spawnInPod(netns: string, cgroup: string, cmd: string, args: string[], opts: SpawnOptions = { stdio: ['ignore', 'pipe', 'pipe'] }): ChildProcess {
  const script = 'echo $$ > "$1/cgroup.procs" || exit 126; ns="$2"; shift 2; exec nsenter --net="$ns" -- "$@"';
  return spawn('/bin/sh', ['-c', script, 'fsm-pod', cgroup, join(NETNS_DIR, netns), cmd, ...args], opts);
}

/** The sandbox process, returned once it runs in the pod's netns (a runtime calls CNI only after that). */
export async function startSandbox(pod: Pick<RuntimePod, 'netns' | 'cgroupPath' | 'name'>, containerId: string, detached = false): Promise<ChildProcess> {
  const cg = join(pod.cgroupPath, containerId);
  await createCgroup(cg);
  // Detached (the lab): the sandbox outlives the `lab pod add` command, as a runtime's pause process does.
  const child = spawnInPod(pod.netns, cg, 'sleep', ['infinity'], detached ? { stdio: 'ignore', detached: true } : { stdio: 'ignore' });
  if (detached) child.unref();
  const want = `net:[${statSync(join(NETNS_DIR, pod.netns)).ino}]`;
  for (let i = 0; i < 1000; i++) {
    try {
      if (readlinkSync(`/proc/${child.pid}/ns/net`) === want) return child;
    } catch {
      // not started yet
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  child.kill('SIGKILL');
  throw new Error(`the sandbox process of pod ${pod.name} never entered its network namespace ${pod.netns}`);
}

/** The primary CNI's result for a lab pod (routed /32, as the lab's topology wires it). */
export function prevResult(pod: Pick<RuntimePod, 'netns' | 'ip' | 'gateway'>): object {
  return {
    cniVersion: '1.0.0',
    interfaces: [{ name: 'eth0', sandbox: join(NETNS_DIR, pod.netns) }],
    ips: [{ address: `${pod.ip}/32`, gateway: pod.gateway, interface: 0 }],
  };
}

/** The stdin a runtime gives a chained plugin: its conflist entry, the network's name and version, the previous result. */
export function pluginStdin(conf: PluginConf, prev: object | undefined, network = { name: 'fsmlab', cniVersion: '1.0.0' }): string {
  return JSON.stringify({ cniVersion: network.cniVersion, name: network.name, ...conf, ...(prev ? { prevResult: prev } : {}) });
}

export function runPlugin(command: string, pod: Pick<RuntimePod, 'namespace' | 'name' | 'uid' | 'netns'>, containerId: string, stdin: string, binary = pluginBuildPath()): Promise<PluginRun> {
  const started = performance.now();
  const env = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    CNI_COMMAND: command,
    CNI_CONTAINERID: containerId,
    CNI_NETNS: join(NETNS_DIR, pod.netns),
    CNI_IFNAME: 'eth0',
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${pod.namespace};K8S_POD_NAME=${pod.name};K8S_POD_INFRA_CONTAINER_ID=${containerId};K8S_POD_UID=${pod.uid}`,
    CNI_PATH: '/opt/cni/bin',
  };
  return new Promise((resolve, reject) => {
    const child = spawn(binary, [], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr, ms: performance.now() - started }));
    child.stdin.on('error', () => undefined);
    child.stdin.end(stdin);
  });
}
