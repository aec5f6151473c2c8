import { X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api } from '@kubernetes/client-node';
import { CertificateError, ensureTls, FileCertStore, generateTls, publishCa, SecretCertStore, servingProblem } from '../../src/controller/certs.js';
import { TestApiServer } from '../support/k8s-api-server.js';

let dir: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-certs-'));
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('controller certificates', () => {
  test('first start generates a CA and a serving certificate with the SANs; keys are private', async () => {
    const m = await ensureTls(new FileCertStore(dir), ['localhost', '127.0.0.1']);
    const ca = new X509Certificate(m.caCert);
    const cert = new X509Certificate(m.cert);
    expect(ca.ca).toBe(true);
    expect(cert.ca).toBe(false);
    expect(cert.checkIssued(ca)).toBe(true);
    expect(cert.subjectAltName).toBe('DNS:localhost, IP Address:127.0.0.1');
    expect(statSync(join(dir, 'ca.key')).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, 'tls.key')).mode & 0o777).toBe(0o600);
    expect(servingProblem(m, ['localhost', '127.0.0.1'])).toBeUndefined();
  });

  test('a restart keeps everything; a new SAN reissues the serving certificate under the same CA', async () => {
    const store = new FileCertStore(dir);
    const first = await ensureTls(store, ['localhost']);
    expect(await ensureTls(store, ['localhost'])).toEqual(first);
    const second = await ensureTls(store, ['localhost', 'controller.lab']);
    expect(second.caCert).toBe(first.caCert);
    expect(second.caKey).toBe(first.caKey);
    expect(second.cert).not.toBe(first.cert);
    expect(new X509Certificate(second.cert).subjectAltName).toBe('DNS:localhost, DNS:controller.lab');
    expect(await store.load()).toEqual(second);
  });

  test('a serving certificate from another CA is detected', async () => {
    const a = await generateTls(['localhost']);
    const b = await generateTls(['localhost']);
    expect(servingProblem({ ...a, cert: b.cert, key: b.key }, ['localhost'])).toBe('not issued by the CA');
    expect(servingProblem({ ...a, key: b.key }, ['localhost'])).toBe('key does not match certificate');
  });

  test('without openssl the error says what is missing and how to get it', async () => {
    const missing = join(dir, 'no-openssl');
    await expect(generateTls(['localhost'], { openssl: missing })).rejects.toThrow(CertificateError);
    await expect(generateTls(['localhost'], { openssl: missing })).rejects.toThrow(/no-openssl was not found: openssl is needed .*apt-get install openssl/);
  });
});

describe('Secret store (cluster mode)', () => {
  let api: TestApiServer;
  beforeEach(async () => {
    api = await TestApiServer.start();
  });
  afterEach(async () => {
    await api.close();
  });

  test('replicas starting together end up with one CA (create-if-absent)', async () => {
    const core = () => api.kubeConfig().makeApiClient(CoreV1Api);
    const [a, b] = await Promise.all([
      ensureTls(new SecretCertStore(core(), 'fsm-system'), ['fsm-node-controller']),
      ensureTls(new SecretCertStore(core(), 'fsm-system'), ['fsm-node-controller']),
    ]);
    expect(a.caCert).toBe(b.caCert);
    const secret = api.get('Secret', 'fsm-system', 'fsm-node-controller-tls')!;
    expect(secret.type).toBe('kubernetes.io/tls');
    expect(Buffer.from((secret.data as Record<string, string>)['ca.crt']!, 'base64').toString()).toBe(a.caCert);
    // Agents get only the public CA, from a ConfigMap.
    await publishCa(core(), 'fsm-system', a.caCert);
    await publishCa(core(), 'fsm-system', a.caCert);
    expect(api.get('ConfigMap', 'fsm-system', 'fsm-node-controller-ca')!.data).toEqual({ 'ca.crt': a.caCert });
  });
});
