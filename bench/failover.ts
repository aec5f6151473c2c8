import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createServer, type AddressInfo } from 'node:net';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { noExclusions } from '../src/dataplane/types.js';
import { IptablesDataplane } from '../src/dataplane/iptables/index.js';
import { Topology, type TopoNode, type TopoPod } from '../src/lab/topology.js';
import { MulticlusterController } from '../src/multicluster/controller.js';
import { clusterTrustDomain } from '../src/multicluster/api.js';
import { createClustersetCa, GATEWAY_IDENTITY, issueClusterIdentity, issueMeshCa } from '../src/multicluster/identity.js';
import { identityKey } from '../src/identity/spiffe.js';
import { createCsr, generateKeyPair, loadSigner, privateKeyToPem, signLeaf, type CaSigner } from '../src/identity/x509.js';
import { PolicyCompiler } from '../src/policy/compiler.js';
import type { Kind } from '../src/policy/objects.js';
import type { NodePolicy } from '../src/policy/schema.js';
import { renderProxyConfig, type ProxyIdentityFiles, type ProxyNodeFacts } from '../src/proxy/config.js';
import type { ProxySupervisor } from '../src/proxy/supervisor.js';
import { drainEnds, nodeProxy, quantile, round } from './util.js';

/**
 * failover: two clusters ("sites") on one machine, for real: network
 * namespaces for nodes and pods, iptables interception, the project's Pipy
 * program on every node, and for each cluster its own compiler and
 * clusterset member (MulticlusterController) exchanging exports over mutual
 * TLS. Node proxies get the configs their cluster compiles, as agents would.
 *
 *   c2: node n1 (gateway) with the client pod A and web pod L
 *   c1: nodes g1, g2 (gateways) with web pods R1, R2
 *
 * `web` in namespace shop is exported by both; A calls its clusterset IP.
 * The benchmark drives 100 requests/s of GET from A through three faults:
 *   local-gone:        FailOver (c2, then c1): all of c2's local endpoints
 *                      fail (the server dies while the policy still lists
 *                      it), then are removed from the policy;
 *   controller-killed: ActiveActive, c1's controller (clusterset member) stops;
 *   link-cut:          ActiveActive, c1's uplink drops every packet (iptables
 *                      DROP on both gateways' uplink);
 *   link-restored:     how long until c1 serves again once the link is back.
 * For each: failed requests, time until every request succeeds again (from
 * the fault), p99 latency in the 5 s after the fault. One JSON line per case.
 *
 *   npm run bench -- failover [--rate 100] [--seconds 12]
 * The machine is shared: report the load average next to the numbers.
 */

const NS = 'shop';
const PORT = 8080;
const OUT = 15001;
const IN = 15003;
const GW = 15005;
const HTTP_SERVER = `
const http = require('node:http');
const name = process.argv[1];
http.createServer((req, res) => { const b = JSON.stringify({ pod: name }); res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(b) }); res.end(b); })
  .listen(${PORT}, '0.0.0.0', () => console.log('listening'));
`;

// GETs at a fixed rate for a time; one JSON line: [start ms from t0, duration ms, status (0 failed), pod].
export const RATE_LOAD = `
const http = require('node:http');
const [url, rate, seconds] = process.argv.slice(1);
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
const out = [];
const t0 = Date.now();
let pending = 0, started = 0;
const total = Number(rate) * Number(seconds);
const one = () => {
  const s = Date.now();
  pending++;
  const done = (status, pod) => { out.push([s - t0, Date.now() - s, status, pod || '']); if (--pending === 0 && started >= total) finish(); };
  const req = http.get(url, { agent, timeout: 8000 }, (res) => {
    let body = '';
    res.setEncoding('utf8').on('data', (d) => (body += d));
    res.on('end', () => { let pod; try { pod = JSON.parse(body).pod; } catch { pod = body.slice(0, 80); } done(res.statusCode, pod); });
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => done(0, e.code || e.message));
};
const finish = () => { console.log(JSON.stringify({ t0, records: out })); process.exit(0); };
const tick = setInterval(() => {
  const due = Math.min(total, Math.floor(((Date.now() - t0) / 1000) * Number(rate)));
  while (started < due) { started++; one(); }
  if (started >= total) clearInterval(tick);
}, 5);
`;

