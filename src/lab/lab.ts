import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { createServer } from 'node:net';
import { constants } from 'node:os';
import { dirname, join } from 'node:path';
import { pipyBinary } from '../proxy/pipy.js';
import { generateTokens, writeTokensFile } from '../controller/auth.js';
import { createDataplane } from '../dataplane/index.js';
import type { InterceptionMode } from '../dataplane/types.js';
import { errorMessage, InvalidInputError } from '../errors.js';
import { cgroup2Root, createCgroup } from '../util/cgroup.js';
import { run } from '../util/exec.js';
import { packageRoot } from '../util/paths.js';
import { BPFFS_ROOT, ensureBpffs } from './bpffs.js';
import { faultFile } from './faults.js';
import { ECHO_PORT, podVersion, renderManifests } from './manifests.js';
import { hostNetworkSnapshot } from './net-probe.js';
import { labCniDirs, writePrimaryConflist } from './pods.js';
import { createOutside } from './outside.js';
import { isOurs, pidAlive, sleep, spawnInside, startDetached, stopProcess, tail } from './processes.js';
import { agentCgroup, agentProcess, labCli, readSupervisorStatus, supervisorArgv, type SupervisorStatus } from './supervisor.js';
import {
  claimLabPointer,
  LAB_POINTER,
  LAB_PREFIX,
  LabError,
  LabExistsError,
  labFiles,
  readLabState,
  removeLabPointer,
  resolveLabDir,
  writeLabState,
  type LabNode,
  type LabPod,
  type LabProcess,
  type LabState,
} from './state.js';
import { matchesSweepPrefix, sweep, Topology } from './topology.js';
import { BROKER_SERVICE, MQTT_PORT, startLabBroker } from './mqtt-lab.js';

/**
 * The lab: a real multi-node mesh on one machine (issue 10). `lab up` builds
 * the routed topology (src/lab/topology.ts), writes example manifests, starts
 * echo servers in the pods, the controller on the manifests and one agent per
 * node, all as real detached processes in `fsmlab` cgroups; `lab down` stops
 * them, runs every node's cleanup, sweeps the prefix and proves nothing is left.
 */

export const CONTROLLER_PORT = 15443;
export const AGENT_PORT_BASE = 15900;
export const READY_TIMEOUT_MS = 30_000;

export interface UpOptions {
  dir: string;
  nodes: number;
  podsPerNode: number;
  mode: 'auto' | 'ebpf' | 'iptables';
  proxy: 'auto' | 'pipy' | 'passthrough';
}

export type Say = (line: string) => void;

const cli = labCli;
export const echoScript = (): string => join(packageRoot(), 'dist', 'src', 'lab', 'echo-server.js');

// ---- proxy choice (pure but for the lookups) ---------------------------------

export interface ProxyChoice {
  kind: 'pipy' | 'passthrough';
  note: string;
}

/**
 * --proxy auto takes Pipy when the binary and the project's Pipy program
 * (proxy/main.js) are both there; otherwise the passthrough proxy, saying what
 * that costs: it forwards to the original destination and enforces nothing.
 */
export function chooseProxy(choice: UpOptions['proxy'], env: NodeJS.ProcessEnv = process.env, programPresent = existsSync(join(packageRoot(), 'proxy', 'main.js'))): ProxyChoice {
  const bin = pipyBinary(env);
  const missing = !bin ? 'no Pipy binary found (PIPY_BIN or PATH)' : !programPresent ? `Pipy found at ${bin} but the Pipy proxy program (proxy/main.js) is not part of this build` : undefined;
  if (choice === 'passthrough') return { kind: 'passthrough', note: 'passthrough proxy as asked: services, splits and allow/deny are not enforced, their checks are skipped' };
  if (missing === undefined) return { kind: 'pipy', note: `Pipy at ${bin}` };
  if (choice === 'pipy') throw new InvalidInputError('--proxy', 'pipy', `${missing}; use --proxy passthrough or auto`);
  return { kind: 'passthrough', note: `${missing}: using the passthrough proxy; services, splits and allow/deny are NOT enforced and their checks are skipped` };
}

