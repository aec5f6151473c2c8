import type { ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { noExclusions } from '../src/dataplane/types.js';
import type { MqttBenchResult } from '../src/lab/mqtt-client.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../src/policy/schema.js';
import type { ProxyIdentityFiles, ProxyNodeFacts } from '../src/proxy/config.js';
import type { ProxySupervisor } from '../src/proxy/supervisor.js';
import { packageRoot } from '../src/util/paths.js';
import { benchCa, benchLeaf } from './certs.js';
import { cgroupCpuUs, intFlag, nodeProxy, round } from './util.js';

/**
 * mqtt: publish-to-deliver through the node proxies against straight to the
 * broker, in one run. A mosquitto broker in pod b (node n1); one subscriber
 * and --publishers publisher connections in one client process, timing every
 * message from PUBLISH written to PUBLISH delivered:
 *
 *   direct         from n1's node namespace to the broker pod (no mesh);
 *   same-node      pod a (n1) -> n1's proxy (MQTT access control) -> b;
 *   cross-node     pod c (n2) -> n2's proxy -> mTLS tunnel -> n1's proxy (MQTT access control) -> b;
 *   same-node-l4, cross-node-l4   the same hops to a second broker port the
 *                  mesh carries as plain TCP (a TCPRoute): what the proxy costs
 *                  without reading MQTT, the floor for the MQTT paths.
 *
 * smi policy with an MQTTRouteGroup (every packet judged, as in production),
 * iptables interception. QoS 0 and 1; QoS 1 keeps --window PUBLISHes in
 * flight per publisher.
 *
 * Rows: msgs/s, p50/p99 ms, ratio to direct of the same QoS and round, and
 * CPU time per delivered message of every part (cgroup v2 cpu.stat, so it
 * does not depend on what else the machine runs): both proxies, the broker,
 * the client (and client_cpu_share: its CPU time / wall time; near 1 means
 * the client, not the mesh, was the limit). On a shared machine rates move
 * with the load; CPU per message does not, and ratios count only within a run.
 *
 * --baseline DIR runs each round twice, once with the proxy program in DIR
 * (e.g. an older proxy/ from `git archive`), once with this tree's proxy/,
 * alternating which goes first: before/after side by side. After the rounds,
 * one `summary` row per program and case with the medians.
 *
 * --bare adds a third program, bench/pipy/bare-forwarder.js run as main.js next
 * to a copy of this tree's proxy/: the same routing and mTLS tunnel, no
 * JavaScript per chunk and no policy. Run it on the -l4 paths (the MQTT port
 * is plain TCP to it): the forwarding floor of Pipy itself, side by side with
 * the program's plain-TCP path.
 *
 * --instances 1,2 runs every program once per count of Pipy processes per
 * node (each node's proxy; the supervisor's default is 2, one per core here).
 *
 * --client split runs the subscriber and each publisher as a process of its
 * own (mqtt-client bench-sub / bench-pub), so that on the direct path a
 * single Node process near a full core does not set the rate.
 *
 *   npm run bench -- mqtt [--messages 5000] [--window 16] [--payload 64] [--publishers 1]
 *        [--rounds 3] [--qos 0,1] [--paths direct,same-node,cross-node,same-node-l4,cross-node-l4]
 *        [--baseline DIR] [--bare] [--instances N[,N]] [--client single|split]
 */

const PORT = 1883;
const L4_PORT = 1884;
const OUT = 15001;
const IN = 15003;
const NS = 'bench';
const BROKER_IP = '10.96.7.1';
const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
const clientScript = fileURLToPath(new URL(`../src/lab/mqtt-client${ext}`, import.meta.url));
const PATHS = ['direct', 'same-node', 'cross-node', 'same-node-l4', 'cross-node-l4'] as const;
type PathName = (typeof PATHS)[number];

function policyFor(node: TopoNode, nodes: TopoNode[], pods: TopoPod[], broker: TopoPod): NodePolicy {
  const local = pods.filter((p) => p.node === node);
  const sources = pods.filter((p) => p !== broker).map((p) => ({ namespace: NS, serviceAccount: p.name }));
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
              destination: { namespace: NS, serviceAccount: broker.name, port: PORT },
              sources,
              rules: [{ kind: 'MQTTRouteGroup' as const, name: 'bench', matches: [{ name: 'bench', clientId: 'bench-.*', publish: ['bench/#'], subscribe: ['bench/#'] }] }],
            },
            {
              namespace: NS,
              name: 'clients-l4',
              destination: { namespace: NS, serviceAccount: broker.name, port: L4_PORT },
              sources,
              rules: [{ kind: 'TCPRoute' as const, name: 'bench-l4', ports: [L4_PORT] }],
            },
          ]
        : [],
    services: [
      {
        namespace: NS,
        name: 'broker',
        clusterIPs: [BROKER_IP],
        ports: [
          { name: 'mqtt', port: PORT, protocol: 'TCP' as const, appProtocol: null },
          { name: 'plain', port: L4_PORT, protocol: 'TCP' as const, appProtocol: null },
        ],
        endpoints: [{ ip: broker.ip, ports: { mqtt: PORT, plain: L4_PORT }, node: broker.node.name, pod: { namespace: NS, name: broker.name }, serviceAccount: broker.name }],
      },
    ],
    splits: [],
  };
  return NodePolicySchema.parse({ ...body, version: '0123456789abcdef' });
}

