import { spawn, type ChildProcess, type StdioOptions } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { LabProcess } from './state.js';

/**
 * Starting and stopping the lab's long-lived processes (controller, agents,
 * echo servers) so that they outlive `lab up` and are found again by
 * `lab down`: each starts detached, inside a cgroup it joins before exec (so a
 * cgroup sweep finds it, whatever happens to the pid files) and, for pods,
 * inside the pod's network namespace.
 */

const NETNS_DIR = '/run/netns';
// $0 is the cgroup; "$@" the command. Joining first means the command's very first instruction runs inside.
const ENTER = 'echo $$ > "$0/cgroup.procs" || exit 126; exec "$@"';

function argvInside(cgroup: string, netns: string | undefined, argv: string[]): string[] {
  const enter = netns ? ['nsenter', `--net=${join(NETNS_DIR, netns)}`, '--'] : [];
  return ['-c', ENTER, cgroup, ...enter, ...argv];
}

/**
 * Start a detached process (its own session: a signal to the starter's group
 * does not reach it) in a cgroup (and netns), stdout and stderr appended to
 * `log`. The child handle tells a parent that stays (the lab supervisor)
 * how it exited; the pid is the command's own (the shell execs it).
 */
export function spawnDetached(cgroup: string, netns: string | undefined, argv: string[], log: string): { child: ChildProcess; proc: LabProcess } {
  const out = openSync(log, 'a');
  try {
    const child = spawn('/bin/sh', argvInside(cgroup, netns, argv), { detached: true, stdio: ['ignore', out, out] });
    child.on('error', () => undefined);
    if (child.pid === undefined) throw new Error(`cannot start ${argv[0]}`);
    return { child, proc: { pid: child.pid, cgroup, log } };
  } finally {
    closeSync(out);
  }
}

/** Start a detached process that outlives this one (see spawnDetached). */
export function startDetached(cgroup: string, netns: string | undefined, argv: string[], log: string): LabProcess {
  const { child, proc } = spawnDetached(cgroup, netns, argv, log);
  child.unref();
  return proc;
}

/** Run a command in a pod (netns + cgroup) attached to this process's stdio or pipes. */
export function spawnInside(cgroup: string, netns: string, argv: string[], stdio: StdioOptions): ChildProcess {
  return spawn('/bin/sh', argvInside(cgroup, netns, argv), { stdio });
}

export function runInside(cgroup: string, netns: string, argv: string[], timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawnInside(cgroup, netns, argv, ['ignore', 'pipe', 'pipe']);
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, stdout, stderr: stderr + err.message });
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.startsWith('Z');
  } catch {
    return false;
  }
}

/** The cgroup v2 path of a process relative to the mount ("0::/a/b"), or undefined when it is gone. */
export function cgroupOf(pid: number): string | undefined {
  try {
    const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'));
    return line?.slice(3);
  } catch {
    return undefined;
  }
}

/** Guard against pid reuse: only a live process inside the cgroup we started it in is ours. */
export function isOurs(p: LabProcess): boolean {
  const cg = cgroupOf(p.pid);
  return cg !== undefined && cg !== '/' && p.cgroup.endsWith(cg) && pidAlive(p.pid);
}

/** SIGTERM, wait up to graceMs, then SIGKILL. Returns whether the process was ours and running. */
export async function stopProcess(p: LabProcess | undefined, graceMs = 5000): Promise<boolean> {
  if (!p || !isOurs(p)) return false;
  process.kill(p.pid, 'SIGTERM');
  const deadline = Date.now() + graceMs;
  while (pidAlive(p.pid) && Date.now() < deadline) await sleep(50);
  if (pidAlive(p.pid)) process.kill(p.pid, 'SIGKILL');
  return true;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** The last lines of a log file, for error messages. */
export function tail(file: string, lines = 15): string {
  if (!existsSync(file)) return `(no log at ${file})`;
  const text = readFileSync(file, 'utf8').trimEnd().split('\n');
  return text.slice(-lines).join('\n');
}