// ---- what exists -------------------------------------------------------------

function listDir(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

/** Every kernel object with the lab prefix (netns, cgroup, bpffs dir), also the lab's control cgroup. */
export function labObjects(): string[] {
  const cgRoot = cgroup2Root();
  const match = (n: string): boolean => matchesSweepPrefix(n, LAB_PREFIX) && !n.startsWith(`${LAB_PREFIX}-selfcheck`);
  return [
    ...listDir('/run/netns').filter(match).map((n) => `netns ${n}`),
    ...listDir(cgRoot).filter(match).map((n) => `cgroup ${join(cgRoot, n)}`),
    ...listDir(BPFFS_ROOT).filter(match).map((n) => `bpffs ${join(BPFFS_ROOT, n)}`),
  ];
}

// ---- lab up ------------------------------------------------------------------

/** Why waiting is pointless (the process died), with its log's last lines; undefined while it lives. */
export type DeadCheck = () => string | undefined;

export const processDied =
  (proc: LabProcess | undefined): DeadCheck =>
  () =>
    proc && !pidAlive(proc.pid) ? `the process (pid ${proc.pid}) exited. Last lines of ${proc.log}:\n${tail(proc.log)}` : undefined;

export function waitFor<T>(what: string, timeoutMs: number, dead: DeadCheck, attempt: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  return (async () => {
    let last = '';
    for (;;) {
      try {
        const v = await attempt();
        if (v !== undefined) return v;
      } catch (err) {
        last = errorMessage(err);
      }
      const died = dead();
      if (died) throw new LabError(`${what}: ${died}`);
      if (Date.now() > deadline) throw new LabError(`${what}: not ready after ${timeoutMs / 1000} s${last ? ` (${last})` : ''}`);
      await sleep(100);
    }
  })();
}

export function httpsReady(url: string, ca: string): Promise<boolean | undefined> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(`${url}/readyz`, { ca, timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200 ? true : undefined);
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

export async function agentState(url: string): Promise<Record<string, unknown> | undefined> {
  const res = await fetch(`${url}/v1/state`, { signal: AbortSignal.timeout(2000) });
  return res.ok ? ((await res.json()) as Record<string, unknown>) : undefined;
}

export async function agentReady(url: string): Promise<true | undefined> {
  const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(2000) });
  if (res.ok) return true;
  throw new Error(`/readyz ${res.status}: ${(await res.text()).slice(0, 300)}`);
}

/** The controller's command line; its flags are the controller CLI's (src/cli/commands/controller.ts). */
function controllerArgv(state: LabState): string[] {
  const f = labFiles(state.dir);
  return [process.execPath, cli(), 'controller', '--manifests', f.manifests, '--listen', `127.0.0.1:${CONTROLLER_PORT}`, '--state-dir', state.controller.stateDir, '--tokens', f.tokens];
}

export function refuseExisting(dir: string): void {
  const existing = labObjects();
  const pointer = existsSync(LAB_POINTER) ? readFileSync(LAB_POINTER, 'utf8').trim() : undefined;
  const stateFile = existsSync(labFiles(dir).state) ? labFiles(dir).state : undefined;
  if (existing.length === 0 && pointer === undefined && stateFile === undefined) return;
  const what = [pointer ? `a lab in ${pointer}` : '', stateFile ? `state file ${stateFile}` : '', existing.length ? `${existing.length} fsmlab objects (${existing.slice(0, 3).join(', ')}${existing.length > 3 ? ', ...' : ''})` : '']
    .filter(Boolean)
    .join('; ');
  throw new LabExistsError(`a lab already exists (${what}): run \`fsm-node lab down\` first`);
}

