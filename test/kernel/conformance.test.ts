import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type Dataplane, type DesiredState, type Exclusions, type PodIntercept } from '../../src/dataplane/types.js';
import { InvalidInputError } from '../../src/errors.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import type { ConnectionRecord } from '../../src/proxy/passthrough.js';
import { dataplaneModes, nodeSpec, type DataplaneMode } from '../support/dataplanes.js';
import { eventuallyEqual } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer, startLoad, waitForOutput, type EchoResult } from '../support/traffic.js';

/**
 * The dataplane conformance suite: written once, run against every mode in
 * test/support/dataplanes.ts, on a 2-node x 3-pod topology with real
 * processes and real TCP. Each node runs the passthrough proxy in its node
 * namespace and proxy cgroup; the proxy's records (original destination per
 * accepted connection) tell whether a connection was intercepted.
 *
 *   n1: A (enrolled)  B (enrolled, inclusion list = n1's pods)  X (not enrolled)
 *   n2: C (enrolled, strict, inbound port 7070 excluded)  D (enrolled)  E (not enrolled)
 *   mesh-wide: outbound port 9090 excluded; A excludes D's address.
 */

const PORT = 8080;
const MESH_EXCLUDED_PORT = 9090;
const INBOUND_EXCLUDED_PORT = 7070;
const PROXY_PORT = 15001;
const REFUSED_TIMEOUT_MS = 3000;

const support = fileURLToPath(new URL('../support/', import.meta.url));
const tsRegister = join(support, 'ts-register.mjs');
const passthrough = fileURLToPath(new URL('../../src/proxy/passthrough.ts', import.meta.url));
const agentScript = join(support, 'dataplane-agent.ts');

const modes = Object.entries(dataplaneModes) as Array<[string, DataplaneMode]>;

