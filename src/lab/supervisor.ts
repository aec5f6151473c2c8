import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { errorMessage } from '../errors.js';
import { writeFileAtomic } from '../policy/store.js';
import { logger } from '../util/log.js';
import { packageRoot } from '../util/paths.js';
import { labCniDirs } from './pods.js';
import { spawnDetached } from './processes.js';
import { LabError, labFiles, readLabState, type LabNode, type LabProcess, type LabState } from './state.js';

/**
 * The lab's kubelet: one detached process (`fsm-node lab supervise`, started
 * by `lab up`, stopped first by `lab down`) that runs every node's agent as
 * its child and restarts one that exits, the way a DaemonSet pod is
 * restarted on a real node: same command line and environment, exponential
 * backoff (1 s, 2 s, 4 s ... 30 s), reset once the agent has run a minute.
 * Being the parent, it knows how each agent ended (exit code or signal).
 *
 * What it knows goes to <dir>/supervisor.json (written atomically), read by
 * `lab status`, `lab check` and `lab down`: the current pid of every agent,
 * restarts, the last exit. lab.json stays `lab up`'s alone. Stopping the
 * supervisor leaves the agents running (kubelet going away does not kill pods).
 */

const log = logger('lab-supervisor');

export interface BackoffPolicy {
  initialMs: number;
  maxMs: number;
  /** An agent that ran at least this long before exiting starts the backoff over. */
  resetAfterMs: number;
}

export const AGENT_BACKOFF: BackoffPolicy = { initialMs: 1000, maxMs: 30_000, resetAfterMs: 60_000 };

/**
 * The delay before restarting an agent that exited after running `ranMs`,
 * given the delay used before its previous restart (0: none yet).
 */
export function nextRestartDelay(previousDelayMs: number, ranMs: number, p: BackoffPolicy = AGENT_BACKOFF): number {
  if (previousDelayMs <= 0 || ranMs >= p.resetAfterMs) return p.initialMs;
  return Math.min(previousDelayMs * 2, p.maxMs);
}

/** "killed by SIGKILL", "exited with code 1": how a process ended, as a person says it. */
export function describeExit(code: number | null, signal: string | null): string {
  if (signal) return `killed by ${signal}`;
  return `exited with code ${code ?? '?'}`;
}

const ExitSchema = z.object({ at: z.string(), code: z.number().int().nullable(), signal: z.string().nullable(), reason: z.string(), ranSeconds: z.number() }).strict();

const AgentRunSchema = z
  .object({
    pid: z.number().int().positive().optional(),
    cgroup: z.string(),
    log: z.string(),
    /** Running now (as far as the supervisor knows: it is the parent). */
    running: z.boolean(),
    startedAt: z.string().optional(),
    restarts: z.number().int().nonnegative(),
    lastExit: ExitSchema.optional(),
    /** While waiting out the backoff: when the next start is due. */
    nextRestartAt: z.string().optional(),
  })
  .strict();

export const SupervisorStatusSchema = z
  .object({
    pid: z.number().int().positive(),
    startedAt: z.string(),
    updatedAt: z.string(),
    /** Set when the supervisor stopped (lab down, or the lab state went away). */
    stoppedAt: z.string().optional(),
    agents: z.record(AgentRunSchema),
  })
  .strict();
export type SupervisorStatus = z.infer<typeof SupervisorStatusSchema>;
export type AgentRun = z.infer<typeof AgentRunSchema>;

export const supervisorFile = (dir: string): string => labFiles(dir).supervisor;

/** The supervisor's last word, or undefined when there is none (not started yet, or unreadable: a reader must not fail on it). */
export function readSupervisorStatus(dir: string): SupervisorStatus | undefined {
  try {
    const r = SupervisorStatusSchema.safeParse(JSON.parse(readFileSync(supervisorFile(dir), 'utf8')));
    return r.success ? r.data : undefined;
  } catch {
    return undefined;
  }
}

/** The agent's process record as `lab down` stops it (pid and cgroup: pid reuse cannot pass for it). */
export function agentProcess(run: AgentRun | undefined): LabProcess | undefined {
  return run?.pid !== undefined && run.running ? { pid: run.pid, cgroup: run.cgroup, log: run.log } : undefined;
}

// ---- how an agent is started (the one place: first start and every restart) ----------

export const labCli = (): string => join(packageRoot(), 'dist', 'src', 'cli', 'bin.js');
export const agentCgroup = (state: LabState, n: LabNode): string => join(state.controllerCgroupRoot, `agent-${n.name}`);
export const agentLog = (state: LabState, n: LabNode): string => join(labFiles(state.dir).logs, `agent-${n.name}.log`);

/** The controller a node's agent talks to: its cluster's in a cluster lab, else the lab's one. */
export function controllerOf(state: LabState, n: LabNode): LabState['controller'] {
  return state.clusters?.find((c) => c.name === n.cluster)?.controller ?? state.controller;
}