/** The controller and agent ports must be free before anything starts: a busy port is a clear error, not a 30 s wait. */
export async function assertPortsFree(ports: number[], needs = `${ports[0]} for the controller and ${ports[1]}-${ports[ports.length - 1]} for the agents`): Promise<void> {
  for (const port of ports) {
    await new Promise<void>((resolve, reject) => {
      const srv = createServer();
      srv.once('error', (err: NodeJS.ErrnoException) =>
        reject(new LabError(`port 127.0.0.1:${port} is in use (${err.code}): the lab needs ${needs}; stop what listens there (ss -ltnp 'sport = :${port}')`)),
      );
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve()));
    });
  }
}

/** During `lab up` an agent that exits is an error (the supervisor would retry it, but a crash at start is a bug to show). */
export function agentDiedDuringStart(state: LabState, n: LabNode): DeadCheck {
  const supervisorDied = processDied(state.supervisor);
  return () => {
    const run = readSupervisorStatus(state.dir)?.agents[n.name];
    if (run?.lastExit) return `the agent ${run.lastExit.reason} after ${run.lastExit.ranSeconds} s (the lab supervisor restarts it with backoff). Last lines of ${run.log}:\n${tail(run.log)}`;
    const died = supervisorDied();
    return died ? `the lab supervisor died: ${died}` : undefined;
  };
}

/** Everything `lab up` does; progress lines go to `say`. Returns the state of the running lab. */
/**
 * The agents of every node, run by the lab supervisor, which restarts one
 * that dies (as kubelet restarts a DaemonSet pod); resolves when all answer.
 * Shared by the single lab and the cluster lab (clusters/up.ts).
 */
export async function startAgents(state: LabState, ctlRoot: string): Promise<NonNullable<LabState['supervisor']>> {
  for (const n of state.nodes) {
    await createCgroup(agentCgroup(state, n));
    mkdirSync(n.stateDir, { recursive: true });
    // The node's primary CNI conflist, for the agent to chain fsm-node-cni into (lab pod add).
    const cni = labCniDirs(state, n.name);
    writePrimaryConflist(cni.confDir);
    mkdirSync(cni.binDir, { recursive: true });
  }
  const supCgroup = join(ctlRoot, 'supervisor');
  await createCgroup(supCgroup);
  const supervisor = startDetached(supCgroup, undefined, supervisorArgv(state.dir), join(labFiles(state.dir).logs, 'supervisor.log'));
  state.supervisor = supervisor;
  writeLabState(state);
  await Promise.all(state.nodes.map((n) => waitFor(`agent of node ${n.name} (${n.agentUrl})`, READY_TIMEOUT_MS, agentDiedDuringStart(state, n), () => agentReady(n.agentUrl))));
  return supervisor;
}

