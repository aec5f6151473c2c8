import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeLabState, type LabState } from '../../src/lab/state.js';
import { readSupervisorStatus, runSupervisor, type SupervisorStatus } from '../../src/lab/supervisor.js';

/**
 * The supervisor loop with stand-in agents (real processes, no root): a
 * plain directory takes the place of each agent's cgroup (the start script
 * only writes its pid into `<cgroup>/cgroup.procs`). n1's stand-in exits at
 * once, every time; n2's runs until killed.
 */

const alive = (pid: number | undefined): boolean => {
  try {
    return pid !== undefined && process.kill(pid, 0);
  } catch {
    return false;
  }
};

async function until(what: string, dir: string, fn: (s: SupervisorStatus) => boolean, timeoutMs = 15_000): Promise<SupervisorStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = readSupervisorStatus(dir);
    if (s && fn(s)) return s;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms; status ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

// The supervisor starts agents through /bin/sh (join the cgroup, then exec).
// Under qemu-user (the arm64 proof's unit stage exports QEMU_LD_PREFIX) that
// host shell cannot exec the arm64 node without a binfmt_misc handler, so the
// loop is proven by the x86 unit tier and the e2e tier instead.
const underQemuUser = process.env.QEMU_LD_PREFIX !== undefined;
if (underQemuUser) console.warn('SKIP lab supervisor loop: under qemu-user the supervisor\'s /bin/sh cannot exec the arm64 node (no binfmt_misc)');

(underQemuUser ? describe.skip : describe)('lab supervisor loop', () => {
  let dir: string;
  const started: number[] = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'fsmlab-sup-'));
    const ctl = join(dir, 'ctl');
    for (const d of [join(ctl, 'agent-n1'), join(ctl, 'agent-n2'), join(dir, 'logs')]) mkdirSync(d, { recursive: true });
    const node = (i: number): LabState['nodes'][number] => ({
      name: `n${i}`, index: i, netns: `fsmlab-n${i}`, gateway: `10.77.${i}.1`, underlayIp: `10.78.0.${i}`, podCidr: `10.77.${i}.0/24`,
      podsCgroup: '', proxyCgroup: '', bpffsDir: '', stateDir: join(dir, 'nodes', `n${i}`, 'state'), tokenFile: '', agentUrl: `http://127.0.0.1:1590${i}`,
    });
    writeLabState({
      version: 1, prefix: 'fsmlab', dir, createdAt: new Date().toISOString(), mode: 'auto', proxy: 'passthrough', proxyNote: '',
      controllerCgroupRoot: ctl, controller: { url: 'https://127.0.0.1:15443', stateDir: join(dir, 'controller'), caFile: join(dir, 'ca.crt') },
      nodes: [node(1), node(2)], pods: [],
    });
  });

  afterEach(() => {
    for (const pid of started) if (alive(pid)) process.kill(pid, 'SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  test('restarts what exits with doubling, capped backoff, knows how it ended, and leaves the agents running when stopped', async () => {
    const stop = new AbortController();
    const argv = (_s: LabState, n: LabState['nodes'][number]): string[] =>
      n.name === 'n1' ? [process.execPath, '-e', 'process.exit(3)'] : [process.execPath, '-e', 'setInterval(() => {}, 1000)'];
    const running = runSupervisor(dir, { policy: { initialMs: 20, maxMs: 80, resetAfterMs: 60_000 }, argv, signal: stop.signal });
    try {
      // n1 dies every time: by its 4th restart the delay has doubled up to the cap (20, 40, 80, 80 ...).
      const s1 = await until('n1 restarted 4 times and waiting', dir, (s) => s.agents.n1!.restarts >= 4 && !s.agents.n1!.running && s.agents.n1!.nextRestartAt !== undefined);
      const n1 = s1.agents.n1!;
      expect(n1.lastExit).toMatchObject({ code: 3, signal: null, reason: 'exited with code 3' });
      const delay = Date.parse(n1.nextRestartAt!) - Date.parse(n1.lastExit!.at);
      expect(delay).toBeGreaterThanOrEqual(80);
      expect(delay).toBeLessThanOrEqual(85);

      // n2 runs; killed, it comes back as a new process, and the supervisor says how it ended.
      const first = s1.agents.n2!;
      expect(first).toMatchObject({ running: true, restarts: 0 });
      started.push(first.pid!);
      process.kill(first.pid!, 'SIGKILL');
      const s2 = await until('n2 restarted', dir, (s) => s.agents.n2!.restarts === 1 && s.agents.n2!.running);
      const n2 = s2.agents.n2!;
      started.push(n2.pid!);
      expect(n2.pid).not.toBe(first.pid);
      expect(alive(n2.pid)).toBe(true);
      expect(n2.lastExit).toMatchObject({ code: null, signal: 'SIGKILL', reason: 'killed by SIGKILL' });
    } finally {
      stop.abort('test done');
      await running;
    }
    const end = readSupervisorStatus(dir)!;
    expect(end.stoppedAt).toBeDefined();
    // Stopping the supervisor is not stopping the agents (kubelet going away does not kill pods).
    expect(alive(end.agents.n2!.pid)).toBe(true);
    // And nothing restarts any more.
    const restarts = end.agents.n1!.restarts;
    await new Promise((r) => setTimeout(r, 300));
    expect(readSupervisorStatus(dir)!.agents.n1!.restarts).toBe(restarts);
  }, 30_000);

  test('stops by itself when the lab state goes away', async () => {
    const running = runSupervisor(dir, { argv: () => [process.execPath, '-e', 'setInterval(() => {}, 1000)'] });
    const s = await until('agents started', dir, (x) => x.agents.n1!.running && x.agents.n2!.running);
    started.push(s.agents.n1!.pid!, s.agents.n2!.pid!);
    rmSync(join(dir, 'lab.json'));
    await running;
    expect(readSupervisorStatus(dir)!.stoppedAt).toBeDefined();
  }, 30_000);
});
