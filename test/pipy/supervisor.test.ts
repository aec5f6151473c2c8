import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Topology, type TopoNode } from '../../src/lab/topology.js';
import { findPipy } from '../../src/proxy/pipy.js';
import { ProxySupervisor, type ProxyStatus, type ProxySupervisorOptions } from '../../src/proxy/supervisor.js';
import { cgroupPids } from '../../src/util/cgroup.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';

/**
 * The supervisor with real Pipy, in a private node namespace of the lab
 * topology (the agent side stays in the host namespace, as in the lab). The
 * program is the test responder in test/fixtures/pipy/main.js, which answers
 * HTTP with the config version it loaded. Load comes from wrk inside the
 * node namespace; "0 failed requests" means no socket error and no non-2xx.
 */

const root = fileURLToPath(new URL('../../', import.meta.url));
const PROGRAM = join(root, 'test/fixtures/pipy');
const HOST = join(root, 'test/fixtures/pipy/supervisor-host.ts');
const TS_REGISTER = join(root, 'test/support/ts-register.mjs');

let pipyBin: string | undefined;
try {
  pipyBin = findPipy();
} catch (err) {
  console.log(`SKIP pipy tier (proxy supervisor): ${(err as Error).message}`);
}
const describeWithPipy = pipyBin ? describe : describe.skip;

interface WrkResult {
  requests: number;
  socketErrors: number;
  non2xx: number;
  text: string;
}

function parseWrk(text: string): WrkResult {
  const requests = Number(/(\d+) requests in/.exec(text)?.[1] ?? NaN);
  const se = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(text);
  const socketErrors = se ? se.slice(1).reduce((a, b) => a + Number(b), 0) : 0;
  return { requests, socketErrors, non2xx: Number(/Non-2xx or 3xx responses: (\d+)/.exec(text)?.[1] ?? 0), text };
}