export async function labUp(opts: UpOptions, say: Say): Promise<LabState> {
  const started = Date.now();
  if (!existsSync(cli()) || !existsSync(echoScript())) throw new LabError(`fsm-node is not built (${cli()} missing): run npm run build:ts`);
  const proxy = chooseProxy(opts.proxy);
  refuseExisting(opts.dir);
  await assertPortsFree([CONTROLLER_PORT, ...Array.from({ length: opts.nodes }, (_v, i) => AGENT_PORT_BASE + 1 + i)]);
  if (!claimLabPointer(opts.dir)) throw new LabExistsError('another `lab up` claimed the lab at the same moment: run `fsm-node lab down` first');
  const f = labFiles(opts.dir);
  for (const d of [f.manifests, f.logs, f.controller, f.nodes, f.faults]) rmSync(d, { recursive: true, force: true });
  for (const d of [f.manifests, f.logs, f.nodes]) mkdirSync(d, { recursive: true });
  if (proxy.kind === 'passthrough' && opts.proxy === 'auto') say(`!! ${proxy.note}`);
  else say(`proxy: ${proxy.note}`);

  if (await ensureBpffs()) say(`mounted bpffs at ${BPFFS_ROOT}`);
  const hostBefore = await hostNetworkSnapshot();
  writeFileSync(join(opts.dir, 'host-network.before'), hostBefore);

  const topo = await Topology.create({ prefix: LAB_PREFIX, nodes: opts.nodes, podsPerNode: opts.podsPerNode });
  say(`topology: ${opts.nodes} nodes x ${opts.podsPerNode} pods (netns ${LAB_PREFIX}-n*, routed via ${LAB_PREFIX}-ul)`);
  const cgRoot = cgroup2Root();
  const ctlRoot = join(cgRoot, `${LAB_PREFIX}-ctl`);
  const tokens = generateTokens(topo.nodes.map((n) => n.name));
  const state: LabState = {
    version: 1,
    prefix: LAB_PREFIX,
    dir: opts.dir,
    createdAt: new Date().toISOString(),
    mode: opts.mode,
    proxy: proxy.kind,
    proxyNote: proxy.note,
    controllerCgroupRoot: ctlRoot,
    controller: { url: `https://127.0.0.1:${CONTROLLER_PORT}`, stateDir: f.controller, caFile: join(f.controller, 'ca.crt') },
    nodes: topo.nodes.map((n, i) => ({
      name: n.name,
      index: n.index,
      netns: n.netns,
      gateway: n.gateway,
      underlayIp: n.underlayIp,
      podCidr: n.podCidr,
      podsCgroup: n.podsCgroup,
      proxyCgroup: n.proxyCgroup,
      bpffsDir: n.bpffsDir,
      stateDir: join(f.nodes, n.name, 'state'),
      tokenFile: join(f.nodes, n.name, 'token'),
      agentUrl: `http://127.0.0.1:${AGENT_PORT_BASE + 1 + i}`,
    })),
    pods: topo.nodes.flatMap((n) =>
      n.pods.map((p, k) => ({ name: p.name, node: n.name, ip: p.ip, netns: p.netns, cgroupPath: p.cgroupPath, version: podVersion(k) })),
    ),
  };
  writeLabState(state);

  // Manifests and credentials.
  const files = renderManifests({ mode: opts.mode, nodes: state.nodes.map((n) => ({ name: n.name, address: n.underlayIp })), pods: state.pods });
  for (const [name, text] of files) {
    mkdirSync(dirname(join(f.manifests, name)), { recursive: true });
    writeFileSync(join(f.manifests, name), text);
  }
  await writeTokensFile(f.tokens, tokens);
  for (const n of state.nodes) {
    mkdirSync(dirname(n.tokenFile), { recursive: true });
    writeFileSync(n.tokenFile, `${tokens[n.name]}\n`, { mode: 0o600 });
  }
  say(`manifests: ${files.size} files in ${f.manifests} (namespace demo, services echo/echo-v1/echo-v2, split 80/20, access rules)`);

  // Workloads: one echo server per pod, inside the pod.
  for (const pod of state.pods) {
    pod.server = startDetached(pod.cgroupPath, pod.netns, [process.execPath, echoScript(), 'serve', '--name', pod.name, '--port', String(ECHO_PORT), '--fault-file', faultFile(state.dir, pod.name)], join(f.logs, `pod-${pod.name}.log`));
  }
  writeLabState(state);
  await Promise.all(
    state.pods.map((pod) => waitFor(`echo server in pod ${pod.name}`, 10_000, processDied(pod.server), async () => (readFileSync(pod.server!.log, 'utf8').includes('"listening"') ? true : undefined))),
  );
  say(`workloads: ${state.pods.length} echo servers on :${ECHO_PORT} (${state.pods.map((p) => `${p.name}@${p.node}=${p.ip}`).join(' ')})`);
  const brokerPod = state.pods[0];
  if (brokerPod && state.pods.length > 1) {
    brokerPod.broker = await startLabBroker(state);
    writeLabState(state);
    say(`mqtt: mosquitto in pod ${brokerPod.name}, service ${BROKER_SERVICE.name} ${BROKER_SERVICE.clusterIP}:${MQTT_PORT} (docs/mqtt.md)`);
  }

  // The outside world: a client and a server on the site network, off the mesh (ingress and egress).
  state.outside = await createOutside({ prefix: LAB_PREFIX, subnetBase: topo.subnetBase, cgroupRoot: cgRoot, dir: f.logs });
  writeLabState(state);
  const outsideServer = state.outside.server;
  await waitFor('outside server', 10_000, processDied(outsideServer.process), async () => (readFileSync(outsideServer.process!.log, 'utf8').includes('"ready"') ? true : undefined));
  say(`outside: client ${state.outside.client.ip} (lab exec outside -- ...), server ${outsideServer.ip} http :${outsideServer.httpPort} https :${outsideServer.httpsPort} (${outsideServer.serverName}, CA ${outsideServer.caFile})`);

  // Control plane: the controller, then one agent per node, each in its own lab cgroup.
  await createCgroup(ctlRoot);
  const ctlCgroup = join(ctlRoot, 'controller');
  await createCgroup(ctlCgroup);
  state.controller.process = startDetached(ctlCgroup, undefined, controllerArgv(state), join(f.logs, 'controller.log'));
  writeLabState(state);
  await waitFor('controller', READY_TIMEOUT_MS, processDied(state.controller.process), async () => (existsSync(state.controller.caFile) ? httpsReady(state.controller.url, readFileSync(state.controller.caFile, 'utf8')) : undefined));
  say(`controller: ${state.controller.url} (pid ${state.controller.process.pid}), watching ${f.manifests}`);

  const supervisor = await startAgents(state, ctlRoot);
  say(`agents: ${state.nodes.length} ready (${state.nodes.map((n) => n.agentUrl).join(', ')}), run by the lab supervisor (pid ${supervisor.pid}), which restarts a dead one`);
  say(`lab up in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return state;
}

/** The summary table after `lab up`: one row per node. */
export function renderSummary(state: LabState, modes: Record<string, string>, supervisor: SupervisorStatus | undefined = readSupervisorStatus(state.dir)): string[] {
  const rows = [['NODE', 'MODE', 'PODS', 'AGENT', 'RESTARTS', 'METRICS']];
  for (const n of state.nodes) {
    const pods = state.pods.filter((p) => p.node === n.name).map((p) => `${p.name}=${p.ip}`).join(' ');
    rows.push([n.name, modes[n.name] ?? '?', pods || '-', n.agentUrl, String(supervisor?.agents[n.name]?.restarts ?? '?'), `${n.agentUrl}/metrics`]);
  }
  const widths = rows[0]!.map((_c, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const first = state.pods[0]?.name ?? 'p1';
  const other = state.pods[1] ?? state.pods[0];
  return [
    ...rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()),
    '',
    `proxy: ${state.proxy}${state.proxy === 'passthrough' ? ' (L4, no policy: split and allow/deny checks are skipped)' : ''}; controller ${state.controller.url}; logs in ${labFiles(state.dir).logs}`,
    'next:',
    '  fsm-node lab check                     real requests between every pair of pods',
    '  fsm-node lab status                    nodes, agents (restarts, last exit), proxies, pods',
    `  fsm-node lab exec ${first} -- node ${echoScript()} get http://${other?.ip ?? '10.77.1.2'}:${ECHO_PORT}/`,
    '  fsm-node status                        every node\'s agent: mode and why, policy, proxy',
    `  fsm-node mode set ${state.mode === 'iptables' ? 'ebpf' : 'iptables'} --node ${state.nodes[0]?.name ?? 'n1'} --manifests ${labFiles(state.dir).manifests}`,
    `  edit ${labFiles(state.dir).manifests}/*.yaml (the mesh follows live), then fsm-node lab check`,
    '  fsm-node lab down                      stop everything and verify nothing is left',
  ];
}

