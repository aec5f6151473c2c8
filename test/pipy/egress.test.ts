import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type Dataplane, type DesiredState } from '../../src/dataplane/types.js';
import { createOutside, destroyOutside, type LabOutside } from '../../src/lab/outside.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { LABEL_MONITORED_BY } from '../../src/policy/fsm.js';
import type { Kind } from '../../src/policy/objects.js';
import { renderProxyConfig, type ProxyConfig } from '../../src/proxy/config.js';
import { cgroup2Root } from '../../src/util/cgroup.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, writeConfig, type NodeProxy } from '../support/pipy.js';

/**
 * FSM's Egress in the real Pipy program, with the mesh's egress set to deny:
 * three intercepted pods (iptables) call the lab's outside server (plain
 * HTTP :80 and TLS :443 as outside.lab), which sits on the underlay off the mesh.
 *   a: Egress "a-web" allows hosts [outside.lab] on 80/http and 443/https
 *   b: Egress "b-cidr" allows ipAddresses [<server>/32] on 80/tcp
 *   c: no Egress
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'mesh';
const tsRegister = fileURLToPath(new URL('../support/ts-register.mjs', import.meta.url));
const outsideServer = fileURLToPath(new URL('../../src/lab/outside-server.ts', import.meta.url));

type Obj = { apiVersion: string; kind: string; metadata: Record<string, unknown>; [k: string]: unknown };

maybe('Egress policy in the Pipy node proxy (mesh egress deny)', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let node: TopoNode;
  let A: TopoPod, B: TopoPod, C: TopoPod;
  let outside: LabOutside;
  let proxy: NodeProxy;
  let dp: Dataplane | undefined;

  function objects(egress: Obj[]): Obj[] {
    const pod = (p: TopoPod): Obj => ({
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name: p.name, namespace: NS, uid: `uid-${p.name}` },
      spec: { nodeName: node.name, serviceAccountName: p.name },
      status: { phase: 'Running', podIP: p.ip },
    });
    return [
      { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'fsm-mesh-config', namespace: 'fsm-system' }, data: { egress: 'deny' } },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels: { [LABEL_MONITORED_BY]: 'fsm' } } },
      { apiVersion: 'v1', kind: 'Node', metadata: { name: node.name }, status: { addresses: [{ type: 'InternalIP', address: node.underlayIp }] } },
      pod(A),
      pod(B),
      pod(C),
      ...egress,
    ];
  }

  const egressObj = (name: string, sa: string, spec: Record<string, unknown>): Obj => ({
    apiVersion: 'policy.flomesh.io/v1alpha1',
    kind: 'Egress',
    metadata: { name, namespace: NS },
    spec: { sources: [{ kind: 'ServiceAccount', name: sa, namespace: NS }], ...spec },
  });
  const policies = (): Obj[] => [
    egressObj('a-web', 'a', { hosts: ['outside.lab'], ports: [{ number: 80, protocol: 'http' }, { number: 443, protocol: 'https' }] }),
    egressObj('b-cidr', 'b', { ipAddresses: [`${outside.server.ip}/32`], ports: [{ number: 80, protocol: 'tcp' }] }),
  ];

  function configWith(egress: Obj[]): ProxyConfig {
    const c = new PolicyCompiler();
    for (const o of objects(egress)) if (!c.upsert(o.kind as Kind, o)) throw new Error(`${o.kind} rejected: ${JSON.stringify(c.reporter.active())}`);
    c.compile();
    return renderProxyConfig(c.get(node.name)!.policy, { outboundPort: 15001, inboundPort: 15003 });
  }

  async function curl(from: TopoPod, args: string[]): Promise<{ status: string; body: string; code: number | null }> {
    const r = await from.run('curl', ['-sS', '-m', '5', '-o', '-', '-w', '\n%{http_code}', ...args]);
    const lines = r.stdout.trimEnd().split('\n');
    return { status: lines.pop() ?? '', body: lines.join('\n'), code: r.code };
  }
  const http = (from: TopoPod, host: string) => curl(from, ['-H', `Host: ${host}`, `http://${outside.server.ip}/x`]);
  const https = (from: TopoPod, name: string) => curl(from, ['--cacert', outside.server.caFile, '--resolve', `${name}:443:${outside.server.ip}`, `https://${name}/tls`]);

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-egress-`));
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 0 });
    [node] = topo.nodes as [TopoNode];
    A = await topo.addPod(node, 'a');
    B = await topo.addPod(node, 'b');
    C = await topo.addPod(node, 'c');
    outside = await createOutside({ prefix, subnetBase: 77, cgroupRoot: cgroup2Root(), dir: work, serverCommand: [process.execPath, '--import', tsRegister, outsideServer] });
    await eventually(async () => (await topo.underlay.run('curl', ['-s', '-m', '1', `http://${outside.server.ip}/`])).code, (c) => c === 0, 15_000);
    const cfg = configWith(policies());
    proxy = await startNodeProxy(node, pipy, writeCodebase(work, cfg), cfg);
    dp = dataplaneModes.iptables!.create(nodeSpec(node));
    const desired: DesiredState = {
      proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
      nodeAddresses: [node.gateway, node.underlayIp],
      proxySources: [node.gateway, node.underlayIp],
      mesh: noExclusions(),
      pods: [A, B, C].map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
    };
    await dp.apply(desired);
  }, 180_000);

  afterAll(async () => {
    await dp?.cleanup().catch(() => undefined);
    await proxy?.stop().catch(() => undefined);
    if (outside) await destroyOutside(outside);
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('HTTP by Host: the allowed host goes out (through the proxy, from the node), another Host on the same address gets 403', async () => {
    const ok = await http(A, 'outside.lab');
    expect(ok.status).toBe('200');
    expect(JSON.parse(ok.body)).toMatchObject({ server: 'outside.lab', host: 'outside.lab', peer: node.underlayIp });
    const denied = await http(A, 'evil.example');
    expect(denied.status).toBe('403');
    expect(denied.body).not.toContain('outside.lab');
  }, 30_000);

  test('TLS by SNI: outside.lab passes end to end (the server\'s own certificate), another name is closed', async () => {
    const ok = await https(A, 'outside.lab');
    expect(ok.status).toBe('200');
    expect(JSON.parse(ok.body)).toMatchObject({ server: 'outside.lab', tls: true });
    const other = await curl(A, ['-k', '--resolve', `wrong.example:443:${outside.server.ip}`, 'https://wrong.example/']);
    expect(other.status).toBe('000');
    expect(other.code).not.toBe(0);
  }, 30_000);

  test('TCP by CIDR and port: b reaches the address on 80 (any Host), not on 443; c, without an Egress, reaches nothing', async () => {
    expect((await http(B, 'anything.example')).status).toBe('200');
    expect((await https(B, 'outside.lab')).status).toBe('000');
    expect((await http(C, 'outside.lab')).status).toBe('000');
    expect((await https(C, 'outside.lab')).status).toBe('000');
  }, 30_000);

  test('metrics per source identity and destination, allowed and denied', async () => {
    const m = await proxy.metrics();
    expect(metricValue(m, 'fsmn_proxy_egress_total', { source: `${NS}/a`, destination: 'outside.lab', protocol: 'http', result: 'allowed' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_egress_total', { source: `${NS}/a`, destination: 'evil.example', protocol: 'http', result: 'denied' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_egress_total', { source: `${NS}/a`, destination: 'wrong.example', protocol: 'https', result: 'denied' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_egress_total', { source: `${NS}/b`, destination: `${outside.server.ip}:80`, protocol: 'tcp', result: 'allowed' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_egress_total', { source: `${NS}/c`, result: 'denied' })).toBeGreaterThanOrEqual(2);
    // Every decision is also an access record on the proxy's log, with the source identity.
    const records = proxy
      .log()
      .split('\n')
      .filter((l) => l.includes('fsmn egress {'))
      .map((l) => JSON.parse(l.slice(l.indexOf('{'))) as { source: string; destination: string; protocol: string; result: string });
    const seen = (r: { source: string; destination: string; protocol: string; result: string }) => records.some((x) => x.source === r.source && x.destination === r.destination && x.protocol === r.protocol && x.result === r.result);
    expect(seen({ source: `${NS}/a`, destination: 'outside.lab', protocol: 'http', result: 'allowed' })).toBe(true);
    expect(seen({ source: `${NS}/a`, destination: 'evil.example', protocol: 'http', result: 'denied' })).toBe(true);
    expect(seen({ source: `${NS}/b`, destination: `${outside.server.ip}:80`, protocol: 'tcp', result: 'allowed' })).toBe(true);
  }, 30_000);

  test('an Egress removed live: the host that was allowed is refused after the reload', async () => {
    const cfg = configWith([]);
    writeConfig(work, cfg);
    proxy.reload();
    expect(await eventually(async () => metricValue(await proxy.metrics(), 'fsmn_proxy_config', { version: cfg.version }), (v) => v === 1, 10_000)).toBe(1);
    // Without any Egress the mesh's deny holds for everyone: the connection is closed.
    expect((await http(A, 'outside.lab')).status).toBe('000');
    const back = configWith(policies());
    writeConfig(work, back);
    proxy.reload();
    expect(await eventually(async () => metricValue(await proxy.metrics(), 'fsmn_proxy_config', { version: back.version }), (v) => v === 1, 10_000)).toBe(1);
    expect((await http(A, 'outside.lab')).status).toBe('200');
  }, 60_000);
});