describe.each(modes)('dataplane conformance: %s', (mode, adapter) => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-`));
  let topo: Topology;
  let n1: TopoNode;
  let n2: TopoNode;
  let A: TopoPod, B: TopoPod, X: TopoPod, C: TopoPod, D: TopoPod, E: TopoPod;
  const dps = new Map<TopoNode, Dataplane>();
  const footprintBefore = new Map<TopoNode, string[]>();
  const settings = new Map<TopoPod, { inbound: PodIntercept['inbound']; exclusions: Partial<Exclusions> }>();

  const proxyLog = (node: TopoNode): string => join(work, `proxy-${node.name}.jsonl`);
  const records = (node: TopoNode): ConnectionRecord[] =>
    readFileSync(proxyLog(node), 'utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as ConnectionRecord);

  /** One echo exchange, remembering how many proxy records existed before it (source ports get reused). */
  const send = async (from: TopoPod, host: string, port: number, bytes?: number, timeoutMs?: number): Promise<EchoResult & { since: number }> => {
    const since = records(from.node).length;
    return { ...(await echo(from, host, port, bytes, timeoutMs)), since };
  };

  /** The proxy's record of the connection `r` made from `from`, if it went through the proxy of from's node. */
  const recordOf = (from: TopoPod, r: EchoResult & { since: number }): ConnectionRecord | undefined => {
    const port = Number(r.local?.slice(r.local.lastIndexOf(':') + 1));
    return records(from.node)
      .slice(r.since)
      .find((rec) => rec.event === 'open' && rec.source === from.ip && rec.sourcePort === port);
  };

  const desired = (node: TopoNode, enrolled: TopoPod[] = [...settings.keys()].filter((p) => p.node === node)): DesiredState => ({
    proxy: { address: node.gateway, outboundPort: PROXY_PORT, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
    mesh: { ...noExclusions(), outboundPorts: [MESH_EXCLUDED_PORT] },
    pods: enrolled.map((p) => {
      const s = settings.get(p) ?? { inbound: 'permissive' as const, exclusions: {} };
      return { uid: `uid-${p.name}`, namespace: 'conformance', name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: s.inbound, exclusions: { ...noExclusions(), ...s.exclusions } };
    }),
  });

  const dp = (node: TopoNode): Dataplane => {
    let d = dps.get(node);
    if (d === undefined) {
      d = adapter.create(nodeSpec(node));
      dps.set(node, d);
    }
    return d;
  };

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 3 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    [A, B, X] = n1.pods as [TopoPod, TopoPod, TopoPod];
    [C, D, E] = n2.pods as [TopoPod, TopoPod, TopoPod];
    settings.set(A, { inbound: 'permissive', exclusions: { outboundCidrs: [`${D.ip}/32`] } });
    settings.set(B, { inbound: 'permissive', exclusions: { outboundIncludeCidrs: [n1.podCidr] } });
    settings.set(C, { inbound: 'strict', exclusions: { inboundPorts: [INBOUND_EXCLUDED_PORT] } });
    settings.set(D, { inbound: 'permissive', exclusions: {} });
    for (const pod of [A, B, X, C, D, E]) await startEchoServer(pod, pod.name, PORT);
    await startEchoServer(B, 'B9090', MESH_EXCLUDED_PORT);
    await startEchoServer(C, 'C7070', INBOUND_EXCLUDED_PORT);
    for (const node of topo.nodes) {
      writeFileSync(proxyLog(node), '');
      const proxy = node.exec(process.execPath, ['--import', tsRegister, passthrough, '--listen', `${node.gateway}:${PROXY_PORT}`, '--log', proxyLog(node)], {
        inProxyCgroup: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      await waitForOutput(proxy, 'listening');
      footprintBefore.set(node, await adapter.footprint(nodeSpec(node)));
      await dp(node).apply(desired(node));
    }
  }, 180_000);

  afterAll(async () => {
    for (const d of dps.values()) await d.cleanup().catch(() => undefined);
    await topo?.destroy();
    rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('same node: A -> B goes through the proxy with its original destination, bytes intact both ways', async () => {
    const r = await send(A, B.ip, PORT, 1_000_000);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, received: 1_000_000 });
    expect(recordOf(A, r)?.originalDst).toEqual({ address: B.ip, port: PORT });
  });

  test('other node: A -> C goes through the proxy with its original destination, bytes intact both ways', async () => {
    const r = await send(A, C.ip, PORT, 1_000_000);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, received: 1_000_000 });
    expect(recordOf(A, r)?.originalDst).toEqual({ address: C.ip, port: PORT });
  });

  test('a dual-stack (AF_INET6) socket connecting to an IPv4 address (::ffff:a.b.c.d) goes through the proxy too', async () => {
    const r = await send(A, `::ffff:${B.ip}`, PORT, 100_000);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, received: 100_000 });
    expect(r.local).toMatch(/^::ffff:/);
    expect(recordOf(A, r)?.originalDst).toEqual({ address: B.ip, port: PORT });
  });

  test('a pod that is not enrolled goes direct', async () => {
    const r = await send(X, B.ip, PORT);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, banner: `${B.name} ${X.ip}` });
    expect(recordOf(X, r)).toBeUndefined();
  });

  test('a mesh-wide excluded port goes direct', async () => {
    const r = await send(A, B.ip, MESH_EXCLUDED_PORT);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, banner: `B9090 ${A.ip}` });
    expect(recordOf(A, r)).toBeUndefined();
  });

  test("a pod's excluded CIDR goes direct", async () => {
    const r = await send(A, D.ip, PORT);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, banner: `${D.name} ${A.ip}` });
    expect(recordOf(A, r)).toBeUndefined();
  });

  test("with an inclusion list only destinations inside it go through the proxy", async () => {
    const outside = await send(B, D.ip, PORT);
    expect(outside).toMatchObject({ outcome: 'ok', intact: true, banner: `${D.name} ${B.ip}` });
    expect(recordOf(B, outside)).toBeUndefined();
    const inside = await send(B, A.ip, PORT);
    expect(inside).toMatchObject({ outcome: 'ok', intact: true });
    expect(recordOf(B, inside)?.originalDst).toEqual({ address: A.ip, port: PORT });
  });

  test('loopback goes direct', async () => {
    const r = await send(A, '127.0.0.1', PORT);
    expect(r).toMatchObject({ outcome: 'ok', intact: true, banner: `${A.name} 127.0.0.1` });
    expect(recordOf(A, r)).toBeUndefined();
  });

  test('strict inbound refuses direct connections from pods that are not enrolled; excluded inbound ports and permissive pods accept them', async () => {
    const sameNode = await send(E, C.ip, PORT, 64, REFUSED_TIMEOUT_MS);
    const otherNode = await send(X, C.ip, PORT, 64, REFUSED_TIMEOUT_MS);
    expect(sameNode.outcome).not.toBe('ok');
    expect(otherNode.outcome).not.toBe('ok');
    expect(await send(E, C.ip, INBOUND_EXCLUDED_PORT)).toMatchObject({ outcome: 'ok', intact: true, banner: `C7070 ${E.ip}` });
    expect(await send(E, D.ip, PORT)).toMatchObject({ outcome: 'ok', intact: true, banner: `${D.name} ${E.ip}` });
  });

  test('enrol and remove a pod while its traffic runs: no connection fails', async () => {
    const load = await startLoad(X, B.ip, PORT);
    try {
      await load.progress(20);
      await dp(n1).apply(desired(n1, [A, B, X]));
      await load.progress(20);
      const enrolled = await send(X, B.ip, PORT);
      expect(recordOf(X, enrolled)?.originalDst).toEqual({ address: B.ip, port: PORT });
      expect((await dp(n1).installed()).pods).toContain(`uid-${X.name}`);
      await dp(n1).apply(desired(n1));
      await load.progress(20);
      const removed = await send(X, B.ip, PORT);
      expect(removed).toMatchObject({ outcome: 'ok', banner: `${B.name} ${X.ip}` });
      expect(recordOf(X, removed)).toBeUndefined();
      expect((await dp(n1).installed()).pods).not.toContain(`uid-${X.name}`);
    } finally {
      const summary = await load.stop();
      expect(summary).toMatchObject({ failed: 0 });
      expect(summary.ok).toBeGreaterThan(0);
    }
  });

  test('SIGKILL of the agent under load drops no connection and redirect keeps working; a restarted agent adopts without re-creating', async () => {
    await dp(n1).close();
    dps.delete(n1);
    const desiredFile = join(work, 'desired-n1.json');
    writeFileSync(desiredFile, JSON.stringify(desired(n1)));
    const startAgent = async (): Promise<{ child: ChildProcess; applied: { result: { changes: number; full: boolean }; installed: { pods: string[]; detail: Record<string, unknown> } } }> => {
      const child = n1.exec(process.execPath, ['--import', tsRegister, agentScript, mode, JSON.stringify(nodeSpec(n1)), desiredFile], { stdio: ['ignore', 'pipe', 'pipe'] });
      const out = await waitForOutput(child, '"event":"applied"');
      return { child, applied: JSON.parse(out.trim().split('\n').pop()!) };
    };
    const first = await startAgent();
    expect(first.applied.installed.pods).toEqual([`uid-${A.name}`, `uid-${B.name}`]);
    const load = await startLoad(A, B.ip, PORT);
    let summary;
    try {
      await load.progress(20);
      const exited = once(first.child, 'exit');
      first.child.kill('SIGKILL');
      await exited;
      await load.progress(20);
      const withoutAgent = await send(A, B.ip, PORT, 200_000);
      expect(withoutAgent).toMatchObject({ outcome: 'ok', intact: true });
      expect(recordOf(A, withoutAgent)?.originalDst).toEqual({ address: B.ip, port: PORT });

      const second = await startAgent();
      await load.progress(20);
      expect(second.applied.result).toMatchObject({ full: true, changes: 0 });
      expect(adapter.identity(second.applied.installed.detail)).toEqual(adapter.identity(first.applied.installed.detail));
      const exited2 = once(second.child, 'exit');
      second.child.kill('SIGTERM');
      await exited2;
    } finally {
      summary = await load.stop();
    }
    expect(summary).toMatchObject({ failed: 0 });
    expect(summary.ok).toBeGreaterThan(0);
    const afterRestart = await send(A, B.ip, PORT);
    expect(recordOf(A, afterRestart)?.originalDst).toEqual({ address: B.ip, port: PORT });
  }, 90_000);

  type BadInput = [string, (d: DesiredState) => void, RegExp, RegExp];
  const unknownPod: BadInput[] = adapter.podsByCgroup
    ? [['an unknown pod (its cgroup does not exist)', (d) => d.pods.push({ ...d.pods[0]!, uid: 'uid-ghost', ip: '10.77.1.250', cgroupPath: join(n1.podsCgroup, 'ghost') }), /cgroupPath/, /ghost/]]
    : [];
  test.each<BadInput>([
    ...unknownPod,
    ['an invalid CIDR', (d: DesiredState) => (d.mesh.outboundCidrs = ['10.0.0.0/33']), /mesh\.outboundCidrs\[0\]/, /10\.0\.0\.0\/33/],
    ['an invalid port', (d: DesiredState) => (d.pods[1]!.exclusions.outboundPorts = [70000]), /pods\[1\]\.exclusions\.outboundPorts\[0\]/, /70000/],
  ])('bad input: %s is refused with the field and value named, nothing changed', async (_what, spoil, field, value) => {
    const before = await dp(n1).installed();
    const bad = desired(n1);
    spoil(bad);
    const err = await dp(n1).apply(bad).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(InvalidInputError);
    expect((err as Error).message).toMatch(field);
    expect((err as Error).message).toMatch(value);
    expect((await dp(n1).installed()).pods).toEqual(before.pods);
    const r = await send(A, B.ip, PORT);
    expect(recordOf(A, r)?.originalDst).toEqual({ address: B.ip, port: PORT });
  });

  test('cleanup removes everything the dataplane installed: nothing is left, traffic goes direct', async () => {
    for (const node of topo.nodes) expect(await adapter.footprint(nodeSpec(node))).not.toEqual([]);
    for (const node of topo.nodes) {
      const report = await dp(node).cleanup();
      expect(report.removed.length).toBeGreaterThan(0);
      const want = footprintBefore.get(node)!;
      expect(await eventuallyEqual(() => adapter.footprint(nodeSpec(node)), want)).toEqual(want);
      expect((await dp(node).installed()).pods).toEqual([]);
    }
    const r = await send(A, B.ip, PORT);
    expect(r).toMatchObject({ outcome: 'ok', banner: `${B.name} ${A.ip}` });
    expect(recordOf(A, r)).toBeUndefined();
    expect(await dp(n1).cleanup()).toEqual({ removed: [] });
  });
});