/** Effective interception mode per node, as its agent reports it. */
export async function agentModes(state: LabState): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  await Promise.all(
    state.nodes.map(async (n) => {
      try {
        const s = await agentState(n.agentUrl);
        const mode = s?.mode as { effective?: string; fallbackReason?: string } | undefined;
        out[n.name] = mode?.effective ? `${mode.effective}${mode.fallbackReason ? ` (fallback: ${mode.fallbackReason})` : ''}` : 'not ready';
      } catch {
        out[n.name] = 'no answer';
      }
    }),
  );
  return out;
}

// ---- lab exec ----------------------------------------------------------------

export function findPod(state: LabState, name: string | undefined): LabPod {
  // "outside" is the outside client: a place to run commands, like a pod (no cgroup of a pod, the outside one).
  if (name === 'outside' && state.outside) return { name, node: '-', ip: state.outside.client.ip, netns: state.outside.client.netns, cgroupPath: state.outside.cgroup, version: 'v1' };
  const pod = state.pods.find((p) => p.name === name);
  if (!pod) throw new InvalidInputError('POD', name, `no such lab pod (pods: ${state.pods.map((p) => p.name).join(', ')})`);
  return pod;
}

/** Run a command inside a pod (its netns and cgroup) with this terminal's stdio; resolves to its exit code. */
export function labExec(state: LabState, podName: string | undefined, argv: string[]): Promise<number> {
  const pod = findPod(state, podName);
  if (argv.length === 0) throw new InvalidInputError('CMD', '', 'usage: fsm-node lab exec POD -- CMD [ARGS...]');
  if (!existsSync(join('/run/netns', pod.netns))) throw new LabError(`pod ${pod.name}: network namespace ${pod.netns} is gone: run \`fsm-node lab down\` and \`lab up\` again`);
  return new Promise((resolve, reject) => {
    const child = spawnInside(pod.cgroupPath, pod.netns, argv, 'inherit');
    child.on('error', reject);
    // Like a shell: a command killed by a signal exits 128 + its number.
    child.on('exit', (code, signal) => resolve(code ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0)));
  });
}

