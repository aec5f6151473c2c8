import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { noExclusions } from '../src/dataplane/types.js';
import type { MqttBenchResult } from '../src/lab/mqtt-client.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import type { ProxyIdentityFiles, ProxyNodeFacts } from '../src/proxy/config.js';
import type { ProxySupervisor } from '../src/proxy/supervisor.js';
import { benchCa, benchLeaf } from './certs.js';
import { intFlag, nodeProxy, round } from './util.js';

/**
 * mqtt: publish-to-deliver through the node proxies against straight to the
 * broker, in one run. A mosquitto broker in pod b (node n1); a publisher and a
 * subscriber on one connection each, in one process, timing every message
 * from PUBLISH written to PUBLISH delivered:
 *
 *   direct       from n1's node namespace to the broker pod (no mesh);
 *   same-node    pod a (n1) -> n1's proxy (MQTT access control) -> b;
 *   cross-node   pod c (n2) -> n2's proxy -> mTLS tunnel -> n1's proxy (MQTT access control) -> b.
 *
 * smi policy with an MQTTRouteGroup (every packet judged, as in production),
 * iptables interception. QoS 0 and 1; QoS 1 keeps `--window` PUBLISHes in
 * flight. Rows: msgs/s, p50/p99 ms, ratio to direct of the same QoS.
 * Everything shares the machine's cores: compare rows of one run.
 *   npm run bench -- mqtt [--messages 5000] [--window 16] [--payload 64]
 */

const PORT = 1883;
const OUT = 15001;
const IN = 15003;
const NS = 'bench';
const BROKER_IP = '10.96.7.1';
const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
const clientScript = fileURLToPath(new URL(`../src/lab/mqtt-client${ext}`, import.meta.url));

function policyFor(node: TopoNode, nodes: TopoNode[], pods: TopoPod[], broker: TopoPod): NodePolicy {
  const local = pods.filter((p) => p.node === node);
  const body = {
    apiVersion: POLICY_API_VERSION,
    kind: 'NodePolicy',
    mesh: { name: 'bench', inbound: 'permissive', interceptionMode: 'iptables', egress: 'allow', trafficPolicy: 'smi', exclusions: noExclusions() },
    proxies: nodes.map((n) => ({ node: n.name, addresses: [n.underlayIp, n.gateway] })),
    node: { name: node.name, addresses: [node.gateway, node.underlayIp], interceptionMode: null },
    meshPods: pods.map((p) => ({ ip: p.ip, namespace: NS, serviceAccount: p.name, node: p.node.name })),
    pods: local.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, serviceAccount: p.name, cgroup: { qosClass: null, path: p.cgroupPath }, exclusions: noExclusions() })),
    access:
      broker.node === node
        ? [
            {
              namespace: NS,
              name: 'clients',
              destination: { namespace: NS, serviceAccount: broker.name, port: null },
              sources: pods.filter((p) => p !== broker).map((p) => ({ namespace: NS, serviceAccount: p.name })),
              rules: [{ kind: 'MQTTRouteGroup' as const, name: 'bench', matches: [{ name: 'bench', clientId: 'bench-.*', publish: ['bench/#'], subscribe: ['bench/+'] }] }],
            },
          ]
        : [],
    services: [
      {
        namespace: NS,
        name: 'broker',
        clusterIPs: [BROKER_IP],
        ports: [{ name: 'mqtt', port: PORT, protocol: 'TCP' as const, appProtocol: null }],
        endpoints: [{ ip: broker.ip, ports: { mqtt: PORT }, node: broker.node.name, pod: { namespace: NS, name: broker.name }, serviceAccount: broker.name }],
      },
    ],
    splits: [],
  };
  return NodePolicySchema.parse({ ...body, version: '0123456789abcdef' });
}

interface Place {
  run: TopoNode['run'];
}