interface Place {
  run: TopoNode['run'];
  exec: TopoNode['exec'];
}

interface Options {
  messages: number;
  window: number;
  payload: number;
  publishers: number;
  /** 'split': the subscriber and each publisher in a process of its own (bench-sub, bench-pub). */
  client: 'single' | 'split';
}

function lastJson<T>(stdout: string, what: string, stderr = ''): T {
  const out = JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as T & { error?: string };
  if (out.error) throw new Error(`mqtt bench ${what}: ${out.error} ${stderr}`);
  return out;
}

let splitRun = 0;

/** The split client: the subscriber first (its ready line), then the publishers, each its own process. */
async function measureSplit(place: Place, host: string, port: number, qos: number, o: Options): Promise<MqttBenchResult> {
  const base = { version: 5, qos, id: `bench-${process.pid}-${++splitRun}` };
  const sub = place.exec(process.execPath, [...process.execArgv, clientScript, 'bench-sub', host, String(port), JSON.stringify({ ...base, messages: o.messages })], { stdio: 'pipe' });
  let out = '';
  let err = '';
  sub.stdout?.on('data', (d: Buffer) => (out += d.toString('utf8')));
  sub.stderr?.on('data', (d: Buffer) => (err += d.toString('utf8')));
  const exited = new Promise<void>((res) => sub.once('exit', () => res()));
  try {
    await new Promise<void>((res, rej) => {
      const t = setTimeout(() => rej(new Error(`mqtt bench-sub not ready in 15 s: ${out} ${err}`)), 15_000);
      sub.stdout?.on('data', () => {
        if (out.includes('"ready"')) {
          clearTimeout(t);
          res();
        }
      });
      void exited.then(() => {
        clearTimeout(t);
        rej(new Error(`mqtt bench-sub exited before it was ready: ${out} ${err}`));
      });
    });
    const share = (i: number): number => Math.floor(o.messages / o.publishers) + (i < o.messages % o.publishers ? 1 : 0);
    const pubs = await Promise.all(
      Array.from({ length: o.publishers }, (_, i) =>
        place.run(process.execPath, [...process.execArgv, clientScript, 'bench-pub', host, String(port), JSON.stringify({ ...base, messages: share(i), window: o.window, payloadBytes: o.payload, index: i })]),
      ),
    );
    const pubCpu = pubs.reduce((sum, r) => sum + lastJson<{ client_cpu_ms: number }>(r.stdout, 'bench-pub', r.stderr).client_cpu_ms, 0);
    await exited;
    const r = lastJson<MqttBenchResult>(out, 'bench-sub', err);
    if (r.delivered === undefined) throw new Error(`mqtt bench-sub: ${out} ${err}`);
    return { ...r, client_cpu_ms: r.client_cpu_ms + pubCpu };
  } finally {
    if (sub.exitCode === null) sub.kill('SIGTERM');
  }
}