// ---- lab down ----------------------------------------------------------------

export interface DownReport {
  existed: boolean;
  removed: string[];
  leftovers: string[];
  notes: string[];
}

/** `fsm-node cleanup` for one node; when that command is not there yet, the dataplanes' own cleanup in-process. */
async function cleanupNode(n: LabNode, mode: LabState['mode']): Promise<string[]> {
  const res = await new Promise<{ code: number | null; out: string }>((resolve) => {
    const args = [cli(), 'cleanup', '--bpffs-dir', n.bpffsDir, '--state-dir', n.stateDir, '--proxy-cgroup', n.proxyCgroup, '--netns', n.netns];
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, FSMN_LOG_LEVEL: process.env.FSMN_LOG_LEVEL ?? 'warn' } });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.on('error', (err) => resolve({ code: null, out: err.message }));
    child.on('close', (code) => resolve({ code, out }));
  });
  if (res.code === 0) return res.out.split('\n').filter((l) => l.trim() !== '' && !/: nothing installed$|: not running$/.test(l)).map((l) => l.trim());
  // 2 = usage (flags not wired yet), 3 = not implemented: clean up here instead.
  if (res.code !== 2 && res.code !== 3) throw new LabError(`fsm-node cleanup for node ${n.name} failed (exit ${res.code}): ${res.out.trim().split('\n').slice(-3).join(' ')}`);
  const removed: string[] = [];
  const netnsAlive = existsSync(join('/run/netns', n.netns));
  for (const m of ['ebpf', 'iptables'] as InterceptionMode[]) {
    if (m === 'iptables' && !netnsAlive) continue; // rules and sets die with their namespace
    if (m === 'ebpf' && mode === 'iptables' && !existsSync(n.bpffsDir)) continue;
    const dp = createDataplane(m, { stateDir: n.stateDir, bpffsDir: n.bpffsDir, podsCgroup: n.podsCgroup, proxyCgroup: n.proxyCgroup, netns: n.netns });
    try {
      removed.push(...(await dp.cleanup()).removed.map((r) => `${m}: removed ${r}`));
    } finally {
      await dp.close();
    }
  }
  return removed;
}

