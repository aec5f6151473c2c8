import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { PLUGIN_BINARY } from '../cni/install.js';
import { PLUGIN_TYPE, type PluginConf } from '../cni/protocol.js';
import { InvalidInputError } from '../errors.js';
import { manifestUid } from '../policy/objects.js';
import { ANNOTATION_LAB_CGROUP, ANNOTATION_SIDECAR_INJECTION } from '../policy/fsm.js';
import { createCgroup, killCgroupTree, removeCgroupTree } from '../util/cgroup.js';
import { run } from '../util/exec.js';
import { pluginStdin, prevResult, runPlugin, spawnInPod, startSandbox, type RuntimePod } from './cni-runtime.js';
import { LAB_NAMESPACE } from './manifests.js';
import { pidAlive } from './processes.js';
import { LAB_PREFIX, LabError, labFiles, writeLabState, type LabNode, type LabPod, type LabState } from './state.js';
import { podNetnsName, renderNodePodLegIpBatch, renderPodIpBatch, validatePodName } from './topology.js';

/**
 * `lab pod add` / `lab pod rm`: pods created live the way a node creates
 * them. The lab plays the container runtime and the primary CNI (netns,
 * veth, routed /32 address: the topology's wiring), then runs the node's CNI
 * chain as a runtime does: it reads the node's conflist (where the agent's
 * installer chained fsm-node-cni, src/cni/install.ts) and execs the installed
 * plugin with the CNI environment and its entry plus prevResult on stdin. The
 * pod object goes into the manifests first (the API server knows a pod before
 * its sandbox), its address after ADD (kubelet reports it then).
 */

/** Per-node CNI directories the lab's agents install into (the node's /etc/cni/net.d and /opt/cni/bin). */
export const labCniDirs = (state: Pick<LabState, 'dir'>, node: string): { confDir: string; binDir: string } => ({
  confDir: join(labFiles(state.dir).nodes, node, 'cni', 'net.d'),
  binDir: join(labFiles(state.dir).nodes, node, 'cni', 'bin'),
});

/** The lab's primary CNI: a conflist naming the routed wiring `lab up` does, so the agent has a chain to join. */
export function writePrimaryConflist(confDir: string): void {
  mkdirSync(confDir, { recursive: true });
  writeFileSync(join(confDir, '10-fsmlab.conflist'), `${JSON.stringify({ cniVersion: '1.0.0', name: 'fsmlab', plugins: [{ type: 'fsmlab-routed' }] }, null, 2)}\n`);
}

export interface PodAddOptions {
  name: string;
  node: string;
  namespace: string;
  mesh: boolean;
  cmd: string[];
}

/** The free address slot of a node (1 is the gateway): the lowest host octet no pod of the node uses. */
export function freeSlot(node: LabNode, pods: readonly LabPod[]): number {
  const used = new Set(pods.filter((p) => p.node === node.name).map((p) => Number(p.ip.split('.')[3]) - 1));
  for (let s = 1; s <= 253; s++) if (!used.has(s)) return s;
  throw new LabError(`node ${node.name} is full (253 pods)`);
}

function podManifest(o: PodAddOptions, cgroupPath: string, ip: string | undefined): string {
  const annotations: Record<string, string> = { [ANNOTATION_LAB_CGROUP]: cgroupPath };
  if (!o.mesh) annotations[ANNOTATION_SIDECAR_INJECTION] = 'disabled';
  const ns = o.namespace === LAB_NAMESPACE ? [] : [{ apiVersion: 'v1', kind: 'Namespace', metadata: { name: o.namespace } }];
  const pod = {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name: o.name, namespace: o.namespace, uid: manifestUid(o.namespace, o.name), labels: { app: o.name }, annotations },
    spec: { nodeName: o.node, serviceAccountName: 'default', containers: [{ name: 'main' }] },
    status: ip ? { phase: 'Running', podIP: ip } : { phase: 'Pending' },
  };
  return [...ns, pod].map((d) => `---\n${stringify(d)}`).join('');
}