export function agentArgv(state: LabState, n: LabNode): string[] {
  const controller = controllerOf(state, n);
  return [
    process.execPath, labCli(), 'agent',
    '--node', n.name,
    '--controller', controller.url,
    '--ca-file', controller.caFile,
    '--token-file', n.tokenFile,
    '--mode', state.mode,
    '--state-dir', n.stateDir,
    '--bpffs-dir', n.bpffsDir,
    '--pods-cgroup', n.podsCgroup,
    '--proxy-cgroup', n.proxyCgroup,
    '--listen', n.agentUrl.replace(/^http:\/\//, ''),
    '--netns', n.netns,
    '--proxy', state.proxy,
    '--proxy-address', n.gateway,
    '--node-addresses', `${n.gateway},${n.underlayIp}`,
    // Enrolment at pod creation: the agent chains fsm-node-cni into the node's lab CNI directory (lab pod add).
    '--cni-socket', join(n.stateDir, 'cni.sock'),
    '--cni-spool', join(n.stateDir, 'cni-spool'),
    '--cni-conf-dirs', labCniDirs(state, n.name).confDir,
    '--cni-bin-dir', labCniDirs(state, n.name).binDir,
  ];
}

/** The supervisor's own command line (run by `lab up` in the cgroup `<ctl>/supervisor`). */
export const supervisorArgv = (dir: string): string[] => [process.execPath, labCli(), 'lab', 'supervise', '--dir', dir];

// ---- the loop ------------------------------------------------------------------------

interface Slot {
  node: LabNode;
  run: AgentRun;
  delayMs: number;
  started: number;
  timer?: NodeJS.Timeout;
}

export interface SupervisorOptions {
  policy?: BackoffPolicy;
  /** The agent's command line (tests run a stand-in). */
  argv?: (state: LabState, n: LabNode) => string[];
  /** Stops the supervisor (the CLI aborts it on SIGTERM and SIGINT). */
  signal?: AbortSignal;
}

/**
 * Run until `signal` aborts or the lab state disappears: start every node's
 * agent, restart each one that exits. Resolves when stopped; the agents keep
 * running.
 */
export async function runSupervisor(dir: string, opts: SupervisorOptions = {}): Promise<void> {
  const policy = opts.policy ?? AGENT_BACKOFF;
  const argvOf = opts.argv ?? agentArgv;
  const state = readLabState(dir);
  if (!state) throw new LabError(`no lab in ${dir}: the supervisor is started by \`fsm-node lab up\``);
  const status: SupervisorStatus = { pid: process.pid, startedAt: new Date().toISOString(), updatedAt: '', agents: {} };
  let stopping = false;

  // One write at a time (the writer's temporary file is per process), always of the latest state.
  let writing: Promise<void> = Promise.resolve();
  const save = (): Promise<void> => {
    writing = writing.then(async () => {
      status.updatedAt = new Date().toISOString();
      await writeFileAtomic(supervisorFile(dir), `${JSON.stringify(status, null, 2)}\n`, 0o644).catch((err: unknown) => log.error({ err: errorMessage(err) }, 'cannot write the supervisor status'));
    });
    return writing;
  };

  const start = (slot: Slot): void => {
    slot.timer = undefined;
    delete slot.run.nextRestartAt;
    const { node } = slot;
    try {
      mkdirSync(node.stateDir, { recursive: true });
      const { child, proc } = spawnDetached(slot.run.cgroup, undefined, argvOf(state, node), slot.run.log);
      slot.started = Date.now();
      Object.assign(slot.run, { pid: proc.pid, running: true, startedAt: new Date(slot.started).toISOString() });
      log.info({ node: node.name, agentPid: proc.pid, restarts: slot.run.restarts }, 'agent started');
      child.once('exit', (code, signal) => exited(slot, code, signal));
    } catch (err) {
      // Could not even spawn (fork failed): treat it like an exit, so the backoff applies.
      log.error({ node: node.name, err: errorMessage(err) }, 'cannot start the agent');
      slot.started = Date.now();
      exited(slot, null, null, errorMessage(err));
      return;
    }
    void save();
  };

  const exited = (slot: Slot, code: number | null, signal: string | null, why?: string): void => {
    const ranMs = Date.now() - slot.started;
    const reason = why ?? describeExit(code, signal);
    slot.run.running = false;
    slot.run.lastExit = { at: new Date().toISOString(), code, signal, reason, ranSeconds: Math.round(ranMs / 100) / 10 };
    if (stopping) return void save();
    slot.delayMs = nextRestartDelay(slot.delayMs, ranMs, policy);
    slot.run.nextRestartAt = new Date(Date.now() + slot.delayMs).toISOString();
    log.warn({ node: slot.node.name, agentPid: slot.run.pid, reason, ranSeconds: slot.run.lastExit.ranSeconds, restartInMs: slot.delayMs }, 'agent exited; restarting it after the backoff');
    slot.timer = setTimeout(() => {
      if (stopping) return;
      slot.run.restarts += 1;
      start(slot);
    }, slot.delayMs);
    void save();
  };

  const slots = state.nodes.map((node): Slot => {
    const run: AgentRun = { cgroup: agentCgroup(state, node), log: agentLog(state, node), running: false, restarts: 0 };
    status.agents[node.name] = run;
    return { node, run, delayMs: 0, started: Date.now() };
  });
  for (const slot of slots) start(slot);
  await save();

  await new Promise<void>((resolve) => {
    // Never outlive the lab: without its state there is nothing to supervise.
    const watch = setInterval(() => {
      if (!existsSync(labFiles(dir).state)) stop(`${labFiles(dir).state} is gone`);
    }, 2000);
    const stop = (why: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'supervisor stops; the agents keep running');
      clearInterval(watch);
      for (const slot of slots) if (slot.timer) clearTimeout(slot.timer);
      for (const slot of slots) delete slot.run.nextRestartAt;
      status.stoppedAt = new Date().toISOString();
      void save().then(resolve);
    };
    if (opts.signal?.aborted) stop('stopped before it started');
    else opts.signal?.addEventListener('abort', () => stop(String(opts.signal?.reason ?? 'aborted')), { once: true });
  });
}
