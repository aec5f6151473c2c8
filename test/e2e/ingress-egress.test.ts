import { execFile } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { eventually } from '../support/eventually.js';
import { cli, pipyLabSkipReason, root } from '../support/lab-e2e.js';

/**
 * docs/ingress-egress.md end to end in the lab, through the real CLI
 * (`node dist/src/cli/bin.js`, so `npm run build:ts` must have run): the
 * example Gateway, HTTPRoute and access rules, then the Egresses under mesh
 * egress deny, exercised from the lab's outside client and its pods, with
 * `lab check` still passing and `lab down` leaving nothing.
 */

const examples = join(root, 'docs', 'examples', 'ingress-egress');
const pexec = promisify(execFile);

/** Extended HTTPRoute features, on the example's Gateway (docs/examples/ingress-egress/gateway.yaml). */
const EXTENDED_ROUTE = `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: extended
  namespace: demo
spec:
  parentRefs:
    - name: edge-gw
      namespace: edge
      sectionName: http
  hostnames: [ext.lab]
  rules:
    - matches: [{ queryParams: [{ name: track, value: beta }] }]
      backendRefs: [{ name: echo-v2, port: 8080 }]
    - matches: [{ method: DELETE }]
      backendRefs: [{ name: echo-v2, port: 8080 }]
    - matches: [{ path: { type: RegularExpression, value: "/items/[0-9]+" } }]
      filters: [{ type: ResponseHeaderModifier, responseHeaderModifier: { add: [{ name: x-served-by, value: edge-gw }] } }]
      backendRefs: [{ name: echo-v2, port: 8080 }]
    - matches: [{ path: { type: PathPrefix, value: /split } }]
      backendRefs: [{ name: echo-v1, port: 8080, weight: 3 }, { name: echo-v2, port: 8080, weight: 1 }]
    - backendRefs: [{ name: echo-v1, port: 8080 }]
`;

/** One rule to one Service, on its own hostname: moved between backends live. */
const MOVING_ROUTE = (service: string) => `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: moving
  namespace: demo
spec:
  parentRefs: [{ name: edge-gw, namespace: edge, sectionName: http }]
  hostnames: [move.lab]
  rules:
    - backendRefs: [{ name: ${service}, port: 8080 }]
`;

const skip = pipyLabSkipReason();
if (skip) console.warn(`e2e ingress/egress tests skipped: ${skip}`);
const maybe = skip ? describe.skip : describe;