export type LoadRecord = [start: number, ms: number, status: number, pod: string];

export interface LoadRun {
  t0: number;
  records: LoadRecord[];
}

/** Failures, recovery and p99 around a fault at `faultAt` (ms from t0). */
export function summarize(
  run: LoadRun,
  faultAt: number,
  ok: (r: LoadRecord) => boolean = (r) => r[2] === 200,
): { failed: number; recoveryMs: number; p99Ms: number; p50Ms: number; requests: number; failures: Record<string, number> } {
  const rs = [...run.records].sort((a, b) => a[0] - b[0]);
  const failed = rs.filter((r) => !ok(r)).length;
  // Failed requests by status (0: no answer) and by when they started relative to the fault (500 ms bins).
  const failures: Record<string, number> = {};
  for (const r of rs.filter((x) => !ok(x))) {
    const k = `${r[2]} ${r[3].trim()}@${Math.floor((r[0] - faultAt) / 500) * 500}`;
    failures[k] = (failures[k] ?? 0) + 1;
  }
  // Recovery: from the fault to the end of the last request that failed or was slower than 1 s.
  const bad = rs.filter((r) => r[0] + r[1] >= faultAt && (!ok(r) || r[1] > 1000));
  const recoveryMs = bad.length ? Math.max(0, Math.max(...bad.map((r) => r[0] + r[1])) - faultAt) : 0;
  const window = rs.filter((r) => r[0] >= faultAt - 1000 && r[0] < faultAt + 5000).map((r) => r[1]);
  return { failed, recoveryMs, p99Ms: round(quantile(window, 0.99), 1), p50Ms: round(quantile(window, 0.5), 1), requests: rs.length, failures };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer().listen(0, '127.0.0.1', () => {
      const port = (srv.address() as AddressInfo).port;
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

interface Site {
  id: string;
  nodes: TopoNode[];
  compiler: PolicyCompiler;
  mc: MulticlusterController | undefined;
  dir: string;
  objects: unknown[];
  /** The cluster's mesh CA: an intermediate of the clusterset CA, name constrained to its trust domain. */
  meshCa: CaSigner | undefined;
  /** Its node proxies' identity files ("ns/sa" -> files), as an agent keeps them. */
  identities: Record<string, ProxyIdentityFiles>;
}

/** Identities every node of both sites holds (pods' and the clusterset gateway's). */
const IDENTITIES = [`${NS}/web`, `${NS}/client`, identityKey(GATEWAY_IDENTITY)];

export interface TwoSitesOptions {
  prefix: string;
  /** Lease of the clusterset members (default 24h). */
  leaseMs?: number;
  /**
   * How long a tunnel connection takes new tunnels (default 60 s): a policy
   * change reaches requests on an existing connection to a gateway only after
   * it (docs/security.md, policy staleness on long connections).
   */
  tunnelMaxAgeSeconds?: number;
}

export class TwoSites {
  readonly topo: Topology;
  readonly n1: TopoNode;
  readonly g1: TopoNode;
  readonly g2: TopoNode;
  readonly A: TopoPod;
  readonly L: TopoPod;
  readonly R1: TopoPod;
  readonly R2: TopoPod;
  readonly c1: Site;
  readonly c2: Site;
  readonly clustersetIp: () => string;
  private readonly servers = new Map<TopoPod, ChildProcess>();
  private readonly proxies = new Map<TopoNode, ProxySupervisor>();
  private readonly dps: IptablesDataplane[] = [];
  private cut = false;
  private tunnelMaxAgeSeconds: number | undefined;
  clustersetCa: { certPem: string; keyPem: string } | undefined;

  private constructor(topo: Topology, pods: TopoPod[], private readonly work: string) {
    this.topo = topo;
    [this.n1, this.g1, this.g2] = topo.nodes as [TopoNode, TopoNode, TopoNode];
    [this.A, this.L, this.R1, this.R2] = pods as [TopoPod, TopoPod, TopoPod, TopoPod];
    const site = (id: string, nodes: TopoNode[]): Site => ({ id, nodes, compiler: new PolicyCompiler(), mc: undefined, dir: join(work, id), objects: [], meshCa: undefined, identities: {} });
    this.c1 = site('c1', [this.g1, this.g2]);
    this.c2 = site('c2', [this.n1]);
    this.clustersetIp = () => this.c2.compiler.get(this.n1.name)?.policy.multicluster?.imports.find((i) => i.name === 'web')?.ips[0] ?? '';
  }

  static async create(o: TwoSitesOptions): Promise<TwoSites> {
    const work = mkdtempSync(join(tmpdir(), `${o.prefix}-mc-`));
    const topo = await Topology.create({ prefix: o.prefix, nodes: 3, podsPerNode: 0 });
    let sites: TwoSites | undefined;
    try {
      const [n1, g1, g2] = topo.nodes as [TopoNode, TopoNode, TopoNode];
      const pods = [await topo.addPod(n1, 'a'), await topo.addPod(n1, 'l'), await topo.addPod(g1, 'r1'), await topo.addPod(g2, 'r2')];
      sites = new TwoSites(topo, pods, work);
      sites.tunnelMaxAgeSeconds = o.tunnelMaxAgeSeconds;
      await sites.setup(o);
      return sites;
    } catch (err) {
      if (sites) await sites.destroy();
      else {
        await topo.destroy();
        rmSync(work, { recursive: true, force: true });
      }
      throw err;
    }
  }

  private podObj(p: TopoPod, sa: string) {
    return {
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name: p.name, namespace: NS, uid: `uid-${p.name}`, labels: { app: sa }, annotations: { 'lab.fsm-node.io/cgroup': p.cgroupPath } },
      spec: { nodeName: p.node.name, serviceAccountName: sa, containers: [{ ports: [{ name: 'http', containerPort: PORT }] }] },
      status: { phase: 'Running', podIP: p.ip, qosClass: 'BestEffort', conditions: [{ type: 'Ready', status: 'True' }] },
    };
  }

  private baseObjects(site: Site, clusterIp: string, pods: [TopoPod, string][]): unknown[] {
    return [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels: { 'flomesh.io/monitored-by': 'fsm' } } },
      this.meshConfig(site, 'permissive'),
      ...site.nodes.map((n) => ({
        apiVersion: 'v1',
        kind: 'Node',
        metadata: { name: n.name, labels: { 'multicluster.fsm-node.io/gateway': 'true' } },
        status: { addresses: [{ type: 'InternalIP', address: n.underlayIp }] },
      })),
      ...pods.map(([p, sa]) => this.podObj(p, sa)),
      { apiVersion: 'v1', kind: 'Service', metadata: { name: 'web', namespace: NS }, spec: { clusterIP: clusterIp, selector: { app: 'web' }, ports: [{ name: 'http', port: PORT, targetPort: 'http' }] } },
    ];
  }

  private async setup(o: TwoSitesOptions): Promise<void> {
    this.c1.objects = this.baseObjects(this.c1, '10.96.1.10', [[this.R1, 'web'], [this.R2, 'web']]);
    this.c2.objects = this.baseObjects(this.c2, '10.96.2.10', [[this.A, 'client'], [this.L, 'web']]);
    for (const p of [this.L, this.R1, this.R2]) await this.startServer(p);

    const ca = await createClustersetCa();
    this.clustersetCa = ca;
    // Free ports, so two TwoSites (two test files run by parallel jest workers) never collide.
    const ports = { c1: await freePort(), c2: await freePort() };
    // Mutual TLS everywhere, as agents would run it: each site's mesh CA is
    // an intermediate of the clusterset CA, every node proxy holds its pods'
    // identities and the gateway identity, and trusts the clusterset CA.
    for (const site of [this.c1, this.c2]) {
      const meshCa = await issueMeshCa(ca, site.id);
      site.meshCa = await loadSigner(meshCa.certPem, meshCa.keyPem, [ca.certPem]);
      for (const id of IDENTITIES) site.identities[id] = await this.writeIdentity(site, join(site.dir, 'identities'), id, clusterTrustDomain(site.id));
    }
    for (const site of [this.c1, this.c2]) {
      for (const obj of site.objects) site.compiler.upsert((obj as { kind: Kind }).kind, obj);
      site.compiler.compile();
    }
    for (const site of [this.c1, this.c2]) {
      const other = site === this.c1 ? this.c2 : this.c1;
      const id = await issueClusterIdentity(ca, site.id);
      mkdirSync(site.dir, { recursive: true });
      writeFileSync(join(site.dir, 'exports.yaml'), `apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: ${NS}, creationTimestamp: "2026-01-01T00:00:0${site.id === 'c1' ? 0 : 1}Z"}\n`);
      const config = {
        clusterId: site.id,
        listen: `127.0.0.1:${ports[site.id as 'c1' | 'c2']}`,
        peers: [{ clusterId: other.id, url: `https://127.0.0.1:${ports[other.id as 'c1' | 'c2']}` }],
        caFile: '-',
        certFile: '-',
        keyFile: '-',
        clustersetCidr: '241.0.0.0/16',
        lease: '24h',
        leaseMs: o.leaseMs ?? 24 * 3600_000,
        gatewayPort: GW,
      };
      site.mc = await MulticlusterController.start(
        { config, compiler: site.compiler, stateDir: join(site.dir, 'state'), objectsDir: site.dir, tls: { ca: ca.certPem, cert: id.certPem, key: id.keyPem }, pollMs: 100, peerWaitMs: 5000 },
        () => this.recompile(site),
      );
    }
    for (const site of [this.c1, this.c2]) this.recompile(site);
    await this.until('c2 to import web from c1', () => this.importTiers().flat().includes('c1'));
    await this.until('c1 to import web from c2', () => (this.c1.compiler.get(this.g1.name)?.policy.multicluster?.imports[0]?.tiers.flat().length ?? 0) === 2);

    for (const site of [this.c1, this.c2]) {
      for (const node of site.nodes) {
        const policy = this.policyOf(site, node);
        const sup = nodeProxy(node, policy, join(this.work, `proxy-${node.name}`), this.facts(site));
        await sup.start();
        await sup.waitReady();
        this.proxies.set(node, sup);
        const dp = new IptablesDataplane({ netns: node.netns });
        this.dps.push(dp);
        await dp.apply({
          proxy: { address: node.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: node.proxyCgroup },
          nodeAddresses: [node.gateway, node.underlayIp],
          proxySources: this.topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
          mesh: noExclusions(),
          pods: node.pods.map((p) => ({ uid: `uid-${p.name}`, namespace: NS, name: p.name, ip: p.ip, cgroupPath: p.cgroupPath, inbound: 'permissive' as const, exclusions: noExclusions() })),
        });
      }
    }
  }

  /** What agents would do: compile, take the clusterset's imports in, deliver each node's config. */
  private recompile(site: Site): void {
    site.compiler.compile();
    if (site.mc?.refresh()) site.compiler.compile();
    void this.pushConfigs(site);
  }

  private pushing = Promise.resolve();
  /** Deliver every node's current config of `site` (in order; resolves when the proxies took them). */
  pushConfigs(site: Site): Promise<void> {
    const run = this.pushing.then(async () => {
      for (const node of site.nodes) {
        const sup = this.proxies.get(node);
        if (!sup) continue;
        const r = await sup.deliver(renderProxyConfig(this.policyOf(site, node), this.facts(site)));
        if (r.changed && !r.applied) throw new Error(`the proxy of ${node.name} did not take its new config`);
      }
    });
    this.pushing = run.catch(() => undefined);
    return run;
  }

  /**
   * A config hand-over on every node of `site` at once, as a policy change
   * does (`k` makes the version new; nothing else changes): new instances,
   * the old ones drained (proxy/drain.js).
   */
  async handOver(site: Site, k: number): Promise<void> {
    await Promise.all(site.nodes.map(async (node) => {
      const config = renderProxyConfig(this.policyOf(site, node), this.facts(site));
      const r = await this.proxies.get(node)!.deliver({ ...config, version: `${config.version}-h${k}` });
      if (!r.applied) throw new Error(`the proxy of ${node.name} did not take its new config`);
    }));
  }

  /** How the drains of `node`'s retired proxy instances ended (bench/util.ts drainEnds). */
  drainEnds(node: TopoNode): Record<string, number> {
    return drainEnds(join(this.work, `proxy-${node.name}`));
  }

  /** Until no old proxy instance of `site` drains any more. */
  async drained(site: Site, ms = 15_000): Promise<void> {
    await this.until(`${site.id}'s old proxy instances to end their drain`, () => site.nodes.every((n) => this.proxies.get(n)!.status().draining === 0), ms);
  }

  /** What an agent of `site` renders its proxy's config with: mutual TLS under the clusterset CA. */
  facts(site: Site): ProxyNodeFacts {
    return { outboundPort: OUT, inboundPort: IN, trust: { trustDomain: clusterTrustDomain(site.id), bundle: [this.clustersetCa!.certPem] }, identities: site.identities, tunnelMaxAgeSeconds: this.tunnelMaxAgeSeconds };
  }

  /** The site's mesh config: its own trust domain ("<id>.cluster.local"), and the traffic policy. */
  meshConfig(site: Site, trafficPolicy: 'permissive' | 'smi'): unknown {
    return { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'fsm-mesh-config', namespace: 'fsm-system' }, data: { trustDomain: clusterTrustDomain(site.id), trafficPolicy } };
  }

  /**
   * A certificate and key for `id` ("ns/sa") in `trustDomain`, signed by
   * `signer` (default: the site's mesh CA), written as an agent keeps them
   * under `dir`. Tests sign with the wrong CA or trust domain to attack.
   */
  async writeIdentity(site: Site, dir: string, id: string, trustDomain: string, signer: CaSigner = site.meshCa!): Promise<ProxyIdentityFiles> {
    const [namespace, serviceAccount] = id.split('/') as [string, string];
    const keys = await generateKeyPair();
    const csr = await createCsr(keys, trustDomain, { namespace, serviceAccount });
    const leaf = await signLeaf(csr, signer, { trustDomain, identity: { namespace, serviceAccount }, lifetimeMs: 24 * 3600_000 });
    const d = join(dir, id);
    mkdirSync(d, { recursive: true, mode: 0o700 });
    writeFileSync(join(d, 'key.pem'), await privateKeyToPem(keys.privateKey), { mode: 0o600 });
    writeFileSync(join(d, 'cert.pem'), leaf.chainPem.join(''));
    return { certPath: join(d, 'cert.pem'), keyPath: join(d, 'key.pem'), notAfter: leaf.notAfter, state: 'valid' };
  }

  /** Replace or add objects of a site (mesh config, TrafficTargets) and deliver its nodes' new configs. */
  async applyObjects(site: Site, objects: unknown[]): Promise<void> {
    for (const obj of objects) site.compiler.upsert((obj as { kind: Kind }).kind, obj);
    this.recompile(site);
    await this.pushConfigs(site);
  }

  policyOf(site: Site, node: TopoNode): NodePolicy {
    const c = site.compiler.get(node.name);
    if (!c) throw new Error(`no policy for ${node.name}`);
    return c.policy;
  }

  /** The tiers of web at c2, as cluster ids. */
  importTiers(): string[][] {
    return (this.c2.compiler.get(this.n1.name)?.policy.multicluster?.imports.find((i) => i.name === 'web')?.tiers ?? []).map((t) => t.map((m) => m.cluster));
  }

  async until(what: string, fn: () => boolean, ms = 15_000): Promise<void> {
    const end = Date.now() + ms;
    while (!fn()) {
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** c2's GlobalTrafficPolicy for web (undefined: none), applied and delivered to n1's proxy. */
  async setPolicy(spec: { mode: string; weights?: Record<string, number>; failOver?: string[] } | undefined): Promise<void> {
    const file = join(this.c2.dir, 'policy.yaml');
    writeFileSync(file, spec ? `apiVersion: multicluster.fsm-node.io/v1alpha1\nkind: GlobalTrafficPolicy\nmetadata: {name: web, namespace: ${NS}}\nspec: ${JSON.stringify(spec)}\n` : '');
    const want = JSON.stringify(spec ?? null);
    await this.until(`policy ${want}`, () => this.c2PolicyMatches(spec));
    await this.pushConfigs(this.c2);
  }

  private c2PolicyMatches(spec: { mode: string; weights?: Record<string, number> } | undefined): boolean {
    const tiers = this.c2.compiler.get(this.n1.name)?.policy.multicluster?.imports.find((i) => i.name === 'web')?.tiers;
    if (!tiers) return false;
    if (!spec) return tiers.length === 1 && tiers[0]!.length === 2 && tiers[0]!.every((m) => m.weight === 1);
    if (spec.mode === 'Locality') return tiers.length === 1 && tiers[0]!.length === 1;
    if (spec.mode === 'FailOver') return tiers.length === 2;
    return tiers.length === 1 && tiers[0]!.every((m) => m.weight === (spec.weights?.[m.cluster] ?? 1));
  }

  /** c2's local web pod in (true) or out of (false) the Service: a pod deleted or not ready. */
  async setLocalEndpoints(present: boolean): Promise<void> {
    if (present) this.c2.compiler.upsert('Pod', this.podObj(this.L, 'web'));
    else this.c2.compiler.remove({ kind: 'Pod', namespace: NS, name: this.L.name });
    this.recompile(this.c2);
    await this.pushConfigs(this.c2);
  }

  async startServer(p: TopoPod): Promise<void> {
    const s = p.exec(process.execPath, ['-e', HTTP_SERVER, p.name], { stdio: ['ignore', 'pipe', 'pipe'] });
    await new Promise<void>((resolve, reject) => {
      let out = '';
      s.stdout?.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        if (out.includes('listening')) resolve();
      });
      s.once('exit', (code) => reject(new Error(`server in ${p.name} exited ${code}`)));
    });
    this.servers.set(p, s);
  }

  /** The server of `p` dies (the endpoint stays in the policy: a fault, not a deletion). */
  async killServer(p: TopoPod): Promise<void> {
    const s = this.servers.get(p);
    if (!s || s.exitCode !== null) return;
    const gone = once(s, 'exit');
    s.kill('SIGKILL');
    await gone;
    this.servers.delete(p);
  }

  /** Drop every packet on c1's gateways' uplinks (both ways), or stop dropping. */
  async cutC1(cut: boolean): Promise<void> {
    if (cut === this.cut) return;
    for (const n of this.c1.nodes) {
      for (const [chain, dir] of [['INPUT', '-i'], ['OUTPUT', '-o']] as const) {
        const r = await n.run('iptables', ['-w', cut ? '-I' : '-D', chain, dir, 'ul0', '-j', 'DROP']);
        if (r.code !== 0) throw new Error(`iptables in ${n.name}: ${r.stderr}`);
      }
    }
    this.cut = cut;
  }

  /** The lines of a node proxy's metrics that mention `grep`. */
  async proxyMetrics(node: TopoNode, grep: string): Promise<string> {
    const m = (await this.proxies.get(node)?.metrics()) ?? '';
    return m.split('\n').filter((l) => l.includes(grep) && !l.startsWith('#')).join('\n');
  }

  async stopC1Controller(): Promise<void> {
    await this.c1.mc?.stop();
    this.c1.mc = undefined;
  }

  /**
   * GETs from A to the clusterset IP at `rate`/s for `seconds`; `during` runs
   * alongside. Records are in ms from the run's t0 (the load generator's
   * clock, the same machine's): a fault at Date.now() d is at d - t0.
   */
  async load(rate: number, seconds: number, during?: () => Promise<void>): Promise<LoadRun> {
    const child = this.A.exec(process.execPath, ['-e', RATE_LOAD, `http://${this.clustersetIp()}:${PORT}/`, String(rate), String(seconds)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (out += d));
    const exited = once(child, 'exit');
    if (during) await during();
    await exited;
    const line = out.trim().split('\n').pop() ?? '';
    try {
      return JSON.parse(line) as LoadRun;
    } catch {
      throw new Error(`load generator printed no result: ${out.slice(0, 500)}`);
    }
  }

  async destroy(): Promise<void> {
    await this.cutC1(false).catch(() => undefined);
    for (const s of [this.c1, this.c2]) await s.mc?.stop().catch(() => undefined);
    for (const dp of this.dps) await dp.cleanup().catch(() => undefined);
    for (const p of this.proxies.values()) await p.stop().catch(() => undefined);
    for (const s of this.servers.values()) s.kill('SIGKILL');
    await this.topo.destroy();
    rmSync(this.work, { recursive: true, force: true });
  }
}