/**
 * "ebpf: removed link connect4 (id 7)", "ebpf: removed map pin fsm_pods",
 * "proxy: stopped" -> "ebpf: 2 removed (1 link, 1 map); proxy: stopped":
 * what `cleanup` did, counted per part by the first word of each object, so
 * the progress line stays short.
 */
export function summarizeRemoved(lines: string[]): string {
  if (lines.length === 0) return 'nothing installed';
  const parts = new Map<string, { total: number; kinds: Map<string, number>; other: string[] }>();
  for (const line of lines) {
    const m = /^(\S+): (.*)$/.exec(line);
    const part = m?.[1] ?? 'other';
    const what = m?.[2] ?? line;
    const p = parts.get(part) ?? { total: 0, kinds: new Map<string, number>(), other: [] };
    parts.set(part, p);
    const r = /^removed (\S+)/.exec(what);
    if (!r) p.other.push(what);
    else {
      p.total++;
      p.kinds.set(r[1]!, (p.kinds.get(r[1]!) ?? 0) + 1);
    }
  }
  return [...parts]
    .map(([part, p]) => {
      const kinds = [...p.kinds].map(([k, c]) => `${c} ${k}`).join(', ');
      return `${part}: ${[p.total ? `${p.total} removed (${kinds})` : '', ...p.other].filter(Boolean).join(', ')}`;
    })
    .join('; ');
}

/** Attachments in `bpftool cgroup tree` output that sit on a lab cgroup (pure, for the leftover check). */
export function labAttachmentsIn(tree: string): string[] {
  const out: string[] = [];
  let current = '';
  for (const line of tree.split('\n')) {
    if (line.startsWith('/')) current = line.trim();
    else if (current && /^\s+\d+\s/.test(line) && current.split('/').some((seg) => matchesSweepPrefix(seg, LAB_PREFIX))) {
      out.push(`bpf attachment on ${current}: ${line.trim().replace(/\s+/g, ' ')}`);
    }
  }
  return out;
}

/** Processes anywhere in a lab cgroup (what a sweep must have killed). */
function labProcesses(): string[] {
  const out: string[] = [];
  for (const entry of listDir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let cg: string;
    try {
      cg = readFileSync(`/proc/${entry}/cgroup`, 'utf8');
    } catch {
      continue;
    }
    const line = cg.split('\n').find((l) => l.startsWith('0::'));
    // A zombie holds nothing; its parent (init, since lab processes are detached) reaps it when it gets to it.
    if (line && pidAlive(Number(entry)) && line.slice(3).split('/').some((seg) => matchesSweepPrefix(seg, LAB_PREFIX) && !seg.startsWith(`${LAB_PREFIX}-selfcheck`))) out.push(`process ${entry} in cgroup ${line.slice(3)}`);
  }
  return out;
}

