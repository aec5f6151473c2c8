import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { FsmNodeError, InvalidInputError } from '../errors.js';
import { cgroup2Root, cgroupId, createCgroup, killCgroupTree, removeCgroupTree } from '../util/cgroup.js';
import { run as runCommand } from '../util/exec.js';
import { logger } from '../util/log.js';
import { BPFFS_ROOT, assertBpffs, createBpffsDir, removeBpffsDir } from './bpffs.js';

/**
 * A routed multi-node pod topology on one machine, for kernel tests and the lab.
 *
 * A node is a network namespace; a pod is a network namespace plus its own
 * cgroup v2 directory. There is no bridge between pods (like Calico): every
 * pod's eth0 is a veth whose other end sits in the node namespace, the pod's
 * default route points at the node, so all pod traffic (also pod -> pod on the
 * same node) is routed by the node and passes its netfilter PREROUTING hook.
 * That is what the iptables dataplane needs, without br_netfilter on the host.
 *
 *   pod 10.A.i.(s+1)/32 eth0 <-veth-> vp<s> 10.A.i.1/32 [node i] ul0 10.B.0.i/24
 *                                                          |
 *                  [underlay netns: bridge br0 10.B.0.254] -- other nodes
 *
 * Node i routes 10.A.j.0/24 via 10.B.0.j for every other node j, so pods on
 * different nodes reach each other through node -> underlay -> node.
 *
 * Names: netns `<prefix>-n<i>`, `<prefix>-n<i>-<pod>`, `<prefix>-ul`; cgroups
 * `<cg2root>/<prefix>-n<i>/{pods/<pod>,proxy,system}` and `<cg2root>/<prefix>-ul`; bpffs
 * `/sys/fs/bpf/<prefix>-n<i>`. Interface names live inside the namespaces, so
 * nothing is created in the host namespace and host names never collide.
 */

const log = logger('lab.topology');

export interface TopologyOptions {
  prefix: string;
  nodes: number;
  /** Pods created on every node at start (default 0). */
  podsPerNode?: number;
  /** A in the pod subnets 10.A.<node>.0/24; the underlay uses 10.(A+1).0.0/24. Default 77. */
  subnetBase?: number;
}

/** spawn options pass through; inProxyCgroup only matters for node processes. */
export type ExecOptions = { inProxyCgroup?: boolean } & SpawnOptions;
export type RunOptions = ExecOptions & { input?: string };
export interface ExecResult {
  stdout: string;
  stderr: string;
  code: number | null;
}

export interface TopoNode {
  /** 1-based */
  index: number;
  /** `n<index>`: short, stable, used as the node name in lab manifests. */
  name: string;
  netns: string;
  /** 10.A.i.1: the pods' default gateway, carried by every pod veth in the node. */
  gateway: string;
  /** 10.B.0.i on ul0, how other nodes reach this one. */
  underlayIp: string;
  podCidr: string;
  /** The pods' parent cgroup (absolute path): where the eBPF dataplane attaches. */
  podsCgroup: string;
  /** The node proxy's cgroup (absolute path). */
  proxyCgroup: string;
  /** Other processes started in the node (node.exec without inProxyCgroup) land here, so a sweep finds them. */
  systemCgroup: string;
  /** Pin directory for this node's dataplane. */
  bpffsDir: string;
  pods: TopoPod[];
  exec(cmd: string, args: string[], opts?: ExecOptions): ChildProcess;
  run(cmd: string, args: string[], opts?: RunOptions): Promise<ExecResult>;
}

/**
 * The underlay namespace as a place to run shared services (the lab's
 * controller): its bridge carries 10.B.0.254, reachable from every node and
 * pod, and it routes back to every pod subnet.
 */
export interface TopoUnderlay {
  netns: string;
  ip: string;
  cgroup: string;
  exec(cmd: string, args: string[], opts?: ExecOptions): ChildProcess;
  run(cmd: string, args: string[], opts?: RunOptions): Promise<ExecResult>;
}

export interface TopoPod {
  name: string;
  node: TopoNode;
  netns: string;
  ip: string;
  cgroupPath: string;
  cgroupId: bigint;
  exec(cmd: string, args: string[], opts?: ExecOptions): ChildProcess;
  run(cmd: string, args: string[], opts?: RunOptions): Promise<ExecResult>;
}

