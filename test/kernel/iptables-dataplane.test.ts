import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { IptablesDataplane, RestoreError } from '../../src/dataplane/iptables/index.js';
import { tokenize } from '../../src/dataplane/iptables/tables.js';
import { noExclusions, type DesiredState, type PodIntercept } from '../../src/dataplane/types.js';
import { InvalidInputError } from '../../src/errors.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { run } from '../../src/util/exec.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer, waitForOutput, type Server } from '../support/traffic.js';

/**
 * The iptables dataplane against the real kernel, only ever inside the
 * topology's node namespaces: create -> verify -> delete -> nothing left ->
 * create again -> tamper -> repaired -> idempotent; a failing transaction
 * keeps the previous state; backend detection and its persistence. Traffic
 * through the proxy in every mode is the conformance suite's job; one
 * redirect here proves the rules do what the state says.
 */

const root = join(dirname(fileURLToPath(import.meta.url)), '../..');
const ECHO_PORT = 8080;

/**
 * Everything of ours in a node namespace, as text: both iptables backends and
 * the sets. Set headers keep their initval (random per created set), so a set
 * that was re-created or swapped shows; `withoutIds` drops it where a
 * repair legitimately swapped a set.
 */
async function footprint(node: TopoNode): Promise<string[]> {
  const lines: string[] = [];
  for (const b of ['legacy', 'nft']) {
    const r = await node.run(`iptables-${b}-save`, []);
    for (const l of r.stdout.split('\n')) if (!l.startsWith('#') && /fsmn/i.test(l)) lines.push(`${b} ${l}`);
  }
  const sets = await node.run('ipset', ['save']);
  for (const l of sets.stdout.split('\n')) if (/ fsmn-/.test(l)) lines.push(l);
  return lines.sort();
}

function withoutIds(lines: string[]): string[] {
  return lines.map((l) => l.replace(/ initval 0x[0-9a-f]+/, ''));
}