/** Our entry in the node's chain, as the agent's installer wrote it; a clear error when it is not there yet. */
export function chainedConf(confDir: string): { conf: PluginConf; network: { name: string; cniVersion: string } } {
  const files = existsSync(confDir) ? readdirSync(confDir).filter((n) => n.endsWith('.conflist')).sort() : [];
  if (files.length === 0) throw new LabError(`no CNI conflist in ${confDir}: is this lab's agent running?`);
  const list = JSON.parse(readFileSync(join(confDir, files[0]!), 'utf8')) as { name: string; cniVersion: string; plugins: PluginConf[] };
  const conf = list.plugins.find((p) => p.type === PLUGIN_TYPE);
  if (!conf) throw new LabError(`the agent has not chained ${PLUGIN_TYPE} into ${join(confDir, files[0]!)} (yet): check \`fsm-node lab status\``);
  return { conf, network: { name: list.name, cniVersion: list.cniVersion } };
}

export async function podAdd(state: LabState, o: PodAddOptions, say: (l: string) => void): Promise<LabPod> {
  validatePodName(o.name);
  if (!/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(o.namespace)) throw new InvalidInputError('--namespace', o.namespace, 'a Kubernetes namespace name (lowercase letters, digits, "-")');
  const node = state.nodes.find((n) => n.name === o.node);
  if (!node) throw new InvalidInputError('--node', o.node, `no such lab node (nodes: ${state.nodes.map((n) => n.name).join(', ')})`);
  if (state.pods.some((p) => p.name === o.name)) throw new InvalidInputError('pod name', o.name, 'already used in the lab');
  const { confDir, binDir } = labCniDirs(state, node.name);
  const { conf, network } = chainedConf(confDir);
  const slot = freeSlot(node, state.pods);
  const ip = `${node.podCidr.split('.').slice(0, 3).join('.')}.${slot + 1}`;
  const netns = podNetnsName(LAB_PREFIX, node.index, o.name);
  const cgroupPath = join(node.podsCgroup, o.name);
  const veth = `vp${slot}`;
  const manifest = join(labFiles(state.dir).manifests, 'pods', `${o.name}.yaml`);
  const pod: RuntimePod = { namespace: o.namespace, name: o.name, uid: manifestUid(o.namespace, o.name), netns, cgroupPath, ip, gateway: node.gateway };
  const containerId = randomBytes(32).toString('hex');
  const undo = async () => {
    await killCgroupTree(cgroupPath).catch(() => undefined);
    await run('ip', ['-n', node.netns, 'link', 'del', veth], { allowFail: true });
    await run('ip', ['netns', 'del', netns], { allowFail: true });
    await removeCgroupTree(cgroupPath).catch(() => undefined);
    rmSync(manifest, { force: true });
  };
  try {
    // The API server knows the pod first (its opt-out annotation included).
    const before = await policyVersion(node);
    writeFileSync(manifest, podManifest(o, cgroupPath, undefined));
    // An opted-out pod must be known to the node's agent before ADD, or ADD would enrol it.
    if (!o.mesh) await waitPolicyChange(node, before);
    // The primary CNI's part: netns, veth, routed /32.
    await run('ip', ['netns', 'add', netns]);
    await run('ip', ['-n', node.netns, 'link', 'add', veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns]);
    await run('ip', ['-n', netns, '-batch', '-'], { input: `${renderPodIpBatch(ip, node.gateway).join('\n')}\n` });
    await run('ip', ['-n', node.netns, '-batch', '-'], { input: `${renderNodePodLegIpBatch(veth, ip, node.gateway).join('\n')}\n` });
    await createCgroup(cgroupPath);
    await startSandbox(pod, containerId, true);
    const add = await runPlugin('ADD', pod, containerId, pluginStdin(conf, prevResult(pod), network), join(binDir, PLUGIN_BINARY));
    if (add.code !== 0) throw new LabError(`CNI ADD of pod ${o.name} failed (exit ${add.code}): ${(add.stdout + add.stderr).trim()}`);
    say(`pod ${o.namespace}/${o.name} on ${node.name}: ${ip}, CNI ADD ${add.ms.toFixed(1)} ms through ${PLUGIN_TYPE}`);
  } catch (err) {
    await undo();
    throw err;
  }
  writeFileSync(manifest, podManifest(o, cgroupPath, ip));
  const labPod: LabPod = { name: o.name, node: node.name, ip, netns, cgroupPath, version: 'v1', namespace: o.namespace, containerId };
  if (o.cmd.length > 0) {
    // The pod's first process, in a container cgroup beside the sandbox's.
    const main = join(cgroupPath, 'main');
    await createCgroup(main);
    const log = join(labFiles(state.dir).logs, `pod-${o.name}.log`);
    const fd = openSync(log, 'a');
    const child = spawnInPod(netns, main, o.cmd[0]!, o.cmd.slice(1), { stdio: ['ignore', fd, fd], detached: true });
    child.unref();
    labPod.server = { pid: child.pid!, cgroup: main, log };
    say(`first process: ${o.cmd.join(' ')} (pid ${child.pid}, output in ${log})`);
  }
  state.pods.push(labPod);
  writeLabState(state);
  return labPod;
}