async function measure(place: Place, host: string, qos: number, o: { messages: number; window: number; payload: number }): Promise<MqttBenchResult> {
  const r = await place.run(process.execPath, [...process.execArgv, clientScript, 'bench', host, String(PORT), JSON.stringify({ version: 5, qos, messages: o.messages, window: o.window, payloadBytes: o.payload })]);
  const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as MqttBenchResult & { error?: string };
  if (out.error || out.delivered === undefined) throw new Error(`mqtt bench client: ${r.stdout} ${r.stderr}`);
  return out;
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const o = { messages: intFlag(flags, 'messages', 5000), window: intFlag(flags, 'window', 16), payload: intFlag(flags, 'payload', 64) };
  const work = mkdtempSync(join(tmpdir(), 'fsmbench-mqtt-'));
  const topo = await Topology.create({ prefix: `fsmbmq${process.pid % 10000}`, nodes: 2, podsPerNode: 0 });
  const children: ChildProcess[] = [];
  const sups: ProxySupervisor[] = [];
  const dps: IptablesDataplane[] = [];
  try {
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const b = await topo.addPod(n1, 'b');
    const a = await topo.addPod(n1, 'a');
    const c = await topo.addPod(n2, 'c');
    const pods = [b, a, c];
    const conf = join(work, 'mosquitto.conf');
    writeFileSync(conf, `listener ${PORT} 0.0.0.0\nallow_anonymous true\npersistence false\n`);
    const broker = b.exec('mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(broker);
    const ca = await benchCa();
    for (const node of [n1, n2]) {
      const identities: Record<string, ProxyIdentityFiles> = {};
      for (const p of node.pods) identities[`${NS}/${p.name}`] = await benchLeaf(ca.signer, NS, p.name, join(work, 'ids', node.name));
      const facts: ProxyNodeFacts = { outboundPort: OUT, inboundPort: IN, trust: ca.trust, identities };
      const sup = nodeProxy(node, policyFor(node, [n1, n2], pods, b), join(work, node.name), facts, { drainMs: 500 });
      sups.push(sup);
      await sup.start();
      await sup.waitReady(15_000);
      const dp = new IptablesDataplane({ netns: node.netns });
      dps.push(dp);
      await dp.apply({
        proxy: { address: node.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: node.proxyCgroup },
        nodeAddresses: [node.gateway, node.underlayIp],
        proxySources: [n1.gateway, n1.underlayIp, n2.gateway, n2.underlayIp],
        mesh: noExclusions(),
        pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
      });
    }
    // The broker is up when a direct client gets through.
    for (let i = 0; ; i++) {
      const r = await measure(n1, b.ip, 0, { ...o, messages: 10 }).catch((e: unknown) => e as Error);
      if (!(r instanceof Error)) break;
      if (i > 20) throw r;
      await new Promise((res) => setTimeout(res, 250));
    }
    const paths: Array<[string, Place, string]> = [
      ['direct', n1, b.ip],
      ['same-node', a, BROKER_IP],
      ['cross-node', c, BROKER_IP],
    ];
    for (const qos of [0, 1]) {
      let direct: MqttBenchResult | undefined;
      for (const [path, place, host] of paths) {
        const r = await measure(place, host, qos, o);
        if (path === 'direct') direct = r;
        yield {
          bench: 'mqtt',
          case: `qos${qos}/${path}`,
          qos,
          path,
          messages: r.messages,
          delivered: r.delivered,
          msgs_per_s: r.msgs_per_s,
          p50_ms: r.p50_ms,
          p99_ms: r.p99_ms,
          ratio_to_direct: direct ? round(r.msgs_per_s / direct.msgs_per_s, 2) : null,
          window: qos === 0 ? null : o.window,
          payload_bytes: o.payload,
          loadavg_1m: round(loadavg()[0]!, 2),
        };
      }
    }
  } finally {
    for (const dp of dps) await dp.cleanup().catch(() => undefined);
    for (const s of sups) await s.stop(1000).catch(() => undefined);
    for (const ch of children) ch.kill('SIGTERM');
    await topo.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
