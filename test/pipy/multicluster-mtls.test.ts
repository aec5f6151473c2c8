import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TwoSites } from '../../bench/failover.js';
import { identityDnsName } from '../../src/identity/spiffe.js';
import { createRoot, loadSigner } from '../../src/identity/x509.js';
import type { TopoNode } from '../../src/lab/topology.js';
import { uniqueTestPrefix } from '../support/names.js';
import { pipySkipReason } from '../support/pipy.js';

/**
 * Mutual TLS across clusters (docs/multicluster.md, docs/security.md
 * "Across clusters"), on two real sites (bench/failover.ts TwoSites): each
 * cluster's mesh CA is a name-constrained intermediate of the clusterset CA;
 * c2's pods reach c1's gateways with their own certificates, and c1's access
 * control names c2's workloads by SPIFFE ID. The attacks run a real TLS
 * client (node:tls) from node n1 (c2) against c1's gateway port and c2's own
 * tunnel port.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'shop';
const PORT = 8080;
const GW = 15005;
const IN = 15003;

// A TLS client: prints {"status":N} for GET path, or {"error":"..."} when the connection fails.
const CLIENT = `
const tls = require('node:tls'); const fs = require('node:fs');
const [host, port, sni, ca, cert, key, plain, path] = process.argv.slice(1);
const done = (o) => { console.log(JSON.stringify(o)); process.exit(0); };
setTimeout(() => done({ error: 'timeout' }), 5000);
const req = 'GET ' + path + ' HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n';
const onData = (s) => { let b = ''; s.on('data', (d) => { b += d; const m = /^HTTP\\/1\\.1 (\\d+)/.exec(b); if (m) done({ status: +m[1] }); }); s.on('error', (e) => done({ error: e.code || e.message })); s.on('close', () => done({ error: 'closed' })); };
if (plain === 'plain') { const s = require('node:net').connect(+port, host, () => s.write(req)); onData(s); }
else {
  const o = { host, port: +port, servername: sni, ca: fs.readFileSync(ca), minVersion: 'TLSv1.3', rejectUnauthorized: false };
  if (cert !== '-') { o.cert = fs.readFileSync(cert); o.key = fs.readFileSync(key); }
  const s = tls.connect(o, () => s.write(req)); onData(s);
}
`;

// A tunnel by hand: TLS to a node proxy's :15003, CONNECT with a source header, then one GET inside.
// Prints {"connect":N,"get":N} (get absent when the CONNECT was refused), or {"error":"..."}.
const TUNNEL = `
const tls = require('node:tls'); const fs = require('node:fs');
const [host, port, sni, ca, cert, key, target, source] = process.argv.slice(1);
const done = (o) => { console.log(JSON.stringify(o)); process.exit(0); };
setTimeout(() => done({ error: 'timeout' }), 5000);
const s = tls.connect({ host, port: +port, servername: sni, ca: fs.readFileSync(ca), cert: fs.readFileSync(cert), key: fs.readFileSync(key), minVersion: 'TLSv1.3', rejectUnauthorized: false }, () => {
  s.write('CONNECT ' + target + ' HTTP/1.1\\r\\nhost: ' + target + '\\r\\nfsmn-source-identity: ' + source + '\\r\\n\\r\\n');
});
let b = ''; let connect = 0;
s.on('data', (d) => {
  b += d;
  if (!connect) {
    const m = /^HTTP\\/1\\.1 (\\d+)[^]*?\\r\\n\\r\\n/.exec(b);
    if (!m) return;
    connect = +m[1]; b = '';
    if (connect !== 200) return done({ connect });
    s.write('GET / HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n');
    return;
  }
  const g = /^HTTP\\/1\\.1 (\\d+)/.exec(b);
  if (g) done({ connect, get: +g[1] });
});
s.on('error', (e) => done({ error: e.code || e.message })); s.on('close', () => done({ error: 'closed', connect }));
`;

maybe('mutual TLS between clusters (two sites, Pipy)', () => {
  let s: TwoSites;
  let dir: string;

  beforeAll(async () => {
    // Connections to a gateway take new requests for 2 s: a TrafficTarget change reaches them within that.
    s = await TwoSites.create({ prefix: uniqueTestPrefix(), tunnelMaxAgeSeconds: 2 });
    dir = mkdtempSync(join(tmpdir(), 'fsmn-mc-mtls-'));
    writeFileSync(join(dir, 'ca.pem'), s.clustersetCa!.certPem);
  }, 120_000);

  afterAll(async () => {
    await s?.destroy();
    if (dir) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  /** One request with the TLS client from node n1 (c2's gateway node, not intercepted). */
  async function probe(host: string, port: number, sni: string, files: { certPath: string; keyPath: string } | null, opts: { plain?: boolean; path?: string } = {}): Promise<{ status?: number; error?: string }> {
    const r = await s.n1.run(process.execPath, ['-e', CLIENT, host, String(port), sni, join(dir, 'ca.pem'), files?.certPath ?? '-', files?.keyPath ?? '-', opts.plain ? 'plain' : 'tls', opts.path ?? '/healthz']);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { status?: number; error?: string };
  }

  async function failures(node: TopoNode, side: string): Promise<Record<string, number>> {
    const lines = await s.proxyMetrics(node, 'fsmn_proxy_tls_handshake_failures_total');
    const out: Record<string, number> = {};
    for (const l of lines.split('\n')) {
      const m = /side="([^"]+)",reason="([^"]+)"\} (\d+)/.exec(l);
      if (m && m[1] === side) out[m[2]!] = Number(m[3]);
    }
    return out;
  }

  async function getFrom(pod: 'A' | 'L'): Promise<number> {
    const p = pod === 'A' ? s.A : s.L;
    const r = await p.run(process.execPath, ['-e', `fetch(process.argv[1]).then((r) => console.log(r.status), (e) => console.log('error ' + e.message))`, `http://${s.clustersetIp()}:${PORT}/`]);
    return Number(r.stdout.trim());
  }

  /** After a policy change: GETs until `want` (at most 10 s: connections to a gateway renew every 2 s); the last status. */
  async function settlesTo(pod: 'A' | 'L', want: number): Promise<number> {
    const end = Date.now() + 10_000;
    for (;;) {
      const got = await getFrom(pod);
      if (got === want || Date.now() > end) return got;
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  const g1Gateway = () => `${s.g1.underlayIp}`;

  test('a c2 certificate is accepted at c1 gateway; plaintext, no certificate and a foreign CA are refused', async () => {
    const c2Client = s.c2.identities[`${NS}/client`]!;
    // The positive control: the same client, with c2's real certificate, gets an answer.
    expect(await probe(g1Gateway(), GW, 'gateway.c1.cluster.local', c2Client)).toEqual({ status: 200 });

    const before = await failures(s.g1, 'gateway-server');
    expect((await probe(g1Gateway(), GW, 'gateway.c1.cluster.local', null, { plain: true })).status).toBeUndefined();
    expect((await probe(g1Gateway(), GW, 'gateway.c1.cluster.local', null)).status).toBeUndefined();
    // A CA outside the clusterset signs a c2 identity.
    const foreign = await createRoot({ commonName: 'not the clusterset', lifetimeMs: 24 * 3600_000 });
    const forged = await s.writeIdentity(s.c2, join(dir, 'foreign'), `${NS}/client`, 'c2.cluster.local', await loadSigner(foreign.certPem, foreign.keyPem));
    expect((await probe(g1Gateway(), GW, 'gateway.c1.cluster.local', forged)).status).toBeUndefined();
    const after = await failures(s.g1, 'gateway-server');
    expect((after.plaintext ?? 0) - (before.plaintext ?? 0)).toBe(1);
    expect((after['no-client-certificate'] ?? 0) - (before['no-client-certificate'] ?? 0)).toBe(1);
    expect((after.untrusted ?? 0) - (before.untrusted ?? 0)).toBe(1);
  }, 60_000);

  test('c2 cannot mint c1 identities: refused by c1 gateway and by c2 own node proxies', async () => {
    // c2's mesh CA signs a certificate naming a c1 workload (its name constraint forbids it).
    const minted = await s.writeIdentity(s.c2, join(dir, 'minted'), `${NS}/web`, 'c1.cluster.local');
    const gwBefore = await failures(s.g1, 'gateway-server');
    expect((await probe(g1Gateway(), GW, 'gateway.c1.cluster.local', minted)).status).toBeUndefined();
    const gwAfter = await failures(s.g1, 'gateway-server');
    expect((gwAfter.untrusted ?? 0) - (gwBefore.untrusted ?? 0)).toBe(1);

    // c2's own tunnel port, asked for c2's web identity (SNI as proxy/tls.js names it).
    const name = identityDnsName('c2.cluster.local', { namespace: NS, serviceAccount: 'web' });
    const sni = `id-${createHash('sha256').update(name).digest('hex').slice(0, 32)}.c2.cluster.local`;
    const inBefore = await failures(s.n1, 'server');
    // Positive control: c2's real client certificate gets through the handshake to an HTTP answer.
    expect((await probe(s.n1.underlayIp, IN, sni, s.c2.identities[`${NS}/client`]!)).status).toBeDefined();
    expect((await probe(s.n1.underlayIp, IN, sni, minted)).status).toBeUndefined();
    const inAfter = await failures(s.n1, 'server');
    // Refused in the handshake: c2's proxy checks the leaf's trust domain (its own only) before
    // OpenSSL gets to the name constraint, so the reason counted there is peer-identity-missing.
    const refused = (m: Record<string, number>) => (m.untrusted ?? 0) + (m['peer-identity-missing'] ?? 0);
    expect(refused(inAfter) - refused(inBefore)).toBe(1);
  }, 60_000);

  test('under smi, c1 admits the c2 workload its TrafficTarget names by SPIFFE ID (200) and no other c2 workload (403)', async () => {
    await s.setPolicy({ mode: 'ActiveActive', weights: { c1: 1, c2: 0 } });
    const target = (sources: unknown[]) => ({
      apiVersion: 'access.smi-spec.io/v1alpha3',
      kind: 'TrafficTarget',
      metadata: { name: 'from-c2', namespace: NS },
      spec: { destination: { kind: 'ServiceAccount', name: 'web', namespace: NS }, sources, rules: [{ kind: 'TCPRoute', name: 'web' }] },
    });
    await s.applyObjects(s.c1, [
      s.meshConfig(s.c1, 'smi'),
      { apiVersion: 'specs.smi-spec.io/v1alpha4', kind: 'TCPRoute', metadata: { name: 'web', namespace: NS }, spec: { matches: { ports: [PORT] } } },
      target([{ kind: 'SpiffeID', name: `spiffe://c2.cluster.local/ns/${NS}/sa/client` }]),
    ]);
    // Both c1 pods answer (R2 is behind g2: the gateway vouches for the c2 source inside c1).
    const statuses = [];
    for (let i = 0; i < 6; i++) statuses.push(await getFrom('A'));
    expect(statuses).toEqual([200, 200, 200, 200, 200, 200]);
    expect(await getFrom('L')).toBe(403);

    // Named the other way (ServiceAccount with its trustDomain), the same answer; a c1-local name admits nobody from c2.
    await s.applyObjects(s.c1, [target([{ kind: 'ServiceAccount', name: 'web', namespace: NS, trustDomain: 'c2.cluster.local' }])]);
    expect(await settlesTo('L', 200)).toBe(200);
    expect(await settlesTo('A', 403)).toBe(403);
    await s.applyObjects(s.c1, [target([{ kind: 'ServiceAccount', name: 'client', namespace: NS }])]);
    expect(await settlesTo('L', 403)).toBe(403);
    expect(await settlesTo('A', 403)).toBe(403);

    // Inside c1 only the gateway identity may name a source, and only one of another cluster.
    await s.applyObjects(s.c1, [target([{ kind: 'SpiffeID', name: `spiffe://c2.cluster.local/ns/${NS}/sa/client` }])]);
    const name = identityDnsName('c1.cluster.local', { namespace: NS, serviceAccount: 'web' });
    const sni = `id-${createHash('sha256').update(name).digest('hex').slice(0, 32)}.c1.cluster.local`;
    const tunnel = async (files: { certPath: string; keyPath: string }, source: string) => {
      const r = await s.g1.run(process.execPath, ['-e', TUNNEL, s.g2.underlayIp, String(IN), sni, join(dir, 'ca.pem'), files.certPath, files.keyPath, `${s.R2.ip}:${PORT}`, source]);
      return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { connect?: number; get?: number; error?: string };
    };
    const c2Client = `spiffe://c2.cluster.local/ns/${NS}/sa/client`;
    // Positive control: the gateway identity vouching for the named c2 source.
    expect(await tunnel(s.c1.identities['fsm-system/fsm-node-gateway']!, c2Client)).toEqual({ connect: 200, get: 200 });
    // A c1 workload's certificate claiming to speak for the c2 source: the header is ignored.
    expect(await tunnel(s.c1.identities[`${NS}/web`]!, c2Client)).toEqual({ connect: 200, get: 403 });
    // The gateway identity naming a source of its own trust domain: ignored too.
    expect(await tunnel(s.c1.identities['fsm-system/fsm-node-gateway']!, `spiffe://c1.cluster.local/ns/${NS}/sa/client`)).toEqual({ connect: 200, get: 403 });
  }, 120_000);
});