export async function podRm(state: LabState, name: string, say: (l: string) => void): Promise<void> {
  const pod = state.pods.find((p) => p.name === name);
  if (!pod) throw new InvalidInputError('pod', name, `no such lab pod (pods: ${state.pods.map((p) => p.name).join(', ')})`);
  const node = state.nodes.find((n) => n.name === pod.node)!;
  if (pod.containerId) {
    const { confDir, binDir } = labCniDirs(state, node.name);
    const rp: RuntimePod = { namespace: pod.namespace ?? LAB_NAMESPACE, name: pod.name, uid: manifestUid(pod.namespace ?? LAB_NAMESPACE, pod.name), netns: pod.netns, cgroupPath: pod.cgroupPath, ip: pod.ip, gateway: node.gateway };
    let entry: ReturnType<typeof chainedConf> | undefined;
    try {
      entry = chainedConf(confDir);
    } catch {
      entry = undefined; // chain gone (uninstalled): the runtime would not call us either
    }
    if (entry) {
      const del = await runPlugin('DEL', rp, pod.containerId, pluginStdin(entry.conf, undefined, entry.network), join(binDir, PLUGIN_BINARY));
      say(`CNI DEL: exit ${del.code}${del.stdout.trim() ? ` ${del.stdout.trim()}` : ''}`);
    }
  }
  await killCgroupTree(pod.cgroupPath).catch(() => undefined);
  if (pod.server && pidAlive(pod.server.pid)) say(`note: pid ${pod.server.pid} still alive`);
  const slot = Number(pod.ip.split('.')[3]) - 1;
  await run('ip', ['-n', node.netns, 'link', 'del', `vp${slot}`], { allowFail: true });
  await run('ip', ['netns', 'del', pod.netns], { allowFail: true });
  await removeCgroupTree(pod.cgroupPath);
  rmSync(join(labFiles(state.dir).manifests, 'pods', `${pod.name}.yaml`), { force: true });
  state.pods = state.pods.filter((p) => p !== pod);
  writeLabState(state);
  say(`pod ${pod.name} removed`);
}

async function policyVersion(node: LabNode): Promise<string | undefined> {
  try {
    const res = await fetch(`${node.agentUrl}/v1/state`, { signal: AbortSignal.timeout(2000) });
    return ((await res.json()) as { policy?: { version?: string } }).policy?.version;
  } catch {
    return undefined;
  }
}

async function waitPolicyChange(node: LabNode, before: string | undefined): Promise<void> {
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; ) {
    const v = await policyVersion(node);
    if (v !== undefined && v !== before) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new LabError(`the agent of node ${node.name} did not receive the policy naming the new pod within 10 s`);
}
