import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CONTROLLER_NAME } from '../../src/gateway/objects.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { LABEL_MONITORED_BY } from '../../src/policy/fsm.js';
import type { Kind } from '../../src/policy/objects.js';
import { renderProxyConfig, type ProxyConfig } from '../../src/proxy/config.js';
import { eventually } from '../support/eventually.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, writeConfig, type NodeProxy } from '../support/pipy.js';
import { waitForOutput } from '../support/traffic.js';

/**
 * Gateway API ingress in the real Pipy program, from Kubernetes objects
 * through the real compiler and renderer. One node; two pods (v1, v2) answer
 * with their name, the path and the headers they got; the client is outside
 * the mesh: the underlay namespace, talking to the node's underlay address
 * as a device at an edge site would. Each case is one behaviour the upstream
 * conformance tests check (named in the test).
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const NS = 'mesh';
const EDGE = 'edge';
const G = 'gateway.networking.k8s.io/v1';
const HTTP_PORT = 18080;
const HTTPS_PORT = 18443;

// A pod's server: JSON {pod, method, path, headers}; each request also printed on stdout.
// A path with "/hang" is never answered; "/slow/MS" is answered after MS milliseconds;
// "/trickle/N/MS" sends its head at once, then N lines one every MS milliseconds, then
// ends (prints DONE path), or prints CUT path when its connection closes before that.
const ECHO = `
const http = require('node:http');
const [name, port] = process.argv.slice(1);
http.createServer((req, res) => {
  const body = JSON.stringify({ pod: name, method: req.method, path: req.url, headers: req.headers });
  process.stdout.write('REQ ' + req.url + '\\n');
  if (req.url.includes('/hang')) return void req.socket.on('close', () => process.stdout.write('GONE ' + req.url + '\\n'));
  const trickle = /\\/trickle\\/([0-9]+)\\/([0-9]+)/.exec(req.url);
  if (trickle) {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.flushHeaders();
    let left = Number(trickle[1]);
    const timer = setInterval(() => {
      res.write('line ' + left + '\\n');
      if (--left > 0) return;
      clearInterval(timer);
      res.end();
      process.stdout.write('DONE ' + req.url + '\\n');
    }, Number(trickle[2]));
    res.on('close', () => { if (left > 0) { clearInterval(timer); process.stdout.write('CUT ' + req.url + '\\n'); } });
    return;
  }
  const slow = /\\/slow\\/([0-9]+)/.exec(req.url);
  setTimeout(() => {
    res.writeHead(200, { 'content-type': 'application/json', 'x-from-backend': 'yes' });
    res.end(body + '\\n');
  }, slow ? Number(slow[1]) : 0);
}).listen(Number(port), '0.0.0.0', () => process.stdout.write('listening\\n'));
`;

// N requests (JSON list of {path, headers, method, host, https, servername}); prints one JSON line per request:
// {status, headers, body, error, cert, headMs, ms}. keepAlive: one agent for all.
const CLIENT = `
const http = require('node:http');
const https = require('node:https');
const [addr, reqsJson, ca, keepAlive] = process.argv.slice(1);
const reqs = JSON.parse(reqsJson);
const agents = { http: new http.Agent({ keepAlive: keepAlive === '1', maxSockets: 1 }), https: new https.Agent({ keepAlive: keepAlive === '1', maxSockets: 1 }) };
const one = (r) => new Promise((resolve) => {
  const t0 = Date.now();
  const mod = r.https ? https : http;
  const [host, port] = addr.split(',')[r.https ? 1 : 0].split(':');
  const opts = { host, port: Number(port), path: r.path, method: r.method || 'GET', headers: { host: r.host || 'example.com', ...(r.headers || {}) }, timeout: 5000, agent: agents[r.https ? 'https' : 'http'] };
  if (r.https) { opts.servername = r.servername; opts.ca = require('node:fs').readFileSync(ca); }
  const req = mod.request(opts, (res) => {
    const headMs = Date.now() - t0;
    let body = '';
    const cert = res.socket.getPeerCertificate ? (res.socket.getPeerCertificate().subject || {}).CN : undefined;
    res.setEncoding('utf8').on('data', (d) => (body += d));
    res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body, cert, headMs, ms: Date.now() - t0 }));
  });
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => resolve({ error: e.message }));
  req.end();
});
(async () => { for (const r of reqs) console.log(JSON.stringify(await one(r))); })();
`;

interface Answer {
  status?: number;
  headers?: Record<string, string>;
  body?: string;
  error?: string;
  cert?: string;
  /** From sending the request to the answer's head, and to its end. */
  headMs?: number;
  ms?: number;
}
interface Req {
  path: string;
  headers?: Record<string, string>;
  method?: string;
  host?: string;
  https?: boolean;
  servername?: string;
}
type Obj = { apiVersion: string; kind: string; metadata: Record<string, unknown>; [k: string]: unknown };