async function sh(node: TopoNode, cmd: string, args: string[]): Promise<string> {
  const r = await node.run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} in ${node.netns}: ${r.stderr}`);
  return r.stdout;
}

function podIntercept(p: TopoPod, over: Partial<PodIntercept> = {}): PodIntercept {
  return { uid: `uid-${p.name}`, namespace: 'test', name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive', exclusions: noExclusions(), ...over };
}

function desiredFor(node: TopoNode, pods: PodIntercept[], over: Partial<DesiredState> = {}): DesiredState {
  return {
    proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: ['10.78.0.2'],
    mesh: { ...noExclusions(), outboundPorts: [22] },
    pods,
    ...over,
  };
}

async function hostFsmLines(): Promise<number> {
  const save = await run('iptables-save', [], { allowFail: true });
  const sets = await run('ipset', ['list', '-n'], { allowFail: true });
  return [...save.stdout.split('\n'), ...sets.stdout.split('\n')].filter((l) => /fsm/i.test(l)).length;
}

describe('iptables dataplane (kernel, topology node namespaces)', () => {
  const prefix = uniqueTestPrefix();
  const stateDirs: string[] = [];
  const dataplanes: IptablesDataplane[] = [];
  const children: ChildProcess[] = [];
  const servers: Server[] = [];
  let topo: Topology;
  let n1: TopoNode;
  let n2: TopoNode;
  let hostBefore: number;

  const stateDir = (): string => {
    const d = mkdtempSync(join(tmpdir(), `${prefix}-iptables-`));
    stateDirs.push(d);
    return d;
  };
  const dataplane = (opts: ConstructorParameters<typeof IptablesDataplane>[0]): IptablesDataplane => {
    const dp = new IptablesDataplane(opts);
    dataplanes.push(dp);
    return dp;
  };

  beforeAll(async () => {
    hostBefore = await hostFsmLines();
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 2 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
  });

  afterAll(async () => {
    for (const s of servers) await s.stop().catch(() => undefined);
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const dp of dataplanes) {
      await dp.cleanup().catch(() => undefined);
      await dp.close().catch(() => undefined);
    }
    await topo?.destroy();
    for (const d of stateDirs) rmSync(d, { recursive: true, force: true });
  });

  describe('lifecycle on node 1', () => {
    const hooks: { fail?: string } = {};
    let dp: IptablesDataplane;
    let dir: string;
    let pods: PodIntercept[];

    beforeAll(() => {
      dir = stateDir();
      dp = dataplane({
        netns: n1.netns,
        stateDir: dir,
        hooks: { beforeRestore: (table, text) => (hooks.fail === table ? text.replace('COMMIT', '-A FSMN_BROKEN -j NOWHERE\nCOMMIT') : text) },
      });
      const [p1, p2] = n1.pods as [TopoPod, TopoPod];
      pods = [
        podIntercept(p1, { exclusions: { ...noExclusions(), outboundPorts: [9999], outboundCidrs: ['192.0.2.0/24'] } }),
        podIntercept(p2, { inbound: 'strict', exclusions: { ...noExclusions(), inboundPorts: [8081] } }),
      ];
    });

    test('nothing of ours before the first sync', async () => {
      expect(await footprint(n1)).toEqual([]);
    });

    test('create: the first sync is full and installs exactly the rendered rules and sets', async () => {
      const r = await dp.apply(desiredFor(n1, pods));
      expect(r.full).toBe(true);
      expect(r.changes).toBeGreaterThan(10);
      const nat = await sh(n1, 'iptables-nft-save', ['-t', 'nat']);
      expect(nat).toContain(`-A PREROUTING -p tcp -m set --match-set fsmn-pods src -m comment --comment "fsm-node: mesh pods outbound TCP to the node proxy" -j FSMN_OUTBOUND`);
      expect(nat).toContain(`-A FSMN_OUTBOUND -p tcp -j DNAT --to-destination ${n1.gateway}:15001`);
      expect(nat).toContain(`-A FSMN_OUTBOUND -s ${pods[0]?.ip}/32 -d 192.0.2.0/24 -j RETURN`);
      const filter = await sh(n1, 'iptables-nft-save', ['-t', 'filter']);
      expect(filter).toContain('-A FSMN_INBOUND -p tcp -j REJECT --reject-with tcp-reset');
      const sets = await sh(n1, 'ipset', ['save']);
      expect(sets).toContain(`add fsmn-pods ${pods[0]?.ip} comment "uid-p1"`);
      expect(sets).toContain(`add fsmn-out-ports ${pods[0]?.ip},tcp:9999`);
      expect(sets).toContain(`add fsmn-strict ${pods[1]?.ip}`);
      expect(sets).toContain(`add fsmn-in-ports ${pods[1]?.ip},tcp:8081`);
    });

    test('verify: installed() reads pods and backend back from the kernel; the choice is persisted', async () => {
      const inst = await dp.installed();
      expect(inst.pods).toEqual(['uid-p1', 'uid-p2']);
      expect(inst.detail).toMatchObject({ backend: 'nft', netns: n1.netns, jumps: { nat: 1, filter: 1 }, sets: { 'fsmn-pods': 2, 'fsmn-strict': 1 } });
      expect(JSON.parse(readFileSync(join(dir, 'iptables-backend.json'), 'utf8'))).toMatchObject({ backend: 'nft', source: 'default' });
    });

    test('verify with traffic: a pod connection reaches the proxy with its original destination', async () => {
      const [p1, p2] = n1.pods as [TopoPod, TopoPod];
      servers.push(await startEchoServer(p2, 'p2', ECHO_PORT));
      const logFile = join(dir, 'proxy.jsonl');
      const proxy = n1.exec(process.execPath, ['--import', join(root, 'test/support/ts-register.mjs'), join(root, 'src/proxy/passthrough.ts'), '--listen', `${n1.gateway}:15001`, '--log', logFile], {
        inProxyCgroup: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.push(proxy);
      await waitForOutput(proxy, 'listening');
      const viaProxy = await echo(p1, p2.ip, ECHO_PORT);
      expect(viaProxy).toMatchObject({ outcome: 'ok', intact: true, banner: `p2 ${n1.gateway}` });
      const records = readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { event: string; source: string; originalDst: unknown });
      expect(records.find((r) => r.event === 'open')).toMatchObject({ source: p1.ip, originalDst: { address: p2.ip, port: ECHO_PORT } });
      // Not enrolled (p3 is on node 2, but the rule is about the source): a non-mesh source reaching strict p2 is reset.
      const fromNode2 = await echo(n2.pods[0] as TopoPod, p2.ip, ECHO_PORT);
      expect(fromNode2).toMatchObject({ outcome: 'error', code: 'ECONNREFUSED' });
      proxy.kill('SIGTERM');
      await once(proxy, 'exit');
    });

    test('idempotent: a second sync and a full sync change nothing', async () => {
      const before = await footprint(n1);
      expect(await dp.apply(desiredFor(n1, pods))).toMatchObject({ full: false, changes: 0 });
      expect(await dp.apply(desiredFor(n1, pods), { full: true })).toMatchObject({ full: true, changes: 0 });
      expect(await footprint(n1)).toEqual(before);
    });

    test('enrolling a pod without annotations is one set operation, no rule changes', async () => {
      const rules = (await footprint(n1)).filter((l) => !l.startsWith('add '));
      const extra = { uid: 'uid-extra', namespace: 'test', name: 'extra', ip: '10.77.1.200', cgroupPath: '/nonexistent', inbound: 'permissive' as const, exclusions: noExclusions() };
      expect(await dp.apply(desiredFor(n1, [...pods, extra]))).toMatchObject({ full: false, changes: 1 });
      expect((await footprint(n1)).filter((l) => !l.startsWith('add '))).toEqual(rules);
      expect(await dp.apply(desiredFor(n1, pods))).toMatchObject({ full: false, changes: 1 });
    });

    test('bad input: a clear error naming the field, nothing changed', async () => {
      const before = await footprint(n1);
      const bad = desiredFor(n1, pods);
      bad.mesh.outboundCidrs = ['10.0.0.0/40'];
      await expect(dp.apply(bad)).rejects.toThrow(/mesh\.outboundCidrs\[0\] "10\.0\.0\.0\/40"/);
      const badPort = desiredFor(n1, [{ ...(pods[0] as PodIntercept), exclusions: { ...noExclusions(), inboundPorts: [70000] } }]);
      await expect(dp.apply(badPort)).rejects.toThrow(InvalidInputError);
      expect(await footprint(n1)).toEqual(before);
    });

    test('a failing transaction keeps the previous state, is counted, and makes the next sync full', async () => {
      const before = await footprint(n1);
      const failuresBefore = dp.stats.failures;
      // Changes in both tables and in the sets: nat commits first, then filter fails and everything is undone.
      const next = desiredFor(n1, [...pods, { ...podIntercept(n1.pods[0] as TopoPod), uid: 'uid-new', ip: '10.77.1.201', name: 'new' }], {
        mesh: { ...noExclusions(), outboundPorts: [22, 2222], inboundPorts: [9000] },
      });
      hooks.fail = 'filter';
      const err = await dp.apply(next).catch((e: unknown) => e);
      hooks.fail = undefined;
      expect(err).toBeInstanceOf(RestoreError);
      expect((err as RestoreError).details).toMatchObject({ table: 'filter' });
      // The log carries the lines around the one iptables-restore names (nft names the COMMIT for a bad jump target).
      expect((err as Error).message).toMatch(/failed at line \d+/);
      expect(((err as RestoreError).details?.around as string[]).some((l) => l.includes('-A FSMN_BROKEN -j NOWHERE'))).toBe(true);
      expect(await footprint(n1)).toEqual(before);
      expect(dp.stats.failures).toBe(failuresBefore + 1);
      const r = await dp.apply(next);
      expect(r.full).toBe(true);
      expect(await dp.apply(next)).toMatchObject({ full: false, changes: 0 });
      await dp.apply(desiredFor(n1, pods));
    });

    test('delete: cleanup removes every chain, jump and set of ours and the state file; nothing left', async () => {
      const report = await dp.cleanup();
      expect(report.removed).toEqual(
        expect.arrayContaining(['nft nat chain FSMN_OUTBOUND', 'nft filter chain FSMN_INBOUND', 'ipset fsmn-pods', 'ipset fsmn-proxy-src', `state file ${join(dir, 'iptables-backend.json')}`]),
      );
      expect(report.removed.filter((l) => l.includes(' rule: '))).toHaveLength(2);
      expect(await footprint(n1)).toEqual([]);
      expect(existsSync(join(dir, 'iptables-backend.json'))).toBe(false);
      expect(await dp.installed()).toMatchObject({ pods: [] });
    });

    test('create again, then tampering is repaired', async () => {
      const desired = desiredFor(n1, pods);
      expect(await dp.apply(desired)).toMatchObject({ full: true });
      const good = await footprint(n1);
      const jump = (await sh(n1, 'iptables-nft-save', ['-t', 'nat'])).split('\n').find((l) => l.startsWith('-A PREROUTING') && l.includes('FSMN_OUTBOUND')) as string;

      // A deleted chain (with its jump): the cheap check of a non-full sync sees it and goes full.
      await sh(n1, 'iptables-nft', ['-t', 'nat', ...tokenize(jump.replace('-A', '-D'))]);
      await sh(n1, 'iptables-nft', ['-t', 'nat', '-F', 'FSMN_OUTBOUND']);
      await sh(n1, 'iptables-nft', ['-t', 'nat', '-X', 'FSMN_OUTBOUND']);
      expect(await dp.apply(desired)).toMatchObject({ full: true });
      expect(await footprint(n1)).toEqual(good);

      // A flushed set: the same.
      await sh(n1, 'ipset', ['flush', 'fsmn-pods']);
      expect(await dp.apply(desired)).toMatchObject({ full: true, changes: 2 });
      expect(withoutIds(await footprint(n1))).toEqual(withoutIds(good));

      // A rule inserted in our chain: invisible to the cheap check by design, repaired by the periodic full sync.
      await sh(n1, 'iptables-nft', ['-t', 'nat', '-I', 'FSMN_OUTBOUND', '1', '-j', 'RETURN']);
      expect(await dp.apply(desired, { full: true })).toMatchObject({ full: true, changes: 1 });
      expect(withoutIds(await footprint(n1))).toEqual(withoutIds(good));

      // The third sync makes no change, full or not.
      expect(await dp.apply(desired, { full: true })).toMatchObject({ full: true, changes: 0 });
      expect(await dp.apply(desired)).toMatchObject({ full: false, changes: 0 });
      expect(dp.stats.tamperRepairs).toBeGreaterThanOrEqual(2);
    });
  });

  describe('backend detection on node 2', () => {
    const seeded = ['-A INPUT -s 192.0.2.1/32 -j ACCEPT', '-A INPUT -s 192.0.2.2/32 -j ACCEPT', '-A INPUT -s 192.0.2.3/32 -j ACCEPT'];

    test('rules pre-seeded in iptables-legacy: legacy is chosen, persisted, kept after a restart, and others\' rules survive cleanup', async () => {
      for (const rule of seeded) await sh(n2, 'iptables-legacy', rule.split(' '));
      const dir = stateDir();
      const desired = desiredFor(n2, [podIntercept(n2.pods[0] as TopoPod)]);
      const first = dataplane({ netns: n2.netns, stateDir: dir });
      await first.apply(desired);
      expect(first.backendChoice).toMatchObject({ backend: 'legacy', source: 'rule-count' });
      expect((await first.installed()).detail).toMatchObject({ backend: 'legacy' });
      expect(await sh(n2, 'iptables-legacy-save', ['-t', 'nat'])).toContain(':FSMN_OUTBOUND');
      expect(await sh(n2, 'iptables-nft-save', [])).not.toMatch(/fsmn/i);
      await first.close();

      // Now nft holds more rules than legacy: a fresh detection would pick nft. The state file keeps legacy.
      for (let i = 1; i <= 10; i++) await sh(n2, 'iptables-nft', ['-A', 'INPUT', '-s', `198.51.100.${i}`, '-j', 'ACCEPT']);
      const restarted = dataplane({ netns: n2.netns, stateDir: dir });
      expect(await restarted.apply(desired)).toMatchObject({ full: true, changes: 0 });
      expect(restarted.backendChoice).toMatchObject({ backend: 'legacy', source: 'state-file' });
      await restarted.close();

      // Without the state file our own chains still say where we were.
      const noState = dataplane({ netns: n2.netns });
      expect(await noState.apply(desired)).toMatchObject({ changes: 0 });
      expect(noState.backendChoice).toMatchObject({ backend: 'legacy', source: 'installed-chains' });

      await noState.cleanup();
      expect(await footprint(n2)).toEqual([]);
      const legacyLeft = await sh(n2, 'iptables-legacy-save', ['-t', 'filter']);
      for (const rule of seeded) expect(legacyLeft).toContain(rule);
      expect((await sh(n2, 'iptables-nft-save', ['-t', 'filter'])).split('\n').filter((l) => l.startsWith('-A INPUT'))).toHaveLength(10);
    });

    test('a state file that names no backend is refused instead of re-detected', async () => {
      const dir = stateDir();
      writeFileSync(join(dir, 'iptables-backend.json'), '{"backend":"ipfw"}');
      const dp = dataplane({ netns: n2.netns, stateDir: dir });
      await expect(dp.apply(desiredFor(n2, []))).rejects.toThrow(/does not name an iptables backend/);
      expect(await footprint(n2)).toEqual([]);
    });
  });

  test('a namespace that does not exist, a prefix too long: refused at construction', () => {
    expect(() => new IptablesDataplane({ netns: `${prefix}-nosuch` })).toThrow(/netns .*no such network namespace/);
    expect(() => new IptablesDataplane({ netns: n1.netns, prefix: 'waytoolongprefixforanychain' })).toThrow(/prefix .*iptables allows 28/);
  });

  test('the host namespace was never touched', async () => {
    expect(hostBefore).toBe(0);
    expect(await hostFsmLines()).toBe(0);
  });
});