/** Requests by the pod that answered. */
export function byPod(run: LoadRun): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of run.records) if (r[2] === 200) out[r[3]] = (out[r[3]] ?? 0) + 1;
  return out;
}

/** npm run bench -- failover [--rate 100] [--seconds 10] */
export async function* run(flags: Record<string, string | boolean>): AsyncIterable<object> {
  const { intFlag } = await import('./util.js');
  const { loadavg } = await import('node:os');
  const rate = intFlag(flags, 'rate', 100);
  const seconds = intFlag(flags, 'seconds', 10);
  const s = await TwoSites.create({ prefix: `fsmb${process.pid}` });
  const row = (kase: string, run: LoadRun, at: number) => ({ bench: 'failover', case: kase, rate, ...summarize(run, at - run.t0), pods: byPod(run), loadavg: loadavg().map((x) => round(x, 2)) });
  try {
    // 1. FailOver, c2's local endpoints fail (server killed, still listed), then are removed.
    await s.setPolicy({ mode: 'FailOver', failOver: ['c1'] });
    let at = 0;
    let run = await s.load(rate, seconds, async () => {
      await new Promise((r) => setTimeout(r, 2000));
      at = Date.now();
      await s.killServer(s.L);
      await new Promise((r) => setTimeout(r, 2000));
      await s.setLocalEndpoints(false);
    });
    yield row('local-gone', run, at);
    await s.startServer(s.L);
    await s.setLocalEndpoints(true);
    // 2. ActiveActive over both; c1's controller is stopped (the data path must not notice).
    await s.setPolicy({ mode: 'ActiveActive' });
    run = await s.load(rate, seconds, async () => {
      await new Promise((r) => setTimeout(r, 2000));
      at = Date.now();
      await s.stopC1Controller();
    });
    yield row('controller-killed', run, at);
    // 3. Still ActiveActive; c1's uplink is cut.
    run = await s.load(rate, seconds, async () => {
      await new Promise((r) => setTimeout(r, 2000));
      at = Date.now();
      await s.cutC1(true);
    });
    yield row('link-cut', run, at);
    // 4. The link comes back: how long until c1 serves again (its gateways are probed every 3 s while marked dead).
    const back = Date.now();
    await s.cutC1(false);
    let backMs = -1;
    while (Date.now() - back < 90_000) {
      const probe = await s.load(20, 1);
      const pods = byPod(probe);
      if ((pods[s.R1.name] ?? 0) + (pods[s.R2.name] ?? 0) > 0) {
        backMs = Date.now() - back;
        break;
      }
    }
    yield { bench: 'failover', case: 'link-restored', c1ServingAgainMs: backMs, loadavg: loadavg().map((x) => round(x, 2)) };
  } finally {
    await s.destroy();
  }
}