async function measure(place: Place, host: string, port: number, qos: number, o: Options): Promise<MqttBenchResult> {
  if (o.client === 'split') return measureSplit(place, host, port, qos, o);
  const spec = { version: 5, qos, messages: o.messages, window: o.window, payloadBytes: o.payload, publishers: o.publishers };
  const r = await place.run(process.execPath, [...process.execArgv, clientScript, 'bench', host, String(port), JSON.stringify(spec)]);
  const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as MqttBenchResult & { error?: string };
  if (out.error || out.delivered === undefined) throw new Error(`mqtt bench client: ${r.stdout} ${r.stderr}`);
  return out;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function listFlag<T extends string>(flags: Record<string, string | boolean>, name: string, all: readonly T[], dflt: readonly T[]): T[] {
  const v = flags[name];
  if (v === undefined) return [...dflt];
  if (typeof v !== 'string') throw new Error(`--${name} takes a comma-separated list of ${all.join(', ')}`);
  const items = v.split(',').map((x) => x.trim());
  for (const x of items) if (!all.includes(x as T)) throw new Error(`--${name}: ${JSON.stringify(x)} is not one of ${all.join(', ')}`);
  return items as T[];
}

interface Row {
  bench: 'mqtt';
  program: string;
  round: number;
  case: string;
  qos: number;
  path: PathName;
  messages: number;
  delivered: number;
  msgs_per_s: number;
  p50_ms: number;
  p99_ms: number;
  ratio_to_direct: number | null;
  proxy_us_per_msg: number;
  proxy_broker_node_us_per_msg: number;
  proxy_client_node_us_per_msg: number;
  broker_us_per_msg: number;
  client_us_per_msg: number;
  /** Cores' worth of client CPU over the run (with --client split, summed over its processes: may exceed 1). */
  client_cpu_share: number;
  client_processes: number;
  window: number | null;
  publishers: number;
  payload_bytes: number;
  loadavg_1m: number;
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const client = flags.client ?? 'single';
  if (client !== 'single' && client !== 'split') throw new Error(`--client ${JSON.stringify(client)}: single (one process: subscriber and publishers) or split (a process each)`);
  const o: Options = { messages: intFlag(flags, 'messages', 5000), window: intFlag(flags, 'window', 16), payload: intFlag(flags, 'payload', 64), publishers: intFlag(flags, 'publishers', 1), client };
  if (o.messages < 1 || o.window < 1 || o.publishers < 1 || o.payload < 8) throw new Error('--messages, --window and --publishers must be at least 1, --payload at least 8 (the send time)');
  const rounds = intFlag(flags, 'rounds', 3);
  const qosList = listFlag(flags, 'qos', ['0', '1'] as const, ['0', '1']).map(Number);
  const paths = listFlag(flags, 'paths', PATHS, PATHS);
  if (!paths.includes('direct')) paths.unshift('direct');
  let programs: Array<{ name: string; dir: string | undefined; instances?: number }> = [{ name: 'current', dir: undefined }];
  if (typeof flags.baseline === 'string') {
    const dir = resolve(flags.baseline);
    if (!existsSync(join(dir, 'main.js'))) throw new Error(`--baseline ${JSON.stringify(flags.baseline)}: no main.js there (give a directory holding a proxy program, e.g. from git archive)`);
    programs.unshift({ name: 'baseline', dir });
  } else if (flags.baseline !== undefined) throw new Error('--baseline takes a directory');

  const work = mkdtempSync(join(tmpdir(), 'fsmbench-mqtt-'));
  if (flags.bare !== undefined) programs.unshift({ name: 'bare', dir: bareProgram(join(work, 'bare')) });
  // --instances 1,2: each program once per count of Pipy processes per node (default: the supervisor's, 2).
  if (flags.instances !== undefined) {
    const counts = String(flags.instances).split(',').map((x) => Number(x.trim()));
    if (counts.some((n) => !Number.isInteger(n) || n < 1 || n > 8)) throw new Error(`--instances ${JSON.stringify(flags.instances)}: a comma-separated list of Pipy processes per node, 1 to 8`);
    programs = programs.flatMap((p) => counts.map((n) => ({ ...p, name: counts.length > 1 ? `${p.name}/i${n}` : p.name, instances: n })));
  }
  const topo = await Topology.create({ prefix: `fsmbmq${process.pid % 10000}`, nodes: 2, podsPerNode: 0 });
  const children: ChildProcess[] = [];
  let sups: ProxySupervisor[] = [];
  const dps: IptablesDataplane[] = [];
  const rows: Row[] = [];
  try {
    const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
    const b = await topo.addPod(n1, 'b');
    const a = await topo.addPod(n1, 'a');
    const c = await topo.addPod(n2, 'c');
    const pods = [b, a, c];
    const conf = join(work, 'mosquitto.conf');
    // max_queued_messages 0: mosquitto's default (1000 QoS 1 messages queued per client) drops deliveries once the
    // subscriber falls that far behind 4 publishers; the bench wants every message delivered and its wait measured.
    writeFileSync(conf, `listener ${PORT} 0.0.0.0\nlistener ${L4_PORT} 0.0.0.0\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n`);
    const broker = b.exec('mosquitto', ['-c', conf], { stdio: ['ignore', 'ignore', 'ignore'] });
    children.push(broker);
    const ca = await benchCa();
    const facts = new Map<TopoNode, ProxyNodeFacts>();
    for (const node of [n1, n2]) {
      const identities: Record<string, ProxyIdentityFiles> = {};
      for (const p of node.pods) identities[`${NS}/${p.name}`] = await benchLeaf(ca.signer, NS, p.name, join(work, 'ids', node.name));
      facts.set(node, { outboundPort: OUT, inboundPort: IN, trust: ca.trust, identities });
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
    const startProxies = async (program: { name: string; dir: string | undefined; instances?: number }, round: number): Promise<void> => {
      for (const node of [n1, n2]) {
        const pipy = { ...(program.dir === undefined ? {} : { programDir: program.dir }), ...(program.instances === undefined ? {} : { instances: program.instances }) };
        const extra = { drainMs: 500, pipy };
        const sup = nodeProxy(node, policyFor(node, [n1, n2], pods, b), join(work, `${node.name}-${program.name.replace('/', '-')}-${round}`), facts.get(node)!, extra);
        sups.push(sup);
        await sup.start();
        await sup.waitReady(15_000);
      }
    };
    const stopProxies = async (): Promise<void> => {
      for (const s of sups) await s.stop(1000).catch(() => undefined);
      sups = [];
    };
    // The broker is up when a direct client gets through.
    for (let i = 0; ; i++) {
      const r = await measure(n1, b.ip, PORT, 0, { ...o, messages: 10 }).catch((e: unknown) => e as Error);
      if (!(r instanceof Error)) break;
      if (i > 20) throw r;
      await new Promise((res) => setTimeout(res, 250));
    }
    const where: Record<PathName, [Place, string, number]> = {
      direct: [n1, b.ip, PORT],
      'same-node': [a, BROKER_IP, PORT],
      'cross-node': [c, BROKER_IP, PORT],
      'same-node-l4': [a, BROKER_IP, L4_PORT],
      'cross-node-l4': [c, BROKER_IP, L4_PORT],
    };
    for (let pass = 1; pass <= rounds; pass++) {
      // Rotate which program goes first, so none always meets the same moment of the machine.
      const order = programs.map((_, i) => programs[(i + pass - 1) % programs.length]!);
      for (const program of order) {
        await startProxies(program, pass);
        try {
          for (const qos of qosList) {
            let direct: MqttBenchResult | undefined;
            for (const path of paths) {
              const [place, host, port] = where[path];
              const cpu0 = [cgroupCpuUs(n1.proxyCgroup), cgroupCpuUs(n2.proxyCgroup), cgroupCpuUs(b.cgroupPath)];
              const r = await measure(place, host, port, qos, o);
              const cpu1 = [cgroupCpuUs(n1.proxyCgroup), cgroupCpuUs(n2.proxyCgroup), cgroupCpuUs(b.cgroupPath)];
              const per = (i: number): number => round1((cpu1[i]! - cpu0[i]!) / Math.max(1, r.delivered));
              if (path === 'direct') direct = r;
              const row: Row = {
                bench: 'mqtt',
                program: program.name,
                round: pass,
                case: `qos${qos}/${path}`,
                qos,
                path,
                messages: r.messages,
                delivered: r.delivered,
                msgs_per_s: r.msgs_per_s,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                ratio_to_direct: direct ? round(r.msgs_per_s / direct.msgs_per_s, 2) : null,
                proxy_us_per_msg: round1(per(0) + per(1)),
                proxy_broker_node_us_per_msg: per(0),
                proxy_client_node_us_per_msg: per(1),
                // The broker's pod cgroup holds only mosquitto.
                broker_us_per_msg: per(2),
                client_us_per_msg: round1((r.client_cpu_ms * 1000) / Math.max(1, r.delivered)),
                client_cpu_share: round(r.client_cpu_ms / 1000 / r.seconds, 2),
                client_processes: o.client === 'split' ? 1 + o.publishers : 1,
                window: qos === 0 ? null : o.window,
                publishers: o.publishers,
                payload_bytes: o.payload,
                loadavg_1m: round(loadavg()[0]!, 2),
              };
              rows.push(row);
              yield row;
            }
          }
        } finally {
          await stopProxies();
        }
      }
    }
    for (const program of programs) {
      for (const qos of qosList) {
        for (const path of paths) {
          const rs = rows.filter((r) => r.program === program.name && r.qos === qos && r.path === path);
          const med = (k: keyof Row): number => round(median(rs.map((r) => Number(r[k]))), 2);
          yield {
            bench: 'mqtt',
            summary: true,
            program: program.name,
            case: `qos${qos}/${path}`,
            rounds: rs.length,
            msgs_per_s: med('msgs_per_s'),
            ratio_to_direct: path === 'direct' ? 1 : med('ratio_to_direct'),
            p99_ms: med('p99_ms'),
            proxy_us_per_msg: med('proxy_us_per_msg'),
            broker_us_per_msg: med('broker_us_per_msg'),
            client_us_per_msg: med('client_us_per_msg'),
            client_cpu_share: med('client_cpu_share'),
            loadavg_1m: round(loadavg()[0]!, 2),
          };
        }
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

/** The bare forwarder's program directory: this tree's proxy/*.js, with bench/pipy/bare-forwarder.js as main.js. */
function bareProgram(dir: string): string {
  const proxy = join(packageRoot(), 'proxy');
  mkdirSync(dir, { recursive: true });
  for (const f of readdirSync(proxy)) if (f.endsWith('.js')) copyFileSync(join(proxy, f), join(dir, f));
  copyFileSync(join(packageRoot(), 'bench', 'pipy', 'bare-forwarder.js'), join(dir, 'main.js'));
  return dir;
}

const round1 = (x: number): number => Math.round(x * 10) / 10;