export class TopologyError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super('FSMN_ERR_TOPOLOGY', message, options);
  }
}

const NETNS_DIR = '/run/netns';
const DEFAULT_SUBNET_BASE = 77;
/** Host octets 2..254 of a node's /24 (1 is the gateway). */
const MAX_POD_SLOT = 253;
const MAX_NODES = 250;

// ---- names and addresses (pure) -------------------------------------------

export function nodeNetnsName(prefix: string, index: number): string {
  return `${prefix}-n${index}`;
}
export function podNetnsName(prefix: string, nodeIndex: number, pod: string): string {
  return `${prefix}-n${nodeIndex}-${pod}`;
}
export function underlayNetnsName(prefix: string): string {
  return `${prefix}-ul`;
}
export function nodeGateway(subnetBase: number, index: number): string {
  return `10.${subnetBase}.${index}.1`;
}
export function podAddress(subnetBase: number, nodeIndex: number, slot: number): string {
  return `10.${subnetBase}.${nodeIndex}.${slot + 1}`;
}
export function podCidr(subnetBase: number, index: number): string {
  return `10.${subnetBase}.${index}.0/24`;
}
export function underlayAddress(subnetBase: number, index: number): string {
  return `10.${subnetBase + 1}.0.${index}`;
}
export function underlayServicesAddress(subnetBase: number): string {
  return underlayAddress(subnetBase, 254);
}

/**
 * Does a top-level name (netns, cgroup dir, bpffs dir) belong to the topology
 * with exactly this prefix? Matches only the grammar above, so `fsmlab` does
 * not claim `fsmlab-selfcheck-n1` and `fsmt12` does not claim `fsmt123-n1`.
 */
export function ownedByTopology(name: string, prefix: string): boolean {
  if (!name.startsWith(`${prefix}-`)) return false;
  return /^(ul|n\d+(-[a-z0-9-]+)?)$/.test(name.slice(prefix.length + 1));
}

/**
 * Does a name fall under a sweep prefix? Broader than ownedByTopology: sweeping
 * `fsmt123` also removes sub-prefixes such as `fsmt123x4-n1`, but never
 * `fsmt1234-...` (a different run): the character after the prefix must not be
 * a digit.
 */
export function matchesSweepPrefix(name: string, prefix: string): boolean {
  if (!name.startsWith(prefix) || name.length === prefix.length) return false;
  return !/[0-9]/.test(name.charAt(prefix.length));
}

export function validateTopologyOptions(opts: TopologyOptions): Required<TopologyOptions> {
  const { prefix, nodes } = opts;
  const podsPerNode = opts.podsPerNode ?? 0;
  const subnetBase = opts.subnetBase ?? DEFAULT_SUBNET_BASE;
  if (typeof prefix !== 'string' || !/^[a-z][a-z0-9-]{0,39}$/.test(prefix) || prefix.endsWith('-')) {
    throw new InvalidInputError('prefix', prefix, 'must be 1-40 characters of a-z, 0-9 and "-", start with a letter and not end with "-"');
  }
  if (!Number.isInteger(nodes) || nodes < 1 || nodes > MAX_NODES) {
    throw new InvalidInputError('nodes', nodes, `must be an integer from 1 to ${MAX_NODES}`);
  }
  if (!Number.isInteger(podsPerNode) || podsPerNode < 0 || podsPerNode > MAX_POD_SLOT) {
    throw new InvalidInputError('podsPerNode', podsPerNode, `must be an integer from 0 to ${MAX_POD_SLOT}`);
  }
  if (!Number.isInteger(subnetBase) || subnetBase < 1 || subnetBase > 253) {
    throw new InvalidInputError('subnetBase', subnetBase, 'must be an integer from 1 to 253 (pods use 10.A.0.0/16, the underlay 10.(A+1).0.0/24)');
  }
  return { prefix, nodes, podsPerNode, subnetBase };
}

export function validatePodName(name: string): void {
  if (typeof name !== 'string' || !/^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$/.test(name)) {
    throw new InvalidInputError('pod name', name, 'must be 1-40 characters of a-z, 0-9 and "-", starting and ending with a letter or digit');
  }
}