maybe('ingress and egress in the lab (docs/ingress-egress.md)', () => {
  let dir = '';
  let manifests = '';
  const curl = async (place: string, args: string[]) => {
    const r = await cli('lab', 'exec', place, '--', 'curl', '-sS', '-m', '5', '-o', '-', '-w', '\n%{http_code}', ...args);
    const lines = r.stdout.trimEnd().split('\n');
    return { status: lines.pop() ?? '', body: lines.join('\n'), headers: r.stdout };
  };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'fsmt-e2e-ingress-'));
    const up = await cli('lab', 'up', '--dir', join(dir, 'lab'), '--proxy', 'pipy');
    if (up.code !== 0) throw new Error(`lab up failed (${up.code}): ${up.stderr}${up.stdout}`);
    manifests = join(dir, 'lab', 'manifests');
    for (const f of ['gateway.yaml', 'access.yaml']) copyFileSync(join(examples, f), join(manifests, f));
    const key = join(dir, 'shop.key');
    const crt = join(dir, 'shop.crt');
    await pexec('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', crt, '-subj', '/CN=shop.lab', '-addext', 'subjectAltName=DNS:shop.lab', '-days', '2']);
    const b64 = (f: string) => readFileSync(f).toString('base64');
    writeFileSync(join(manifests, 'shop-cert.yaml'), `apiVersion: v1\nkind: Secret\nmetadata:\n  name: shop-cert\n  namespace: edge\ntype: kubernetes.io/tls\ndata:\n  tls.crt: ${b64(crt)}\n  tls.key: ${b64(key)}\n`);
  }, 180_000);

  afterAll(async () => {
    const down = await cli('lab', 'down');
    if (dir) rmSync(dir, { recursive: true, force: true });
    expect(down.stdout).toMatch(/verified none left/);
  }, 120_000);

  test('from the outside client: routes, rewrite, redirect, HTTPS by SNI, on both nodes', async () => {
    // The Gateway reaches the proxies with the next policy: wait for it.
    expect(await eventually(async () => (await curl('outside', ['http://10.78.0.1:8000/hello'])).status, (s) => s === '200', 30_000)).toBe('200');
    const n2 = await curl('outside', ['http://10.78.0.2:8000/v2/items']);
    expect(n2.status).toBe('200');
    expect(JSON.parse(n2.body)).toMatchObject({ path: '/items' });
    expect(['p2', 'p4']).toContain((JSON.parse(n2.body) as { pod: string }).pod);
    const redirect = await curl('outside', ['-i', 'http://10.78.0.1:8000/old/page']);
    expect(redirect.status).toBe('301');
    expect(redirect.headers).toMatch(/location: http:\/\/10\.78\.0\.1:8000\/new\/page/i);
    const tls = await curl('outside', ['--cacert', join(dir, 'shop.crt'), '--resolve', 'shop.lab:8443:10.78.0.1', 'https://shop.lab:8443/']);
    expect(tls.status).toBe('200');
    const status = await cli('status');
    expect(status.stdout).toMatch(/gateway edge\/edge-gw +:8000 HTTP .*:8443 HTTPS .* as edge\/edge-gw/);
  }, 90_000);

  test('without the access rules the gateway identity is refused (403)', async () => {
    rmSync(join(manifests, 'access.yaml'));
    expect(await eventually(async () => (await curl('outside', ['http://10.78.0.1:8000/hello'])).status, (s) => s === '403', 30_000)).toBe('403');
    copyFileSync(join(examples, 'access.yaml'), join(manifests, 'access.yaml'));
    expect(await eventually(async () => (await curl('outside', ['http://10.78.0.1:8000/hello'])).status, (s) => s === '200', 30_000)).toBe('200');
  }, 90_000);

  test('extended route features from the outside client: query, method and regular-expression matches, ResponseHeaderModifier, weights within 5 points', async () => {
    // A second route on its own hostname, so the docs example's route is left as it is.
    writeFileSync(join(manifests, 'extended-route.yaml'), EXTENDED_ROUTE);
    const get = (path: string, extra: string[] = []) => curl('outside', ['-H', 'Host: ext.lab', ...extra, `http://10.78.0.1:8000${path}`]);
    const podOf = (r: { status: string; body: string }) => (r.status === '200' ? (JSON.parse(r.body.slice(r.body.lastIndexOf('\n{') + 1)) as { pod: string }).pod : `HTTP ${r.status}`);
    const v1 = ['p1', 'p3'];
    const v2 = ['p2', 'p4'];
    expect(await eventually(async () => podOf(await get('/?track=beta')), (p) => v2.includes(p), 30_000)).toMatch(/^p[24]$/);
    expect(v1).toContain(podOf(await get('/')));
    expect(v2).toContain(podOf(await get('/', ['-X', 'DELETE'])));
    const re = await get('/items/12', ['-i']);
    expect(v2).toContain(podOf(re));
    expect(re.headers).toMatch(/^x-served-by: edge-gw\r?$/im);
    expect(v1).toContain(podOf(await get('/items/12a')));
    // 200 requests in one curl: 3:1 over echo-v1 and echo-v2.
    const r = await cli('lab', 'exec', 'outside', '--', 'curl', '-sS', '-m', '60', '-H', 'Host: ext.lab', ...Array.from({ length: 200 }, () => 'http://10.78.0.1:8000/split'));
    const pods = r.stdout.trim().split('\n').map((l) => (JSON.parse(l) as { pod: string }).pod);
    expect(pods).toHaveLength(200);
    expect(Math.abs(pods.filter((p) => v1.includes(p)).length / 200 - 0.75)).toBeLessThanOrEqual(0.05);
    rmSync(join(manifests, 'extended-route.yaml'));
  }, 120_000);

  test('a route moved between backends live under load from the outside client: 0 failed requests', async () => {
    const move = (svc: string) => writeFileSync(join(manifests, 'moving-route.yaml'), MOVING_ROUTE(svc));
    const podOf = (body: string) => (JSON.parse(body) as { pod: string }).pod;
    move('echo-v1');
    expect(await eventually(async () => (await curl('outside', ['-H', 'Host: move.lab', 'http://10.78.0.1:8000/'])).status, (s) => s === '200', 30_000)).toBe('200');
    // 200 requests at 20/s (10 s) on keep-alive connections while the route moves three times.
    const load = cli('lab', 'exec', 'outside', '--', 'curl', '-sS', '-m', '60', '--rate', '20/s', '-H', 'Host: move.lab', '-w', '%{http_code}\n', ...Array.from({ length: 200 }, () => 'http://10.78.0.1:8000/'));
    for (const svc of ['echo-v2', 'echo-v1', 'echo-v2']) {
      await new Promise((r) => setTimeout(r, 2500));
      move(svc);
    }
    const r = await load;
    const lines = r.stdout.trim().split('\n');
    const codes = lines.filter((l) => /^\d{3}$/.test(l));
    expect({ code: r.code, stderr: r.stderr.trim() }).toEqual({ code: 0, stderr: '' });
    expect(codes).toHaveLength(200);
    expect(codes.filter((c) => c !== '200')).toEqual([]);
    const pods = new Set(lines.filter((l) => l.startsWith('{')).map(podOf));
    expect([...pods].some((p) => ['p1', 'p3'].includes(p)) && [...pods].some((p) => ['p2', 'p4'].includes(p))).toBe(true);
    // Once the last move is in, the route goes to echo-v2.
    expect(await eventually(async () => podOf((await curl('outside', ['-H', 'Host: move.lab', 'http://10.78.0.1:8000/'])).body), (p) => ['p2', 'p4'].includes(p), 30_000)).toMatch(/^p[24]$/);
    rmSync(join(manifests, 'moving-route.yaml'));
  }, 180_000);

  test('egress deny: Host, SNI and CIDR allowed as the Egresses say, everything else refused; lab check still passes', async () => {
    const cfg = join(manifests, '00-mesh-config.yaml');
    writeFileSync(cfg, readFileSync(cfg, 'utf8').replace('egress: allow', 'egress: deny'));
    copyFileSync(join(examples, 'egress.yaml'), join(manifests, 'egress.yaml'));
    const ca = join(dir, 'lab', 'logs', 'outside', 'ca.crt');
    expect(await eventually(async () => (await curl('p1', ['-H', 'Host: other.example', 'http://10.78.0.201/'])).status, (s) => s === '403', 30_000)).toBe('403');
    expect((await curl('p1', ['--resolve', 'outside.lab:80:10.78.0.201', 'http://outside.lab/'])).status).toBe('200');
    expect((await curl('p1', ['--cacert', ca, '--resolve', 'outside.lab:443:10.78.0.201', 'https://outside.lab/'])).status).toBe('200');
    expect((await curl('p2', ['http://10.78.0.201/'])).status).toBe('200');
    expect((await curl('p3', ['http://10.78.0.201/'])).status).toBe('000');
    // The resilience cases are lab.test.ts's to judge (they take about a minute): only the mesh with egress deny here.
    const check = await cli('lab', 'check', '--no-resilience');
    expect({ code: check.code, tail: check.stdout.trim().split('\n').pop() }).toEqual({ code: 0, tail: expect.stringMatching(/check passed/) });
  }, 180_000);
});
