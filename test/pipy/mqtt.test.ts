import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { noExclusions, type Dataplane, type DesiredState } from '../../src/dataplane/types.js';
import type { Step } from '../../src/lab/mqtt-client.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';
import { renderProxyConfig, type ProxyConfig, type ProxyIdentityFiles } from '../../src/proxy/config.js';
import { dataplaneModes, nodeSpec } from '../support/dataplanes.js';
import { eventually } from '../support/eventually.js';
import { FLEET_COLLECTOR, FLEET_DEVICES } from '../support/mqtt-fleet.js';
import { issue, testCa, TRUST_DOMAIN, writeIdentity } from '../support/identity-certs.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, type NodeProxy } from '../support/pipy.js';
import { waitForOutput } from '../support/traffic.js';

/**
 * MQTT through the node proxies (proxy/mqtt.js): a real mosquitto broker in a
 * pod, real clients (the project's node:net client, src/lab/mqtt-client.ts,
 * which reports every reason code), mutual TLS tunnels across nodes,
 * iptables interception:
 *
 *   n1: b (sa broker, mosquitto :1883), d1 (sa device)
 *   n2: d2 (sa device), c (sa collector), x (sa intruder)
 *
 * MQTTRouteGroup `fleet`: devices (client id dev-*) publish only under
 * devices/{clientId}/ and subscribe to commands/{clientId}/+; the collector
 * subscribes to devices/# and publishes commands/+/+. x has no rule.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'iot';
const PORT = 1883;
const BROKER_IP = '10.96.3.1';
const HOUR = 3_600_000;
const support = fileURLToPath(new URL('../support/', import.meta.url));
const tsRegister = join(support, 'ts-register.mjs');
const client = fileURLToPath(new URL('../../src/lab/mqtt-client.ts', import.meta.url));

const DEVICES = FLEET_DEVICES;
const COLLECTOR = FLEET_COLLECTOR;

maybe('MQTT through the node proxies (Pipy, mosquitto, iptables interception, mTLS)', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let n1: TopoNode, n2: TopoNode;
  let b: TopoPod, d1: TopoPod, d2: TopoPod, c: TopoPod, x: TopoPod;
  const dps: Dataplane[] = [];
  const proxies = new Map<TopoNode, NodeProxy>();
  const servers: ChildProcess[] = [];
  const ids = new Map<TopoNode, Record<string, ProxyIdentityFiles>>();
  let bundle: string[] = [];
  const saOf = (p: TopoPod): string => ({ b: 'broker', d1: 'device', d2: 'device', c: 'collector', x: 'intruder' })[p.name]!;

  function policyFor(node: TopoNode): NodePolicy {
    const all = [b, d1, d2, c, x];
    const targets = [
      { name: 'devices', sources: ['device'], matches: [DEVICES] },
      { name: 'collector', sources: ['collector'], matches: [COLLECTOR] },
    ].map((t) => ({
      namespace: NS,
      name: t.name,
      destination: { namespace: NS, serviceAccount: 'broker', port: null },
      sources: t.sources.map((s) => ({ namespace: NS, serviceAccount: s })),
      rules: [{ kind: 'MQTTRouteGroup' as const, name: 'fleet', matches: t.matches }],
    }));
    const local = all.filter((p) => p.node === node);
    const body = {
      apiVersion: POLICY_API_VERSION,
      kind: 'NodePolicy',
      mesh: { name: 'fsmt', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'smi', exclusions: noExclusions() },
      proxies: topo.nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
      node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
      meshPods: all.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: saOf(p), node: p.node.name })),
      pods: local.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: saOf(p), cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
      access: local.some((p) => p === b) ? targets : [],
      services: [
        {
          namespace: NS,
          name: 'broker',
          clusterIPs: [BROKER_IP],
          ports: [{ name: 'mqtt', port: PORT, protocol: 'TCP' as const, appProtocol: null }],
          endpoints: [{ ip: b.ip, ports: { mqtt: PORT }, node: b.node.name, pod: { namespace: NS, name: 'b' }, serviceAccount: 'broker' }],
        },
      ],
      splits: [],
    };
    const version = createHash('sha256').update(JSON.stringify(body)).digest('hex').slice(0, 16);
    return NodePolicySchema.parse({ ...body, version });
  }

  const configFor = (node: TopoNode): ProxyConfig =>
    renderProxyConfig(policyFor(node), { outboundPort: 15001, inboundPort: 15003, trust: { trustDomain: TRUST_DOMAIN, bundle }, identities: ids.get(node) ?? {} });

  const desired = (node: TopoNode): DesiredState => ({
    proxy: { address: node.gateway, outboundPort: 15001, inboundPort: 15003, cgroupPath: node.proxyCgroup },
    nodeAddresses: [node.gateway, node.underlayIp],
    proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
    mesh: noExclusions(),
    pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
  });

  /** Runs steps on one MQTT connection from `from` to the broker's service address; one result per step. */
  async function mqtt(from: TopoPod, version: 4 | 5, steps: Step[]): Promise<unknown[]> {
    const r = await from.run(process.execPath, ['--import', tsRegister, client, 'scenario', BROKER_IP, String(PORT), JSON.stringify({ version, steps })]);
    const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? 'null') as unknown;
    if (!Array.isArray(out)) throw new Error(`mqtt client in ${from.name}: ${r.stdout} ${r.stderr}`);
    return out;
  }

  const brokerMetrics = async (): Promise<string> => proxies.get(n1)!.metrics();
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-mqtt-`));
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    b = await topo.addPod(n1, 'b');
    d1 = await topo.addPod(n1, 'd1');
    d2 = await topo.addPod(n2, 'd2');
    c = await topo.addPod(n2, 'c');
    x = await topo.addPod(n2, 'x');
    const conf = join(work, 'mosquitto.conf');
    writeFileSync(conf, `listener ${PORT} 0.0.0.0\nallow_anonymous true\npersistence false\n`);
    const broker = b.exec('mosquitto', ['-c', conf, '-v'], { stdio: ['ignore', 'pipe', 'pipe'] });
    servers.push(broker);
    await waitForOutput(broker, 'running', 'stderr');
    const root = await testCa('fsmt-mqtt-root');
    bundle = [root.certPem];
    for (const node of topo.nodes) {
      const files: Record<string, ProxyIdentityFiles> = {};
      for (const p of node.pods) files[`${NS}/${saOf(p)}`] = writeIdentity(join(work, 'identities', node.name, p.name), await issue(root, `${NS}/${saOf(p)}`, 24 * HOUR));
      ids.set(node, files);
      const cfg = configFor(node);
      proxies.set(node, await startNodeProxy(node, pipy, writeCodebase(join(work, node.name), cfg), cfg));
      const dp = dataplaneModes.iptables!.create(nodeSpec(node));
      dps.push(dp);
      await dp.apply(desired(node));
    }
  }, 180_000);

  afterAll(async () => {
    for (const dp of dps) await dp.cleanup().catch(() => undefined);
    for (const p of proxies.values()) await p.stop().catch(() => undefined);
    for (const s of servers) s.kill('SIGTERM');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test.each([4, 5] as const)('MQTT %s: allowed publishes of QoS 0, 1 and 2 reach the collector on the other node, from the same node and across nodes', async (v) => {
    const sent = (q: number, dev: string) => `devices/${dev}/q${q}-v${v}`;
    const collector = mqtt(c, v, [
      { op: 'connect', clientId: `collector-${v}` },
      { op: 'subscribe', filters: [{ filter: 'devices/#', qos: 2 }] },
      ...[0, 1, 2].flatMap((q): Step[] => [{ op: 'message', topic: sent(q, 'dev-1'), timeoutMs: 8000 }, { op: 'message', topic: sent(q, 'dev-2'), timeoutMs: 8000 }]),
    ]);
    await sleep(700);
    const publish = (p: TopoPod, dev: string) => mqtt(p, v, [{ op: 'connect', clientId: dev }, ...[0, 1, 2].map((q): Step => ({ op: 'publish', topic: sent(q, dev), payload: `${dev} q${q}`, qos: q }))]);
    const [one, two] = await Promise.all([publish(d1, 'dev-1'), publish(d2, 'dev-2')]);
    // CONNACK 0; QoS 0 written; QoS 1/2 acknowledged by the broker (MQTT 5 may say 0x10, no matching subscribers, never a failure).
    for (const r of [one, two]) {
      expect(r[0]).toBe(0);
      expect((r.slice(1) as number[]).every((code) => code < 0x80)).toBe(true);
    }
    const got = (await collector).slice(2) as ({ topic: string; payload: string; qos: number } | null)[];
    expect(got.map((m) => m && `${m.topic} ${m.payload} q${m.qos}`)).toEqual([0, 1, 2].flatMap((q) => [`${sent(q, 'dev-1')} dev-1 q${q} q${q}`, `${sent(q, 'dev-2')} dev-2 q${q} q${q}`]));
  }, 60_000);

  test('a denied PUBLISH: MQTT 5 answers QoS 1 and 2 with 0x87 and drops QoS 0; the collector never sees one; the connection lives on', async () => {
    const collector = mqtt(c, 5, [
      { op: 'connect', clientId: 'collector-deny' },
      { op: 'subscribe', filters: [{ filter: 'devices/#', qos: 1 }] },
      { op: 'message', topic: 'devices/dev-1/after', timeoutMs: 8000 },
      { op: 'received' },
    ]);
    await sleep(700);
    const before = metricValue(await brokerMetrics(), 'fsmn_proxy_mqtt_denied_total', { source: `${NS}/device`, kind: 'publish' });
    const r = await mqtt(d1, 5, [
      { op: 'connect', clientId: 'dev-1' },
      { op: 'publish', topic: 'devices/dev-2/spoof', payload: 'x', qos: 0 },
      { op: 'publish', topic: 'devices/dev-2/spoof', payload: 'x', qos: 1 },
      { op: 'publish', topic: 'devices/dev-2/spoof', payload: 'x', qos: 2 },
      { op: 'publish', topic: 'commands/dev-1/x', payload: 'x', qos: 1 },
      { op: 'publish', topic: 'devices/dev-1/after', payload: 'ok', qos: 1 },
    ]);
    expect(r.slice(0, 5)).toEqual([0, 0, 0x87, 0x87, 0x87]);
    expect(r[5]).toBeLessThan(0x80);
    const [, , after, others] = await collector;
    expect(after).toMatchObject({ topic: 'devices/dev-1/after', payload: 'ok' });
    expect(others).toEqual([]);
    await eventually(async () => metricValue(await brokerMetrics(), 'fsmn_proxy_mqtt_denied_total', { source: `${NS}/device`, kind: 'publish' }), (n) => n >= before + 4, 5000);
  }, 60_000);

  test('a denied PUBLISH under MQTT 3.1.1 closes the connection, as brokers do; nothing reaches the broker', async () => {
    const collector = mqtt(c, 4, [{ op: 'connect', clientId: 'collector-deny4' }, { op: 'subscribe', filters: [{ filter: 'devices/#', qos: 1 }] }, { op: 'sleep', ms: 2500 }, { op: 'received' }]);
    await sleep(700);
    const r = await mqtt(d2, 4, [{ op: 'connect', clientId: 'dev-2' }, { op: 'publish', topic: 'devices/dev-1/spoof', payload: 'x', qos: 1 }, { op: 'closed' }]);
    expect(r).toEqual([0, null, true]);
    expect((await collector)[3]).toEqual([]);
  }, 30_000);

  test.each([
    [5, [0x01, 0x87, 0x87, 0x02]],
    [4, [0x01, 0x80, 0x80, 0x02]],
  ] as const)('MQTT %s: a SUBSCRIBE mixing allowed and denied filters gets %j in the client\'s order, and the broker holds only the allowed ones', async (v, codes) => {
    const dev = mqtt(d2, v, [
      { op: 'connect', clientId: 'dev-2' },
      { op: 'subscribe', filters: [{ filter: 'commands/dev-2/+', qos: 1 }, { filter: 'devices/#', qos: 1 }, { filter: 'commands/dev-1/x', qos: 1 }, { filter: 'commands/dev-2/y', qos: 2 }] },
      { op: 'message', topic: 'commands/dev-2/go', timeoutMs: 8000 },
      { op: 'sleep', ms: 500 },
      { op: 'received' },
    ]);
    await sleep(700);
    // The collector commands dev-2 (allowed to it); dev-1 publishes under its own prefix, which dev-2's denied devices/# would have matched.
    await mqtt(d1, v, [{ op: 'connect', clientId: 'dev-1' }, { op: 'publish', topic: 'devices/dev-1/telemetry', payload: 't', qos: 1 }]);
    await mqtt(c, v, [{ op: 'connect', clientId: 'collector-cmd' }, { op: 'publish', topic: 'commands/dev-1/x', payload: 'not for dev-2', qos: 1 }, { op: 'publish', topic: 'commands/dev-2/go', payload: 'go', qos: 1 }]);
    const [, got, cmd, , rest] = await dev;
    expect(got).toEqual([...codes]);
    expect(cmd).toMatchObject({ topic: 'commands/dev-2/go', payload: 'go' });
    expect(rest).toEqual([]);
    // Every filter denied: answered by the proxy alone, with a SUBACK of failures.
    expect((await mqtt(d2, v, [{ op: 'connect', clientId: 'dev-2' }, { op: 'subscribe', filters: [{ filter: '#', qos: 0 }, { filter: '$SYS/#', qos: 0 }] }]))[1]).toEqual([codes[1], codes[1]]);
  }, 60_000);

  test('CONNECT: a client id outside the pattern gets CONNACK 5 (3.1.1) or 0x87 (5); a source with no rule at all never reaches the broker', async () => {
    expect(await mqtt(d1, 4, [{ op: 'connect', clientId: 'rogue' }, { op: 'closed' }])).toEqual([5, true]);
    expect(await mqtt(d2, 5, [{ op: 'connect', clientId: 'rogue' }, { op: 'closed' }])).toEqual([0x87, true]);
    // Same client id as a device, but the proven identity is the intruder's: refused before any packet is read.
    expect(await mqtt(x, 5, [{ op: 'connect', clientId: 'dev-2' }, { op: 'closed' }])).toEqual([null, true]);
    const m = await brokerMetrics();
    expect(metricValue(m, 'fsmn_proxy_mqtt_connects_total', { source: `${NS}/device`, broker: `${NS}/broker`, result: 'not-authorized' })).toBeGreaterThanOrEqual(2);
  }, 30_000);

  test('will messages: an allowed will reaches the collector when its device dies; a will outside the device\'s prefix refuses the CONNECT', async () => {
    const collector = mqtt(c, 5, [{ op: 'connect', clientId: 'collector-will' }, { op: 'subscribe', filters: [{ filter: 'devices/+/status', qos: 1 }] }, { op: 'message', topic: 'devices/dev-1/status', timeoutMs: 8000 }]);
    await sleep(700);
    expect(await mqtt(d1, 5, [{ op: 'connect', clientId: 'dev-1', will: { topic: 'devices/dev-1/status', payload: 'gone', qos: 1 } }, { op: 'kill' }])).toEqual([0, null]);
    expect((await collector)[2]).toMatchObject({ topic: 'devices/dev-1/status', payload: 'gone' });
    expect(await mqtt(d1, 4, [{ op: 'connect', clientId: 'dev-1', will: { topic: 'devices/dev-2/status', payload: 'x' } }, { op: 'closed' }])).toEqual([5, true]);
    expect(metricValue(await brokerMetrics(), 'fsmn_proxy_mqtt_denied_total', { kind: 'will' })).toBeGreaterThanOrEqual(1);
  }, 30_000);

  test('retained messages are kept by the broker and delivered to a later subscriber across nodes', async () => {
    expect(await mqtt(d2, 5, [{ op: 'connect', clientId: 'dev-2' }, { op: 'publish', topic: 'devices/dev-2/config', payload: 'v1', qos: 1, retain: true }])).toEqual([0, expect.any(Number)]);
    const got = await mqtt(c, 4, [{ op: 'connect', clientId: 'collector-retained' }, { op: 'subscribe', filters: [{ filter: 'devices/dev-2/config', qos: 1 }] }, { op: 'message', topic: 'devices/dev-2/config' }]);
    expect(got).toEqual([0, [1], { topic: 'devices/dev-2/config', payload: 'v1', qos: 1, retain: true }]);
  }, 30_000);

  test('metrics at the broker\'s node proxy: per source identity and broker, by direction, QoS and folded topic', async () => {
    const m = await eventually(brokerMetrics, (t) => metricValue(t, 'fsmn_proxy_mqtt_messages_total', { direction: 'deliver' }) > 0, 5000);
    expect(metricValue(m, 'fsmn_proxy_mqtt_messages_total', { source: `${NS}/device`, broker: `${NS}/broker`, direction: 'publish', qos: '1', topic: 'devices/dev-1/#' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_mqtt_messages_total', { source: `${NS}/collector`, broker: `${NS}/broker`, direction: 'deliver', topic: 'devices/dev-1/#' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_mqtt_bytes_total', { source: `${NS}/device`, direction: 'publish' })).toBeGreaterThan(0);
    expect(metricValue(m, 'fsmn_proxy_mqtt_connects_total', { source: `${NS}/collector`, result: 'accepted' })).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, 'fsmn_proxy_mqtt_denied_total', { source: `${NS}/device`, kind: 'subscribe' })).toBeGreaterThanOrEqual(1);
    // Folded to 2 levels: no label holds a third level.
    const topics = [...m.matchAll(/fsmn_proxy_mqtt_messages_total\{[^}]*topic="([^"]*)"/g)].map((t) => t[1]!);
    expect(topics.length).toBeGreaterThan(0);
    expect(topics.filter((t) => t.split('/').length > 3 || (t.split('/').length === 3 && !t.endsWith('/#')))).toEqual([]);
  }, 30_000);

  test('fuzz: malformed and oversized packets for 4 s close their connections with a counted reason; the proxy keeps serving, within bounded memory', async () => {
    const proxyPid = proxies.get(n1)!.child.pid!;
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${proxyPid}/status`, 'utf8'))?.[1] ?? 0);
    const rssBefore = rss();
    const before = await brokerMetrics();
    const runs = await Promise.all(
      ([[d1, 4], [d2, 5]] as const).map(async ([p, v], i) => {
        const r = await p.run(process.execPath, ['--import', tsRegister, client, 'fuzz', BROKER_IP, String(PORT), JSON.stringify({ version: v, seconds: 4, seed: 1000 + i })]);
        return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { connections: number; closed: number; open: number };
      }),
    );
    for (const r of runs) expect(r.connections).toBeGreaterThan(20);
    // Every connection closed but those waiting for the rest of a packet they announced (up to maxPacketBytes).
    for (const r of runs) expect(r.closed / r.connections).toBeGreaterThan(0.6);
    const after = await eventually(brokerMetrics, (t) => metricValue(t, 'fsmn_proxy_mqtt_closed_total', { reason: 'oversized' }) > metricValue(before, 'fsmn_proxy_mqtt_closed_total', { reason: 'oversized' }), 5000);
    for (const reason of ['malformed', 'oversized', 'protocol-error']) {
      expect({ reason, more: metricValue(after, 'fsmn_proxy_mqtt_closed_total', { reason }) > metricValue(before, 'fsmn_proxy_mqtt_closed_total', { reason }) }).toEqual({ reason, more: true });
    }
    expect(proxies.get(n1)!.child.exitCode).toBeNull();
    // Bounded: no packet is buffered beyond maxPacketBytes (1 MiB), whatever length was announced.
    expect(rss() - rssBefore).toBeLessThan(64 * 1024);
    // Still serving.
    expect(await mqtt(d1, 5, [{ op: 'connect', clientId: 'dev-1' }, { op: 'publish', topic: 'devices/dev-1/alive', payload: 'y', qos: 1 }])).toEqual([0, expect.any(Number)]);
  }, 60_000);
});