/** Lines for `ip -batch`: a node's underlay leg and its routes to the other nodes' pods. */
export function renderNodeIpBatch(subnetBase: number, index: number, nodes: number): string[] {
  const lines = ['link set lo up', 'link set ul0 up', `addr add ${underlayAddress(subnetBase, index)}/24 dev ul0`];
  for (let j = 1; j <= nodes; j++) {
    if (j !== index) lines.push(`route add ${podCidr(subnetBase, j)} via ${underlayAddress(subnetBase, j)} dev ul0`);
  }
  return lines;
}

/** The underlay bridge's services address and its routes back to every pod subnet. */
export function renderUnderlayIpBatch(subnetBase: number, nodes: number): string[] {
  const lines = [`addr add ${underlayServicesAddress(subnetBase)}/24 dev br0`];
  for (let j = 1; j <= nodes; j++) lines.push(`route add ${podCidr(subnetBase, j)} via ${underlayAddress(subnetBase, j)} dev br0`);
  return lines;
}

export function renderPodIpBatch(ip: string, gateway: string): string[] {
  return [
    'link set lo up',
    'link set eth0 up',
    `addr add ${ip}/32 dev eth0`,
    `route add ${gateway} dev eth0 scope link`,
    `route add default via ${gateway} dev eth0`,
  ];
}

export function renderNodePodLegIpBatch(veth: string, ip: string, gateway: string): string[] {
  return [`link set ${veth} up`, `addr add ${gateway}/32 dev ${veth}`, `route add ${ip}/32 dev ${veth} src ${gateway}`];
}

// ---- processes ---------------------------------------------------------------

/**
 * Start a process inside a netns and a cgroup without a race: the shell joins
 * the cgroup first, then execs nsenter, which execs the command, so the
 * command's first instruction already runs in both (and the ChildProcess pid
 * is the command's pid).
 */
function spawnInside(netns: string, cgroup: string, cmd: string, args: string[], opts: ExecOptions = {}): ChildProcess {
  const { inProxyCgroup: _ignored, shell: _shell, ...spawnOpts } = opts;
  const script = 'echo $$ > "$1/cgroup.procs" || exit 126; ns="$2"; shift 2; exec nsenter --net="$ns" -- "$@"';
  return spawn('/bin/sh', ['-c', script, 'fsm-exec', cgroup, join(NETNS_DIR, netns), cmd, ...args], spawnOpts);
}

function collect(child: ChildProcess, input: string | undefined): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ stdout, stderr, code }));
    // EPIPE when the command exits without reading stdin: its exit code tells.
    child.stdin?.on('error', () => {});
    child.stdin?.end(input ?? '');
  });
}

async function ipBatch(netns: string, lines: string[]): Promise<void> {
  await runCommand('ip', ['-n', netns, '-batch', '-'], { input: `${lines.join('\n')}\n` });
}