describeWithPipy('proxy supervisor with real Pipy', () => {
  let topo: Topology;
  let node: TopoNode;
  let dir: string;
  const sups: ProxySupervisor[] = [];
  const hosts: ChildProcess[] = [];

  beforeAll(async () => {
    topo = await Topology.create({ prefix: uniqueTestPrefix(), nodes: 1 });
    node = topo.nodes[0]!;
  });
  afterAll(async () => {
    await topo?.destroy();
  });
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'fsm-pipy-sup-'));
  });
  afterEach(async () => {
    for (const h of hosts.splice(0)) h.kill('SIGKILL');
    for (const s of sups.splice(0)) await s.stop(2000);
    rmSync(dir, { recursive: true, force: true });
  });

  const options = (): ProxySupervisorOptions => ({
    kind: 'pipy',
    stateDir: join(dir, 'state'),
    cgroup: node.proxyCgroup,
    netns: node.netns,
    address: '127.0.0.1',
    outboundPort: 15001,
    inboundPort: 15003,
    checkIntervalMs: 100,
    // The responder has no drain (proxy/drain.js): the SIGHUP path here; the hand-over with the real program is test/pipy/reload-handover.test.ts.
    pipy: { bin: pipyBin!, programDir: PROGRAM, adminPort: 6060, threadCap: 2, reload: 'signal' },
    initialConfig: { version: 0, outboundPort: 15001, inboundPort: 15003 },
    drainMs: 5000,
  });
  const supervisor = (): ProxySupervisor => {
    const s = new ProxySupervisor(options());
    sups.push(s);
    return s;
  };
  const config = (version: number): object => ({ version, outboundPort: 15001, inboundPort: 15003 });
  const get = async (): Promise<string> => (await node.run('curl', ['-s', '--max-time', '2', 'http://127.0.0.1:15001/'])).stdout;
  /** The distinct answers of 40 new connections: the reuseport hash of their source ports spreads them over every instance. */
  const answers = async (): Promise<string[]> => {
    const r = await node.run('sh', ['-c', 'for i in $(seq 1 40); do curl -s --max-time 2 http://127.0.0.1:15001/; done']);
    return [...new Set(r.stdout.split('\n').filter(Boolean))];
  };
  const wrk = async (seconds: number, connections = 20): Promise<WrkResult> =>
    parseWrk((await node.run('wrk', ['-t1', `-c${connections}`, `-d${seconds}s`, 'http://127.0.0.1:15001/'])).stdout);
  const pipyPids = async (): Promise<number[]> => cgroupPids(node.proxyCgroup);

  test('starts in its cgroup and netns, listens, answers with the initial config', async () => {
    const sup = supervisor();
    await sup.start();
    await sup.waitReady();
    await sup.waitReady(10_000, { all: true });
    const st = sup.status();
    expect(st).toMatchObject({ kind: 'pipy', up: true, listening: true, restarts: 0, instanceCount: 2, threads: 2 });
    expect(st.version).toEqual(expect.any(String));
    // Two instances (the default), one thread each, both listening on the shared ports.
    expect(st.instances.map((i) => [i.threads, i.listening, i.adminPort])).toEqual([[1, true, 6060], [1, true, 6061]]);
    expect((await pipyPids()).sort()).toEqual(st.instances.map((i) => i.pid).sort());
    expect(await get()).toBe('version=0\n');
    // Pipy's own metrics, fetched from inside the node namespace, summed over both instances.
    expect(await sup.metrics()).toMatch(/^pipy_inbound_count/m);
  });

  test('100 config changes under load: every one acknowledged, 0 failed requests', async () => {
    const sup = supervisor();
    await sup.start();
    await sup.waitReady();
    const load = wrk(4);
    const ms: number[] = [];
    for (let v = 1; v <= 100; v++) {
      const r = await sup.deliver(config(v));
      expect(r.applied).toBe(true);
      ms.push(r.ms);
      await new Promise((r) => setTimeout(r, 20));
    }
    const result = await load;
    console.log(`reload under load: ${result.requests} requests, ack p50 ${ms.sort((a, b) => a - b)[50]!.toFixed(1)} ms, max ${ms[99]!.toFixed(1)} ms`);
    expect(result.requests).toBeGreaterThan(0);
    expect({ socketErrors: result.socketErrors, non2xx: result.non2xx }).toEqual({ socketErrors: 0, non2xx: 0 });
    expect(await get()).toBe('version=100\n');
  });

  test('kill -9 of each instance: it comes back with the last delivered config, the other keeps serving', async () => {
    const sup = supervisor();
    await sup.start();
    await sup.waitReady(10_000, { all: true });
    await sup.deliver(config(42));
    for (const slot of [0, 1]) {
      const first = sup.status().instances[slot]!.pid!;
      const other = sup.status().instances[1 - slot]!.pid!;
      const t0 = performance.now();
      process.kill(first, 'SIGKILL');
      expect(await get()).toBe('version=42\n');
      const st = await eventually(async () => sup.status(), (s) => s.instances[slot]!.listening && s.instances[slot]!.pid !== first, 10_000);
      console.log(`restart of instance ${slot} after kill -9: listening again after ${(performance.now() - t0).toFixed(0)} ms`);
      expect(st.instances[slot]).toMatchObject({ restarts: 1, crashes: 1, listening: true });
      expect(st.instances[1 - slot]!.pid).toBe(other);
    }
    expect(sup.status()).toMatchObject({ restarts: 2, crashes: 2, listening: true });
    // The restarted instances run the delivered config too.
    expect(await answers()).toEqual(['version=42']);
  });

  test('one instance: kill -9 leaves the node without a listener until the restart', async () => {
    const sup = new ProxySupervisor({ ...options(), pipy: { ...options().pipy, instances: 1 } });
    sups.push(sup);
    await sup.start();
    await sup.waitReady();
    const first = sup.status().pid!;
    process.kill(first, 'SIGKILL');
    await eventually(async () => sup.ready(), (r) => !r, 5000);
    const st = await eventually(async () => sup.status(), (s) => s.listening && s.pid !== first, 10_000);
    expect(st).toMatchObject({ restarts: 1, crashes: 1, instanceCount: 1 });
  });

  test('agent SIGKILL and restart while traffic flows: 0 failed requests, one proxy afterwards', async () => {
    const startHost = async (): Promise<ProxyStatus> => {
      const h = spawn(process.execPath, ['--import', TS_REGISTER, HOST, JSON.stringify(options())], { stdio: ['ignore', 'pipe', 'inherit'] });
      hosts.push(h);
      const line = await new Promise<string>((resolve, reject) => {
        let out = '';
        h.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('\n')) resolve(out.split('\n')[0]!);
        });
        h.once('exit', (code) => reject(new Error(`supervisor host exited ${code}`)));
      });
      return JSON.parse(line) as ProxyStatus;
    };
    const first = await startHost();
    expect(first.adopted).toBe(false);
    const load = wrk(4);
    await new Promise((r) => setTimeout(r, 1000));
    hosts[0]!.kill('SIGKILL');
    await new Promise((r) => setTimeout(r, 500));
    const second = await startHost();
    const result = await load;
    expect(second).toMatchObject({ pid: first.pid, adopted: true });
    expect(second.instances.map((i) => i.pid)).toEqual(first.instances.map((i) => i.pid));
    expect((await pipyPids()).sort()).toEqual(first.instances.map((i) => i.pid).sort());
    expect(result.requests).toBeGreaterThan(0);
    expect({ socketErrors: result.socketErrors, non2xx: result.non2xx }).toEqual({ socketErrors: 0, non2xx: 0 });
    // Leave the proxy to this test's cleanup: a supervisor that adopts and stops it.
    hosts.splice(0).forEach((h) => h.kill('SIGKILL'));
    const sup = supervisor();
    await sup.start();
    expect(sup.status().adopted).toBe(true);
  });

  test('upgrade: new instance beside the old on the same ports, old drained, 0 failed requests', async () => {
    const sup = supervisor();
    await sup.start();
    await sup.waitReady();
    await sup.deliver(config(7));
    const old = sup.status().instances.map((i) => i.pid!);
    const load = wrk(4);
    await new Promise((r) => setTimeout(r, 1000));
    await sup.upgrade('test');
    const result = await load;
    const st = sup.status();
    expect(st).toMatchObject({ upgrades: 1, listening: true });
    // The new set on admin ports disjoint from the old set's.
    expect(st.instances.map((i) => i.adminPort)).toEqual([6062, 6063]);
    expect(st.instances.map((i) => i.pid)).not.toContain(old[0]);
    expect((await pipyPids()).sort()).toEqual(st.instances.map((i) => i.pid).sort());
    expect(await get()).toBe('version=7\n');
    expect((await node.run('cat', ['/proc/sys/net/ipv4/tcp_migrate_req'])).stdout.trim()).toBe('1');
    expect(result.requests).toBeGreaterThan(0);
    expect({ socketErrors: result.socketErrors, non2xx: result.non2xx }).toEqual({ socketErrors: 0, non2xx: 0 });
  });

  test('the previous version\'s single 2-thread proxy is adopted and replaced by two 1-thread instances under load: 0 failed requests', async () => {
    const old = new ProxySupervisor({ ...options(), pipy: { ...options().pipy, instances: 1 } });
    sups.push(old);
    await old.start();
    await old.waitReady();
    await old.deliver(config(5));
    const oldPid = old.status().pid!;
    expect(old.status().threads).toBe(2);
    old.detach();
    // What the previous version wrote: the one instance object.
    const file = join(dir, 'state', 'proxy.json');
    writeFileSync(file, JSON.stringify((JSON.parse(readFileSync(file, 'utf8')) as { instances: unknown[] }).instances[0]));
    const load = wrk(5);
    await new Promise((r) => setTimeout(r, 1000));
    const sup = supervisor();
    await sup.start();
    expect(sup.status()).toMatchObject({ adopted: true, pid: oldPid });
    const st = await eventually(async () => sup.status(), (x) => x.upgrades === 1, 20_000);
    const result = await load;
    expect(st.instances.map((i) => [i.threads, i.listening])).toEqual([[1, true], [1, true]]);
    expect((await pipyPids()).sort()).toEqual(st.instances.map((i) => i.pid).sort());
    expect(await answers()).toEqual(['version=5']);
    expect(result.requests).toBeGreaterThan(0);
    expect({ socketErrors: result.socketErrors, non2xx: result.non2xx }).toEqual({ socketErrors: 0, non2xx: 0 });
  });

  test('the admin liveness probe reaches a healthy proxy in its namespace: never killed', async () => {
    const sup = new ProxySupervisor({ ...options(), liveness: { intervalMs: 100, timeoutMs: 1000, failures: 2 } });
    sups.push(sup);
    await sup.start();
    await sup.waitReady();
    await sup.waitReady(10_000, { all: true });
    const pids = sup.status().instances.map((i) => i.pid);
    const { probeAdmin } = await import('../../src/proxy/health.js');
    const t0 = performance.now();
    expect(await probeAdmin(6060, 1000, `/proc/${pids[0]}/ns/net`)).toBe(true);
    console.log(`admin probe through nsenter: ${(performance.now() - t0).toFixed(0)} ms`);
    expect(await probeAdmin(6061, 1000, `/proc/${pids[0]}/ns/net`)).toBe(true);
    expect(await probeAdmin(6062, 1000, `/proc/${pids[0]}/ns/net`)).toBe(false);
    await new Promise((r) => setTimeout(r, 1500));
    expect(sup.status()).toMatchObject({ restarts: 0, crashes: 0 });
    expect(sup.status().instances.map((i) => i.pid)).toEqual(pids);
  });

  test('runs as uid 1500 when configured, still listening and reloading', async () => {
    chmodSync(dir, 0o755); // the codebase under the state dir must be readable by the proxy's uid
    const sup = new ProxySupervisor({ ...options(), runAs: { uid: 1500, gid: 1500 } });
    sups.push(sup);
    await sup.start();
    await sup.waitReady(10_000, { all: true });
    for (const i of sup.status().instances) {
      const status = readFileSync(`/proc/${i.pid}/status`, 'utf8');
      expect(/^Uid:\s+(\d+)/m.exec(status)?.[1]).toBe('1500');
    }
    expect(await sup.deliver(config(3))).toMatchObject({ applied: true });
    expect(await get()).toBe('version=3\n');
  });

  test('graceful stop: SIGINT drains and the proxy is gone', async () => {
    const sup = supervisor();
    await sup.start();
    await sup.waitReady();
    expect(await sup.stop(5000)).toBe(true);
    expect(await pipyPids()).toEqual([]);
  });
});