maybe('Gateway API ingress in the Pipy node proxy', () => {
  const pipy = findPipy() ?? '';
  let work = '';
  let topo: Topology;
  let node: TopoNode;
  let V1: TopoPod, V2: TopoPod;
  let proxy: NodeProxy;
  const servers: ChildProcess[] = [];
  const serverOut: Record<string, string> = {};
  let certs: Record<string, { certFile: string; keyFile: string; pem: { cert: string; key: string } }> = {};
  let caFile = '';

  function cert(name: string, cn: string): void {
    const dir = join(work, 'certs', name);
    mkdirSync(dir, { recursive: true });
    const key = join(dir, 'key.pem');
    const csr = join(dir, 'csr.pem');
    const crt = join(dir, 'cert.pem');
    execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-subj', `/CN=${cn}`, '-out', csr], { stdio: 'ignore' });
    writeFileSync(join(dir, 'ext'), `subjectAltName=DNS:${cn}\n`);
    execFileSync('openssl', ['x509', '-req', '-in', csr, '-CA', join(work, 'ca.pem'), '-CAkey', join(work, 'ca.key'), '-CAcreateserial', '-days', '2', '-extfile', join(dir, 'ext'), '-out', crt], { stdio: 'ignore' });
    certs[`${EDGE}/${name}`] = { certFile: crt, keyFile: key, pem: { cert: readFileSync(crt, 'utf8'), key: readFileSync(key, 'utf8') } };
  }

  const secret = (name: string): Obj => ({
    apiVersion: 'v1',
    kind: 'Secret',
    metadata: { name, namespace: EDGE },
    type: 'kubernetes.io/tls',
    data: { 'tls.crt': Buffer.from(certs[`${EDGE}/${name}`]!.pem.cert).toString('base64'), 'tls.key': Buffer.from(certs[`${EDGE}/${name}`]!.pem.key).toString('base64') },
  });

  function baseObjects(): Obj[] {
    const pod = (p: TopoPod): Obj => ({
      apiVersion: 'v1',
      kind: 'Pod',
      metadata: { name: p.name, namespace: NS, uid: `uid-${p.name}`, labels: { app: p.name } },
      spec: { nodeName: node.name, serviceAccountName: p.name, containers: [{ ports: [{ name: 'http', containerPort: 8080 }] }] },
      status: { phase: 'Running', podIP: p.ip },
    });
    const service = (p: TopoPod, ip: string): Obj => ({
      apiVersion: 'v1',
      kind: 'Service',
      metadata: { name: `echo-${p.name}`, namespace: NS },
      spec: { clusterIP: ip, selector: { app: p.name }, ports: [{ name: 'http', port: 80, targetPort: 'http' }] },
    });
    return [
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels: { [LABEL_MONITORED_BY]: 'fsm' } } },
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: EDGE } },
      { apiVersion: 'v1', kind: 'Node', metadata: { name: node.name }, status: { addresses: [{ type: 'InternalIP', address: node.underlayIp }] } },
      pod(V1),
      pod(V2),
      service(V1, '10.96.0.11'),
      service(V2, '10.96.0.12'),
      { apiVersion: G, kind: 'GatewayClass', metadata: { name: 'fsm' }, spec: { controllerName: CONTROLLER_NAME } },
      {
        apiVersion: G,
        kind: 'Gateway',
        metadata: { name: 'edge-gw', namespace: EDGE },
        spec: {
          gatewayClassName: 'fsm',
          listeners: [
            { name: 'http', port: HTTP_PORT, protocol: 'HTTP', allowedRoutes: { namespaces: { from: 'All' } } },
            { name: 'a', port: HTTPS_PORT, protocol: 'HTTPS', hostname: 'a.example.com', tls: { certificateRefs: [{ name: 'a-cert' }] }, allowedRoutes: { namespaces: { from: 'All' } } },
            { name: 'b', port: HTTPS_PORT, protocol: 'HTTPS', hostname: 'b.example.com', tls: { certificateRefs: [{ name: 'b-cert' }] }, allowedRoutes: { namespaces: { from: 'All' } } },
          ],
        },
      },
      secret('a-cert'),
      secret('b-cert'),
    ];
  }

  const to = (pod: TopoPod, weight?: number) => ({ name: `echo-${pod.name}`, port: 80, ...(weight === undefined ? {} : { weight }) });
  const parent = { parentRefs: [{ name: 'edge-gw', namespace: EDGE }] };

  /** The routes most cases use; `main` decides where "/" goes. */
  function routes(main: unknown[] = [to(V1)]): Obj[] {
    const route = (name: string, spec: Record<string, unknown>, created = '2024-01-01T00:00:00Z'): Obj => ({ apiVersion: G, kind: 'HTTPRoute', metadata: { name, namespace: NS, creationTimestamp: created }, spec: { ...parent, ...spec } });
    return [
      route('main', {
        hostnames: ['example.com', 'a.example.com', 'b.example.com'],
        rules: [
          { backendRefs: main },
          { matches: [{ path: { type: 'Exact', value: '/exact' } }], backendRefs: [to(V2)] },
          { matches: [{ path: { type: 'PathPrefix', value: '/v2' } }], backendRefs: [to(V2)] },
          { matches: [{ headers: [{ name: 'X-Version', value: 'two' }] }], backendRefs: [to(V2)] },
          { matches: [{ queryParams: [{ name: 'animal', value: 'whale' }] }], backendRefs: [to(V2)] },
          { matches: [{ method: 'DELETE' }], backendRefs: [to(V2)] },
          { matches: [{ path: { type: 'RegularExpression', value: '/re/[0-9]+' } }], backendRefs: [to(V2)] },
          { matches: [{ path: { type: 'PathPrefix', value: '/weighted' } }], backendRefs: [to(V1, 3), to(V2, 1)] },
          {
            matches: [{ path: { type: 'PathPrefix', value: '/prefix/one' } }],
            filters: [
              { type: 'URLRewrite', urlRewrite: { hostname: 'rewritten.example', path: { type: 'ReplacePrefixMatch', replacePrefixMatch: '/one' } } },
              { type: 'RequestHeaderModifier', requestHeaderModifier: { set: [{ name: 'X-Header-Set', value: 'set-overwrites-values' }], add: [{ name: 'X-Header-Add-Append', value: 'header-val-2' }], remove: ['X-Header-Remove'] } },
              { type: 'ResponseHeaderModifier', responseHeaderModifier: { add: [{ name: 'X-Resp', value: 'added' }], remove: ['X-From-Backend'] } },
            ],
            backendRefs: [to(V1)],
          },
          { matches: [{ path: { type: 'PathPrefix', value: '/redirect' } }], filters: [{ type: 'RequestRedirect', requestRedirect: { scheme: 'https', hostname: 'a.example.com', path: { type: 'ReplacePrefixMatch', replacePrefixMatch: '/moved' }, statusCode: 301 } }] },
          { matches: [{ path: { type: 'PathPrefix', value: '/mirror' } }], filters: [{ type: 'RequestMirror', requestMirror: { backendRef: to(V2) } }], backendRefs: [to(V1)] },
          { matches: [{ path: { type: 'PathPrefix', value: '/broken' } }], backendRefs: [{ name: 'no-such-service', port: 80 }] },
          { matches: [{ path: { type: 'PathPrefix', value: '/t-request' } }], timeouts: { request: '1s' }, backendRefs: [to(V1)] },
          { matches: [{ path: { type: 'PathPrefix', value: '/t-backend' } }], timeouts: { request: '4s', backendRequest: '500ms' }, backendRefs: [to(V1)] },
        ],
      }),
      // Same path on a more specific hostname: that route wins for b.example.com only.
      route('b-only', { hostnames: ['b.example.com'], rules: [{ matches: [{ path: { type: 'PathPrefix', value: '/v2' } }], backendRefs: [to(V1)] }] }),
    ];
  }

  function configWith(objs: Obj[], mesh: Obj[] = []): ProxyConfig {
    const c = new PolicyCompiler();
    for (const o of [...baseObjects(), ...mesh, ...objs]) {
      if (!c.upsert(o.kind as Kind, o)) throw new Error(`${o.kind} ${String(o.metadata.name)} rejected: ${JSON.stringify(c.reporter.active())}`);
    }
    c.compile();
    const policy = c.get(node.name)!.policy;
    return renderProxyConfig(policy, { outboundPort: 15001, inboundPort: 15003, gatewayCertificates: Object.fromEntries(Object.entries(certs).map(([k, v]) => [k, { certFile: v.certFile, keyFile: v.keyFile }])) });
  }

  async function use(objs: Obj[], mesh: Obj[] = []): Promise<void> {
    const cfg = configWith(objs, mesh);
    writeConfig(work, cfg);
    proxy.reload();
    expect(await eventually(async () => metricValue(await proxy.metrics(), 'fsmn_proxy_config', { version: cfg.version }), (v) => v === 1, 10_000)).toBe(1);
  }

  async function send(reqs: Req[], keepAlive = false): Promise<Answer[]> {
    const r = await topo.underlay.run(process.execPath, ['-e', CLIENT, `${node.underlayIp}:${HTTP_PORT},${node.underlayIp}:${HTTPS_PORT}`, JSON.stringify(reqs), caFile, keepAlive ? '1' : '0']);
    return r.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Answer);
  }
  const podOf = (a: Answer): string => (a.status === 200 ? (JSON.parse(a.body!) as { pod: string }).pod : `HTTP ${a.status ?? a.error}`);
  const got = (a: Answer) => JSON.parse(a.body!) as { pod: string; path: string; headers: Record<string, string> };

  beforeAll(async () => {
    const prefix = uniqueTestPrefix();
    work = mkdtempSync(join(tmpdir(), `${prefix}-gateway-`));
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(work, 'ca.key'), '-out', join(work, 'ca.pem'), '-subj', '/CN=test edge CA', '-days', '2'], { stdio: 'ignore' });
    caFile = join(work, 'ca.pem');
    certs = {};
    cert('a-cert', 'a.example.com');
    cert('b-cert', 'b.example.com');
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 0 });
    [node] = topo.nodes as [TopoNode];
    V1 = await topo.addPod(node, 'v1');
    V2 = await topo.addPod(node, 'v2');
    for (const p of [V1, V2]) {
      const s = p.exec(process.execPath, ['-e', ECHO, p.name, '8080'], { stdio: ['ignore', 'pipe', 'pipe'] });
      serverOut[p.name] = '';
      s.stdout!.setEncoding('utf8').on('data', (d: string) => (serverOut[p.name] += d));
      servers.push(s);
      await waitForOutput(s, 'listening');
    }
    const cfg = configWith(routes());
    proxy = await startNodeProxy(node, pipy, writeCodebase(work, cfg), cfg);
  }, 120_000);

  afterAll(async () => {
    await proxy?.stop().catch(() => undefined);
    for (const s of servers) s.kill('SIGTERM');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  test('path Exact and PathPrefix, headers, query parameters, method and regular expressions pick the rule (HTTPRouteMatching, HTTPRouteExactPathMatching, HTTPRouteQueryParamMatching, HTTPRouteMethodMatching)', async () => {
    await use(routes());
    const answers = await send([
      { path: '/' },
      { path: '/exact' },
      { path: '/exact/' },
      { path: '/v2' },
      { path: '/v2/x?y=1' },
      { path: '/v2x' },
      { path: '/', headers: { 'x-version': 'two' } },
      { path: '/', headers: { 'x-version': 'Two' } },
      { path: '/?animal=whale' },
      { path: '/?animal=dolphin&animal=whale' },
      { path: '/', method: 'DELETE' },
      { path: '/re/123' },
      { path: '/re/12a' },
    ]);
    expect(answers.map(podOf)).toEqual(['v1', 'v2', 'v1', 'v2', 'v2', 'v1', 'v2', 'v1', 'v2', 'v1', 'v2', 'v2', 'v1']);
  }, 60_000);

  test('hostnames: the more specific route wins for its host only; an unknown host gets 404 (HTTPRouteHostnameIntersection, HTTPRouteMatchingAcrossRoutes)', async () => {
    const answers = await send([
      { path: '/v2', host: 'b.example.com' },
      { path: '/v2', host: 'a.example.com' },
      { path: '/', host: 'unknown.example.org' },
    ]);
    expect(answers.map(podOf)).toEqual(['v1', 'v2', 'HTTP 404']);
  }, 60_000);

  test('weights 3:1 over 200 requests within 5 points; a backend that does not resolve gets 500 (HTTPRouteWeight, HTTPRouteInvalidNonExistentBackendRef)', async () => {
    const answers = await send(Array.from({ length: 200 }, () => ({ path: '/weighted' })), true);
    const v1 = answers.filter((a) => podOf(a) === 'v1').length;
    expect(answers.filter((a) => a.status !== 200)).toEqual([]);
    expect(Math.abs(v1 / 200 - 0.75)).toBeLessThanOrEqual(0.05);
    expect((await send([{ path: '/broken' }])).map((a) => a.status)).toEqual([500]);
  }, 60_000);

  test('URLRewrite, RequestHeaderModifier and ResponseHeaderModifier (HTTPRouteRewritePath, HTTPRouteRewriteHost, HTTPRouteRequestHeaderModifier, HTTPRouteResponseHeaderModifier)', async () => {
    const [a] = await send([{ path: '/prefix/one/two?q=1', headers: { 'x-header-remove': 'remove-val', 'x-header-add-append': 'append-val-1', 'x-header-set': 'set-val' } }]);
    const seen = got(a!);
    expect(seen.pod).toBe('v1');
    expect(seen.path).toBe('/one/two?q=1');
    expect(seen.headers.host).toBe('rewritten.example');
    expect(seen.headers['x-header-set']).toBe('set-overwrites-values');
    expect(seen.headers['x-header-add-append']).toBe('append-val-1,header-val-2');
    expect(seen.headers['x-header-remove']).toBeUndefined();
    expect(seen.headers['x-forwarded-proto']).toBe('http');
    expect(a!.headers!['x-resp']).toBe('added');
    expect(a!.headers!['x-from-backend']).toBeUndefined();
  }, 60_000);

  test('RequestRedirect answers itself with the status and Location (HTTPRouteRedirectScheme, HTTPRouteRedirectHostAndStatus, HTTPRouteRedirectPath)', async () => {
    const [a] = await send([{ path: '/redirect/x?y=2' }]);
    expect(a!.status).toBe(301);
    expect(a!.headers!.location).toBe('https://a.example.com/moved/x?y=2');
  }, 60_000);

  test('RequestMirror sends a copy to the mirror backend; the client gets the primary\'s answer (HTTPRouteRequestMirror)', async () => {
    const [a] = await send([{ path: '/mirror/copy-1' }]);
    expect(podOf(a!)).toBe('v1');
    expect(await eventually(async () => serverOut.v2!.includes('REQ /mirror/copy-1'), (x) => x, 5000)).toBe(true);
  }, 60_000);

  test('timeouts: request and backendRequest answer 504 when the backend hangs, answers inside the bound pass, a rule without timeouts waits (HTTPRouteTimeoutRequest, HTTPRouteTimeoutBackendRequest)', async () => {
    const count = async (kind: string) => metricValue(await proxy.metrics(), 'fsmn_proxy_gateway_timeouts_total', { route: `${NS}/main`, timeout: kind });
    const before = { request: await count('request'), backendRequest: await count('backendRequest') };
    // One keep-alive connection: a 504 leaves it usable for the next request.
    const answers = await send(
      [{ path: '/t-request/hang' }, { path: '/t-request/slow/200' }, { path: '/t-backend/hang' }, { path: '/t-backend/slow/100' }, { path: '/slow/1500' }, { path: '/' }],
      true,
    );
    expect(answers.map((a) => a.status ?? a.error)).toEqual([504, 200, 504, 200, 200, 200]);
    expect(answers[0]!.body).toMatch(/timeout/);
    // Which bound answered: request (1 s) and backendRequest (500 ms, under a 4 s request
    // bound); both well before the client's own 5 s. The rule without timeouts waited 1.5 s.
    expect(answers[0]!.ms).toBeGreaterThanOrEqual(950);
    expect(answers[0]!.ms).toBeLessThan(3000);
    expect(answers[2]!.ms).toBeGreaterThanOrEqual(450);
    expect(answers[2]!.ms).toBeLessThan(2000);
    expect(answers[4]!.ms).toBeGreaterThanOrEqual(1450);
    expect(await count('request')).toBe(before.request + 1);
    expect(await count('backendRequest')).toBe(before.backendRequest + 1);
    // The connection the hung request left is closed by its read timeout (bound + 5 s), not kept forever.
    expect(await eventually(async () => serverOut.v1!.includes('GONE /t-request/hang'), (x) => x, 15_000)).toBe(true);
  }, 60_000);

  test('timeouts cover the whole response: a body still trickling in when the bound runs out is a 504 and its upstream connection is closed; a body that ends inside the bound passes whole', async () => {
    const count = async (kind: string) => metricValue(await proxy.metrics(), 'fsmn_proxy_gateway_timeouts_total', { route: `${NS}/main`, timeout: kind });
    const before = { request: await count('request'), backendRequest: await count('backendRequest') };
    const answers = await send([
      // Head at once, then a line every 300 ms for 6 s: past the 1 s request bound.
      { path: '/t-request/trickle/20/300' },
      // Past the 500 ms backendRequest bound (request bound 4 s).
      { path: '/t-backend/trickle/20/200' },
      // Ends after 300 ms, inside the 1 s bound: the whole body.
      { path: '/t-request/trickle/3/100' },
      // No timeouts on this rule: 1.8 s of trickle arrives whole.
      { path: '/trickle/6/300' },
    ]);
    expect(answers.map((a) => a.status ?? a.error)).toEqual([504, 504, 200, 200]);
    expect(answers[0]!.body).toMatch(/timeout/);
    expect(answers[0]!.ms).toBeGreaterThanOrEqual(950);
    expect(answers[0]!.ms).toBeLessThan(3000);
    expect(answers[1]!.ms).toBeGreaterThanOrEqual(450);
    expect(answers[1]!.ms).toBeLessThan(2000);
    expect(answers[2]!.body).toBe('line 3\nline 2\nline 1\n');
    expect(answers[3]!.body!.split('\n').filter(Boolean)).toHaveLength(6);
    expect(answers[3]!.ms).toBeGreaterThanOrEqual(1750);
    // What the cut relies on (docs/ingress-egress.md): Pipy 1.5's HTTP/1 server side passes
    // a response on only once it is complete, head included, so the client saw nothing of
    // the cut ones. If Pipy starts streaming bodies, this fails and the docs must change.
    expect(answers[3]!.headMs).toBeGreaterThanOrEqual(1500);
    expect(await count('request')).toBe(before.request + 1);
    expect(await count('backendRequest')).toBe(before.backendRequest + 1);
    // The gateway closed the connections of the two cut responses while they were still
    // sending (the first would have ended after 6 s, the second after 4 s).
    expect(await eventually(async () => serverOut.v1!.includes('CUT /t-request/trickle/20/300') && serverOut.v1!.includes('CUT /t-backend/trickle/20/200'), (x) => x, 8000)).toBe(true);
    expect(serverOut.v1).not.toMatch(/DONE \/t-(request|backend)\/trickle\/20/);
    expect(serverOut.v1).toMatch(/DONE \/t-request\/trickle\/3\/100/);
  }, 60_000);

  test('HTTPS: TLS terminated with the certificate the SNI names, two hostnames on one port (GatewaySecret*, HTTPRouteHTTPSListener)', async () => {
    const answers = await send([
      { path: '/', https: true, servername: 'a.example.com', host: 'a.example.com' },
      { path: '/v2', https: true, servername: 'b.example.com', host: 'b.example.com' },
      { path: '/', https: true, servername: 'c.example.com', host: 'c.example.com' },
    ]);
    expect(answers.map((a) => [a.cert ?? a.error?.slice(0, 20), a.status === 200 ? podOf(a) : a.status])).toEqual([
      ['a.example.com', 'v1'],
      ['b.example.com', 'v1'],
      [expect.any(String), undefined],
    ]);
    expect(answers[2]!.error).toBeDefined();
    expect(got(answers[0]!).headers['x-forwarded-proto']).toBe('https');
  }, 60_000);

  test('TrafficTargets apply to the gateway\'s identity (smi): an allowed backend answers, the other is 403', async () => {
    const mesh: Obj[] = [
      { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'fsm-mesh-config', namespace: 'fsm-system' }, data: { trafficPolicy: 'smi' } },
      {
        apiVersion: 'access.smi-spec.io/v1alpha3',
        kind: 'TrafficTarget',
        metadata: { name: 'gw-to-v1', namespace: NS },
        spec: { destination: { kind: 'ServiceAccount', name: 'v1', namespace: NS }, sources: [{ kind: 'ServiceAccount', name: 'edge-gw', namespace: EDGE }], rules: [{ kind: 'TCPRoute', name: 'all' }] },
      },
      { apiVersion: 'specs.smi-spec.io/v1alpha4', kind: 'TCPRoute', metadata: { name: 'all', namespace: NS }, spec: {} },
    ];
    await use(routes(), mesh);
    expect((await send([{ path: '/' }, { path: '/v2' }])).map(podOf)).toEqual(['v1', 'HTTP 403']);
    await use(routes());
  }, 60_000);

  test('a route moved between backends live, three reloads under keep-alive load: 0 failed requests', async () => {
    const moves = [routes([to(V2)]), routes([to(V1)]), routes([to(V2)])];
    const N = 1500;
    const load = send(Array.from({ length: N }, () => ({ path: '/' })), true);
    for (const objs of moves) {
      await new Promise((r) => setTimeout(r, 150));
      await use(objs);
    }
    const answers = await load;
    expect(answers.filter((a) => a.status !== 200)).toEqual([]);
    expect(answers).toHaveLength(N);
    // The moves happened while the load ran: both backends answered some of it.
    const pods = new Set(answers.map(podOf));
    expect([...pods].sort()).toEqual(['v1', 'v2']);
    // After the last move every new request goes to v2.
    expect((await send([{ path: '/' }, { path: '/' }])).map(podOf)).toEqual(['v2', 'v2']);
  }, 90_000);
});
