import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { MapName } from '../../src/dataplane/ebpf/abi.js';
import { EbpfDataplane, type EbpfDataplaneOptions } from '../../src/dataplane/ebpf/dataplane.js';
import { noExclusions, type DesiredState } from '../../src/dataplane/types.js';
import { AttachType, BpfMap, Link, ObjectSpec, Program } from '../../src/ebpf/index.js';
import { InvalidInputError } from '../../src/errors.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import type { ConnectionRecord } from '../../src/proxy/passthrough.js';
import { run } from '../../src/util/exec.js';
import { bpfObjectDir } from '../../src/util/paths.js';
import { bpfObjectAlive, bpfObjectsLeft } from '../support/bpf-objects.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer, startLoad, waitForOutput } from '../support/traffic.js';

/**
 * What only the eBPF dataplane has: a pin directory it must own, the
 * sockmap fast path, pods whose processes live in nested cgroups, program
 * upgrades by link update, tamper repair and capacity limits. The behaviour
 * every mode shares is in conformance.test.ts.
 */

const PORT = 8080;
const PROXY_PORT = 15001;
const support = fileURLToPath(new URL('../support/', import.meta.url));
const passthrough = fileURLToPath(new URL('../../src/proxy/passthrough.ts', import.meta.url));

describe('eBPF dataplane', () => {
  const prefix = uniqueTestPrefix();
  const work = mkdtempSync(join(tmpdir(), `${prefix}-`));
  const proxyLog = join(work, 'proxy.jsonl');
  let topo: Topology;
  let node: TopoNode;
  let a: TopoPod;
  let b: TopoPod;
  const open: EbpfDataplane[] = [];

  const records = (): ConnectionRecord[] =>
    readFileSync(proxyLog, 'utf8')
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as ConnectionRecord)
      .filter((r) => r.event === 'open');

  const desired = (pods: TopoPod[] = [a, b], cgroupOf: (p: TopoPod) => string = (p) => p.cgroupPath): DesiredState => ({
    proxy: { address: node.gateway, outboundPort: PROXY_PORT, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: [node.gateway, node.underlayIp],
    mesh: noExclusions(),
    pods: pods.map((p) => ({ uid: `uid-${p.name}`, namespace: 't', name: p.name, ip: p.ip, cgroupPath: cgroupOf(p), inbound: 'permissive', exclusions: noExclusions() })),
  });

  const dataplane = (opts: Partial<EbpfDataplaneOptions> = {}): EbpfDataplane => {
    const dp = new EbpfDataplane({ pinDir: node.bpffsDir, podsCgroup: node.podsCgroup, proxyCgroup: node.proxyCgroup, ...opts });
    open.push(dp);
    return dp;
  };

  const redirected = async (from: TopoPod, to: TopoPod, bytes = 1024): Promise<boolean> => {
    const since = records().length;
    const r = await echo(from, to.ip, PORT, bytes);
    expect(r).toMatchObject({ outcome: 'ok', intact: true });
    const port = Number(r.local?.slice(r.local.lastIndexOf(':') + 1));
    // Only records written since: source ports get reused.
    return records()
      .slice(since)
      .some((rec) => rec.source === from.ip && rec.sourcePort === port && rec.originalDst?.address === to.ip);
  };

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 2 });
    node = topo.nodes[0]!;
    [a, b] = node.pods as [TopoPod, TopoPod];
    for (const p of [a, b]) await startEchoServer(p, p.name, PORT);
    writeFileSync(proxyLog, '');
    const proxy = node.exec(process.execPath, ['--import', join(support, 'ts-register.mjs'), passthrough, '--listen', `${node.gateway}:${PROXY_PORT}`, '--log', proxyLog], {
      inProxyCgroup: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    await waitForOutput(proxy, 'listening');
  }); // the configured testTimeout: 60 s here, 180 s in the arm64 VM (TCG emulation on a busy host)

  afterAll(async () => {
    for (const dp of open) await dp.cleanup().catch(() => undefined);
    await topo?.destroy();
    rmSync(work, { recursive: true, force: true });
  });

  test('a pin directory holding pins that are not ours is refused and left untouched', async () => {
    const foreign = join(node.bpffsDir, 'foreign');
    mkdirSync(foreign);
    using coll = ObjectSpec.fromFile(join(bpfObjectDir(), 'connect4.o')).load();
    coll.maps[MapName.pods]!.pin(join(foreign, 'somebody_elses_map'));
    const dp = dataplane({ pinDir: foreign });
    await expect(dp.apply(desired())).rejects.toThrow(InvalidInputError);
    await expect(dp.apply(desired())).rejects.toThrow(/pinDir .*foreign.* not fsm-node's .*somebody_elses_map/);
    await expect(dp.cleanup()).rejects.toThrow(/not fsm-node's/);
    const attached = await run('bpftool', ['-j', 'cgroup', 'show', node.podsCgroup]);
    expect(JSON.parse(attached.stdout.trim() || '[]')).toEqual([]);
    expect(readdirSync(foreign)).toEqual(['somebody_elses_map']);
    rmSync(foreign, { recursive: true });
  });

  test('a failed apply (map full) keeps the previous state and makes the next apply full', async () => {
    const dp = dataplane({ capacity: { pods: 1 } });
    await dp.apply(desired([a]));
    await expect(dp.apply(desired([a, b]))).rejects.toThrow(/previous entries restored.*E2BIG/);
    expect((await dp.installed()).pods).toEqual([`uid-${a.name}`]);
    expect(await redirected(a, b)).toBe(true);
    expect(await redirected(b, a)).toBe(false);
    const next = await dp.apply(desired([a]));
    expect(next).toMatchObject({ full: true, changes: 0 });
    await dp.cleanup();
  });

  test('the fast path carries the bytes of both directions intact, and can be switched off', async () => {
    const on = dataplane({ fastPath: true });
    await on.apply(desired());
    const before = (await on.installed()).detail.fastPathStats as { redirectedBytes: number };
    expect(await redirected(a, b, 4_000_000)).toBe(true);
    const after = (await on.installed()).detail.fastPathStats as { redirectedBytes: number };
    // pod -> proxy -> pod and back: four same-node hops, each skipping TCP/IP
    expect(after.redirectedBytes - before.redirectedBytes).toBeGreaterThanOrEqual(4 * 4_000_000);
    await on.close();

    const off = dataplane({ fastPath: false });
    expect(await off.apply(desired())).toMatchObject({ changes: 1 });
    expect((await off.installed()).detail.fastPath).toBe(false);
    const offBefore = (await off.installed()).detail.fastPathStats;
    expect(await redirected(a, b, 4_000_000)).toBe(true);
    expect((await off.installed()).detail.fastPathStats).toEqual(offBefore);
    await off.close();
  });

  test("a pod's processes in a cgroup below the pod's (a container) are intercepted", async () => {
    const dp = dataplane();
    await dp.apply(desired());
    const container = join(a.cgroupPath, 'ctr');
    mkdirSync(container);
    try {
      const script = `echo $$ > ${container}/cgroup.procs && exec "$0" "$@"`;
      const since = records().length;
      const r = await a.run('/bin/sh', ['-c', script, process.execPath, '-e', ECHO_ONCE, b.ip, String(PORT)]);
      const { local } = JSON.parse(r.stdout) as { local: string };
      const port = Number(local.slice(local.lastIndexOf(':') + 1));
      expect(records().slice(since).some((rec) => rec.source === a.ip && rec.sourcePort === port)).toBe(true);
    } finally {
      await run('rmdir', [container], { allowFail: true });
    }
    await dp.close();
  });

  test('a new program version replaces the old one by link update under load: every connection is intercepted', async () => {
    const v1 = dataplane();
    await v1.apply(desired());
    const old = (await v1.installed()).detail as { version: string; links: Record<string, { id: number; progId: number }>; programs: Record<string, number> };
    await v1.close();
    const before = records().filter((r) => r.source === a.ip).length;
    const load = await startLoad(a, b.ip, PORT);
    const v2 = dataplane({ podMaxDepth: 4 });
    let summary;
    try {
      await load.progress(20);
      await v2.apply(desired());
      await load.progress(20);
    } finally {
      summary = await load.stop();
    }
    const now = (await v2.installed()).detail as typeof old;
    expect(now.version).not.toBe(old.version);
    for (const [name, l] of Object.entries(now.links)) {
      expect(l.id).toBe(old.links[name]!.id);
      expect(l.progId).not.toBe(old.links[name]!.progId);
      expect(l.progId).toBe(now.programs[`fsm_${name}`]);
    }
    expect(summary).toMatchObject({ failed: 0 });
    expect(summary.ok).toBeGreaterThan(0);
    expect(records().filter((r) => r.source === a.ip).length - before).toBe(summary.ok);
    await v2.close();
  });

  test("an upgrade detaches the attach points the new version no longer has", async () => {
    const v1 = dataplane();
    await v1.apply(desired());
    await v1.close();
    // What an older version with one more attach point would have left pinned.
    using prog = Program.fromPin(join(node.bpffsDir, 'progs', 'fsm_connect4'));
    const legacy = prog.attachCgroup(node.podsCgroup, AttachType.CgroupInet4Connect);
    legacy.pin(join(node.bpffsDir, 'links', 'legacy_connect4'));
    const legacyId = legacy.info().id;
    legacy.close();
    const legacyLink = { kind: 'link', id: legacyId, name: 'legacy_connect4' } as const;
    expect(await bpfObjectAlive(legacyLink)).toBe(true);
    const v2 = dataplane({ podMaxDepth: 2 });
    await v2.apply(desired());
    expect(readdirSync(join(node.bpffsDir, 'links')).sort()).toEqual(['connect4', 'connect6', 'getsockopt', 'inbound', 'sockops_pod', 'sockops_proxy']);
    expect(await bpfObjectsLeft([legacyLink])).toEqual([]);
    expect(await redirected(a, b)).toBe(true);
    await v2.close();
  });

  test('incremental applies leave exactly what a full sync would write', async () => {
    const dp = dataplane();
    await dp.apply(desired([a]));
    const steps: DesiredState[] = [desired([a, b]), desired([a, b]), desired([b]), desired([a, b]), desired([])];
    steps[1]!.pods[0]!.exclusions = { ...noExclusions(), outboundPorts: [9000, 9001], outboundCidrs: ['192.168.0.0/16'], inboundPorts: [7070] };
    steps[1]!.mesh.outboundIncludeCidrs = ['10.0.0.0/8'];
    steps[1]!.pods[1]!.inbound = 'strict';
    for (const step of steps) {
      const r = await dp.apply(step);
      expect(r.full).toBe(false);
      expect(await dp.apply(step, { full: true })).toMatchObject({ full: true, changes: 0 });
    }
    expect(await dp.apply(steps[1]!)).toMatchObject({ full: false });
    expect((await dp.installed()).pods).toEqual([`uid-${a.name}`, `uid-${b.name}`]);
    await dp.cleanup();
  });

  test('tampering (map entries deleted, a link detached and unpinned) is repaired by a full sync', async () => {
    const dp = dataplane();
    await dp.apply(desired());
    using pods = BpfMap.fromPin(join(node.bpffsDir, 'maps', MapName.pods));
    for (const k of [...pods.keys()]) pods.delete(k);
    expect(await redirected(a, b)).toBe(false);
    expect(await dp.apply(desired())).toMatchObject({ full: false, changes: 0 });
    expect(await dp.apply(desired(), { full: true })).toMatchObject({ full: true, changes: 2 });
    expect(await redirected(a, b)).toBe(true);

    const linkPin = join(node.bpffsDir, 'links', 'connect4');
    using link = Link.fromPin(linkPin);
    link.detach();
    link.unpin();
    expect(await redirected(a, b)).toBe(false);
    await dp.apply(desired(), { full: true });
    expect(await redirected(a, b)).toBe(true);
    await dp.cleanup();
  });
});

// One connection from a process placed by the caller: prints its local address.
const ECHO_ONCE = `
const s = require('node:net').connect(Number(process.argv[2]), process.argv[1], () => s.end('x'));
s.on('data', () => {});
s.on('end', () => console.log(JSON.stringify({ local: s.localAddress + ':' + s.localPort })));
`;