async function listDir(path: string): Promise<string[]> {
  try {
    return await readdir(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

async function deleteNetns(name: string): Promise<void> {
  if (!existsSync(join(NETNS_DIR, name))) return;
  const res = await runCommand('ip', ['netns', 'del', name], { allowFail: true });
  if (res.code !== 0 && existsSync(join(NETNS_DIR, name))) {
    throw new TopologyError(`cannot delete network namespace ${name}: ${res.stderr.trim()}`, { details: { netns: name } });
  }
}

/**
 * Remove every netns, cgroup tree and bpffs directory whose top-level name
 * `match` accepts: first kill what runs in those cgroups (ours by
 * construction), then delete namespaces, then rmdir cgroups depth-first, then
 * unlink pins and their directories. Returns what it removed.
 */
async function removeMatching(match: (name: string) => boolean): Promise<string[]> {
  const removed: string[] = [];
  const cgRoot = cgroup2Root();
  const cgroups = (await listDir(cgRoot)).filter(match).map((n) => join(cgRoot, n));
  for (const cg of cgroups) await killCgroupTree(cg);
  for (const ns of (await listDir(NETNS_DIR)).filter(match)) {
    await deleteNetns(ns);
    removed.push(`netns ${ns}`);
  }
  for (const cg of cgroups) {
    await removeCgroupTree(cg);
    removed.push(`cgroup ${cg}`);
  }
  for (const dir of (await listDir(BPFFS_ROOT)).filter(match)) {
    await removeBpffsDir(join(BPFFS_ROOT, dir));
    removed.push(`bpffs ${join(BPFFS_ROOT, dir)}`);
  }
  return removed;
}

/**
 * Crash cleanup: remove every topology object (netns, cgroup tree with its
 * processes, bpffs dir) whose name starts with `prefix` followed by a
 * non-digit. Sweeping `fsmlab` also sweeps `fsmlab-selfcheck`.
 */
export async function sweep(prefix: string): Promise<string[]> {
  if (!/^[a-z][a-z0-9-]*$/.test(prefix)) {
    throw new InvalidInputError('sweep prefix', prefix, 'must start with a letter and hold only a-z, 0-9 and "-"');
  }
  const removed = await removeMatching((name) => matchesSweepPrefix(name, prefix));
  if (removed.length > 0) log.info({ prefix, removed }, 'swept leftovers');
  return removed;
}

/**
 * What exists of the topology with exactly this prefix (netns, cgroup and
 * bpffs names); empty when it is fully gone.
 */
export async function topologyObjects(prefix: string): Promise<string[]> {
  const cgRoot = cgroup2Root();
  const owned = (n: string): boolean => ownedByTopology(n, prefix);
  return [
    ...(await listDir(NETNS_DIR)).filter(owned).map((n) => `netns ${n}`),
    ...(await listDir(cgRoot)).filter(owned).map((n) => `cgroup ${join(cgRoot, n)}`),
    ...(await listDir(BPFFS_ROOT)).filter(owned).map((n) => `bpffs ${join(BPFFS_ROOT, n)}`),
  ];
}

// ---- the topology --------------------------------------------------------------

class Node implements TopoNode {
  readonly name: string;
  readonly netns: string;
  readonly gateway: string;
  readonly underlayIp: string;
  readonly podCidr: string;
  readonly cgroupDir: string;
  readonly podsCgroup: string;
  readonly proxyCgroup: string;
  readonly systemCgroup: string;
  readonly bpffsDir: string;
  readonly pods: Pod[] = [];

  constructor(
    readonly topology: Topology,
    readonly index: number,
    cgRoot: string,
  ) {
    const { prefix, subnetBase } = topology;
    this.name = `n${index}`;
    this.netns = nodeNetnsName(prefix, index);
    this.gateway = nodeGateway(subnetBase, index);
    this.underlayIp = underlayAddress(subnetBase, index);
    this.podCidr = podCidr(subnetBase, index);
    this.cgroupDir = join(cgRoot, this.netns);
    this.podsCgroup = join(this.cgroupDir, 'pods');
    this.proxyCgroup = join(this.cgroupDir, 'proxy');
    this.systemCgroup = join(this.cgroupDir, 'system');
    this.bpffsDir = join(BPFFS_ROOT, this.netns);
  }

  exec(cmd: string, args: string[], opts: ExecOptions = {}): ChildProcess {
    const cgroup = opts.inProxyCgroup ? this.proxyCgroup : this.systemCgroup;
    return this.topology.track(() => spawnInside(this.netns, cgroup, cmd, args, opts));
  }

  run(cmd: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
    const { input, ...rest } = opts;
    return collect(this.exec(cmd, args, { ...rest, stdio: 'pipe' }), input);
  }

  freeSlot(): number {
    const used = new Set(this.pods.map((p) => p.slot));
    for (let s = 1; s <= MAX_POD_SLOT; s++) if (!used.has(s)) return s;
    throw new TopologyError(`node ${this.name} is full (${MAX_POD_SLOT} pods)`);
  }
}

class Pod implements TopoPod {
  readonly netns: string;
  readonly ip: string;
  readonly cgroupPath: string;
  readonly veth: string;
  cgroupId = 0n;

  constructor(
    readonly name: string,
    readonly node: Node,
    readonly slot: number,
  ) {
    this.netns = podNetnsName(node.topology.prefix, node.index, name);
    this.ip = podAddress(node.topology.subnetBase, node.index, slot);
    this.cgroupPath = join(node.podsCgroup, name);
    this.veth = `vp${slot}`;
  }

  exec(cmd: string, args: string[], opts: ExecOptions = {}): ChildProcess {
    return this.node.topology.track(() => spawnInside(this.netns, this.cgroupPath, cmd, args, opts));
  }

  run(cmd: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
    const { input, ...rest } = opts;
    return collect(this.exec(cmd, args, { ...rest, stdio: 'pipe' }), input);
  }
}

class Underlay implements TopoUnderlay {
  readonly netns: string;
  readonly ip: string;
  readonly cgroup: string;

  constructor(
    readonly topology: Topology,
    cgRoot: string,
  ) {
    this.netns = underlayNetnsName(topology.prefix);
    this.ip = underlayServicesAddress(topology.subnetBase);
    this.cgroup = join(cgRoot, this.netns);
  }

  exec(cmd: string, args: string[], opts: ExecOptions = {}): ChildProcess {
    return this.topology.track(() => spawnInside(this.netns, this.cgroup, cmd, args, opts));
  }

  run(cmd: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
    const { input, ...rest } = opts;
    return collect(this.exec(cmd, args, { ...rest, stdio: 'pipe' }), input);
  }
}

export class Topology {
  readonly prefix: string;
  readonly subnetBase: number;
  readonly underlay: TopoUnderlay;
  readonly nodes: TopoNode[];
  private readonly nodeImpls: Node[] = [];
  private readonly children = new Set<ChildProcess>();
  private destroying: Promise<void> | undefined;
  private destroyed = false;

  private constructor(prefix: string, subnetBase: number, cgRoot: string) {
    this.prefix = prefix;
    this.subnetBase = subnetBase;
    this.underlay = new Underlay(this, cgRoot);
    this.nodes = this.nodeImpls;
  }

  /**
   * Build the whole topology, or nothing: on any failure everything made so
   * far is removed before the error reaches the caller. Refuses a prefix that
   * is in use (a running lab, or leftovers to sweep).
   */
  static async create(opts: TopologyOptions): Promise<Topology> {
    const { prefix, nodes, podsPerNode, subnetBase } = validateTopologyOptions(opts);
    assertBpffs();
    const cgRoot = cgroup2Root();
    const existing = await topologyObjects(prefix);
    if (existing.length > 0) {
      throw new TopologyError(`topology prefix ${prefix} is already in use (${existing.join(', ')}): destroy that topology or sweep the prefix first`, {
        details: { prefix, existing },
      });
    }
    const topo = new Topology(prefix, subnetBase, cgRoot);
    const ul = topo.underlay.netns;
    try {
      await runCommand('ip', ['netns', 'add', ul]);
      await ipBatch(ul, ['link set lo up', 'link add br0 type bridge', 'link set br0 up', ...renderUnderlayIpBatch(subnetBase, nodes)]);
      await createCgroup(topo.underlay.cgroup);
      for (let i = 1; i <= nodes; i++) await topo.createNode(i, nodes, cgRoot);
      for (const node of topo.nodeImpls) {
        for (let k = 0; k < podsPerNode; k++) await topo.addPod(node);
      }
    } catch (err) {
      await topo.destroy().catch((cleanupErr: unknown) => log.error({ err: cleanupErr, prefix }, 'cleanup after failed create failed'));
      throw err;
    }
    log.debug({ prefix, nodes, podsPerNode }, 'topology created');
    return topo;
  }

  private async createNode(index: number, nodes: number, cgRoot: string): Promise<void> {
    const node = new Node(this, index, cgRoot);
    // Registered before it exists so a failure half-way is still cleaned up.
    this.nodeImpls.push(node);
    await runCommand('ip', ['netns', 'add', node.netns]);
    const ul = this.underlay.netns;
    await runCommand('ip', ['-n', ul, 'link', 'add', `u${index}`, 'type', 'veth', 'peer', 'name', 'ul0', 'netns', node.netns]);
    await ipBatch(ul, [`link set u${index} master br0`, `link set u${index} up`]);
    await ipBatch(node.netns, renderNodeIpBatch(this.subnetBase, index, nodes));
    // /proc/sys/net is per network namespace of the writer: nsenter is enough.
    // rp_filter off keeps redirects and asymmetric test paths predictable.
    await runCommand('nsenter', [
      `--net=${join(NETNS_DIR, node.netns)}`, '--', 'sysctl', '-q', '-w',
      'net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=0', 'net.ipv4.conf.default.rp_filter=0',
    ]);
    for (const cg of [node.podsCgroup, node.proxyCgroup, node.systemCgroup]) await createCgroup(cg);
    await createBpffsDir(node.bpffsDir);
  }

  /** Register a child so destroy() can kill it; only processes we started. */
  track(start: () => ChildProcess): ChildProcess {
    this.assertAlive();
    const child = start();
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    child.once('error', () => this.children.delete(child));
    return child;
  }

  private assertAlive(): void {
    if (this.destroyed || this.destroying) throw new TopologyError(`topology ${this.prefix} is destroyed`);
  }

  pod(name: string): TopoPod {
    for (const node of this.nodeImpls) {
      const found = node.pods.find((p) => p.name === name);
      if (found) return found;
    }
    throw new InvalidInputError('pod', name, `no such pod in topology ${this.prefix} (pods: ${this.allPods().map((p) => p.name).join(', ') || 'none'})`);
  }

  private allPods(): Pod[] {
    return this.nodeImpls.flatMap((n) => n.pods);
  }

  private defaultPodName(): string {
    const used = new Set(this.allPods().map((p) => p.name));
    for (let k = 1; ; k++) if (!used.has(`p${k}`)) return `p${k}`;
  }

  /**
   * Add a pod to a node. The default name is `p<k>` with k counted across the
   * whole topology (p1, p2 on node 1, p3, p4 on node 2 ...), so names stay unique.
   */
  async addPod(node: TopoNode, name?: string): Promise<TopoPod> {
    const impl = this.nodeImpls.find((n) => n === node);
    if (!impl) throw new InvalidInputError('node', node?.name, `not a node of topology ${this.prefix}`);
    this.assertAlive();
    const podName = name ?? this.defaultPodName();
    validatePodName(podName);
    if (this.allPods().some((p) => p.name === podName)) {
      throw new InvalidInputError('pod name', podName, `already used in topology ${this.prefix}`);
    }
    const pod = new Pod(podName, impl, impl.freeSlot());
    impl.pods.push(pod);
    try {
      await runCommand('ip', ['netns', 'add', pod.netns]);
      await runCommand('ip', ['-n', impl.netns, 'link', 'add', pod.veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', pod.netns]);
      await ipBatch(pod.netns, renderPodIpBatch(pod.ip, impl.gateway));
      await ipBatch(impl.netns, renderNodePodLegIpBatch(pod.veth, pod.ip, impl.gateway));
      await createCgroup(pod.cgroupPath);
      pod.cgroupId = cgroupId(pod.cgroupPath);
    } catch (err) {
      await this.removePod(pod).catch((cleanupErr: unknown) => log.error({ err: cleanupErr, pod: podName }, 'cleanup after failed addPod failed'));
      throw err;
    }
    return pod;
  }

  /** Kill the pod's processes, delete its veth, netns and cgroup. */
  async removePod(pod: TopoPod): Promise<void> {
    const impl = this.allPods().find((p) => p === pod);
    if (!impl) throw new InvalidInputError('pod', pod?.name, `not a pod of topology ${this.prefix}`);
    await killCgroupTree(impl.cgroupPath);
    // Deleting one veth end deletes both at once; a netns is torn down
    // asynchronously, which would keep the slot's name busy for a moment.
    if (existsSync(join(NETNS_DIR, impl.node.netns))) {
      await runCommand('ip', ['-n', impl.node.netns, 'link', 'del', impl.veth], { allowFail: true });
    }
    await deleteNetns(impl.netns);
    await removeCgroupTree(impl.cgroupPath);
    impl.node.pods.splice(impl.node.pods.indexOf(impl), 1);
  }

  /**
   * Remove everything this topology made (by its exact names, so it also
   * cleans after a half-finished create) and kill the processes it started.
   * Idempotent; a failed destroy can be retried.
   */
  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroying ??= this.doDestroy().finally(() => (this.destroying = undefined));
    await this.destroying;
    this.destroyed = true;
  }

  private async doDestroy(): Promise<void> {
    const exits = [...this.children].map((child) => {
      if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
      const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      child.kill('SIGKILL');
      return exited;
    });
    await Promise.all(exits);
    const removed = await removeMatching((name) => ownedByTopology(name, this.prefix));
    for (const node of this.nodeImpls) node.pods.length = 0;
    log.debug({ prefix: this.prefix, removed }, 'topology destroyed');
  }
}