/** Stop everything, clean every node, sweep the prefix, then verify; works from any state, also after a crash. */
export async function labDown(dirFlag: string | undefined, say: Say): Promise<DownReport> {
  const dir = resolveLabDir(dirFlag);
  const report: DownReport = { existed: false, removed: [], leftovers: [], notes: [] };
  let state: LabState | undefined;
  try {
    state = readLabState(dir);
  } catch (err) {
    report.notes.push(`${errorMessage(err)}; sweeping by prefix instead`);
  }
  const before = labObjects();
  const pointer = existsSync(LAB_POINTER);
  if (!state && before.length === 0 && !pointer && !existsSync(labFiles(dir).state)) return report;
  report.existed = true;

  let agentProcs: Array<LabProcess | undefined> = [];
  if (state) {
    // The supervisor first: it would restart the agents stopped below. Then its last word has every agent's pid.
    if (await stopProcess(state.supervisor)) {
      report.removed.push('lab supervisor process');
      say('supervisor: stopped');
    }
    const supervised = readSupervisorStatus(dir);
    agentProcs = state.nodes.map((n) => agentProcess(supervised?.agents[n.name]));
    let agents = 0;
    for (const p of agentProcs) if (await stopProcess(p)) agents++;
    say(`agents: stopped ${agents} of ${state.nodes.length}${agents < state.nodes.length ? ' (the others were not running)' : ''}`);
    if (agents) report.removed.push(`${agents} agent process(es)`);
    for (const n of state.nodes) {
      try {
        const removed = await cleanupNode(n, state.mode);
        report.removed.push(...removed.map((r) => `${n.name} ${r}`));
        say(`cleanup ${n.name}: ${summarizeRemoved(removed)}`);
      } catch (err) {
        report.notes.push(`cleanup of ${n.name}: ${errorMessage(err)} (the sweep below removes its namespace, cgroups and pins anyway)`);
      }
    }
    if (await stopProcess(state.controller.process)) {
      report.removed.push('controller process');
      say('controller: stopped');
    }
    // A cluster lab: every cluster's controller (the first one is state.controller, stopped above).
    for (const c of state.clusters ?? []) {
      if (await stopProcess(c.controller.process)) {
        report.removed.push(`controller process of cluster ${c.name}`);
        say(`controller of ${c.name}: stopped`);
      }
      if (await stopProcess(c.relay)) report.removed.push(`clusterset relay of cluster ${c.name}`);
    }
  }
  const pidsToCheck = state ? [state.controller.process, ...(state.clusters ?? []).flatMap((c) => [c.controller.process, c.relay]), state.supervisor, ...agentProcs, ...state.pods.flatMap((p) => [p.server, p.broker]), state.outside?.server.process].filter((p): p is LabProcess => p !== undefined) : [];
  const swept = await sweep(LAB_PREFIX);
  report.removed.push(...swept);
  const count = (kind: string): number => swept.filter((x) => x.startsWith(`${kind} `)).length;
  say(`sweep: ${swept.length ? `${count('netns')} network namespaces, ${count('cgroup')} cgroup trees, ${count('bpffs')} bpffs directories removed` : 'nothing left to remove'}`);

  // Verify: nothing with the prefix, no process of ours, no attachment under a lab cgroup.
  report.leftovers.push(...labObjects());
  report.leftovers.push(...pidsToCheck.filter((p) => isOurs(p)).map((p) => `process ${p.pid} (${p.log})`));
  report.leftovers.push(...labProcesses());
  const tree = await run('bpftool', ['cgroup', 'tree', cgroup2Root()], { allowFail: true }).catch((err: unknown) => ({ code: null, stdout: '', stderr: errorMessage(err) }));
  if (tree.code === 0) report.leftovers.push(...labAttachmentsIn(tree.stdout));
  else report.notes.push(`cgroup BPF attachments not verified: bpftool cgroup tree failed (${tree.stderr.trim() || `exit ${tree.code}`})`);
  const hostFile = join(dir, 'host-network.before');
  if (existsSync(hostFile)) {
    if (readFileSync(hostFile, 'utf8') !== (await hostNetworkSnapshot())) {
      report.notes.push('the host network namespace differs from before `lab up` (links, addresses, routes or iptables): the lab never touches it, so something else changed it meanwhile');
    }
  }
  if (report.leftovers.length === 0) {
    const f = labFiles(dir);
    for (const p of [f.state, f.supervisor, f.manifests, f.controller, f.tokens, f.nodes, f.faults, f.clusters, hostFile]) rmSync(p, { recursive: true, force: true });
    removeLabPointer();
  }
  return report;
}
