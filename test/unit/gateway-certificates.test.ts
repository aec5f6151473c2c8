import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeGatewayCertificates } from '../../src/gateway/certificates.js';
import type { Ingress } from '../../src/gateway/schema.js';

const ingress = (secrets: string[], nodes: string[] | null = null): Ingress => ({
  gateways: [
    {
      namespace: 'edge',
      name: 'gw',
      identity: { namespace: 'edge', serviceAccount: 'gw' },
      nodes,
      ports: [{ port: 443, protocol: 'HTTPS', listeners: ['https'], hosts: [], rules: [], certificates: secrets.map((s) => ({ hostname: null, secret: s, certPem: `CERT ${s}`, keyPem: `KEY ${s}` })) }],
    },
  ],
});

describe('gateway certificate files (agent side)', () => {
  let dir = '';
  beforeEach(() => (dir = mkdtempSync(join(tmpdir(), 'fsmn-gwcerts-'))));
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  test('PEM files per Secret, the key 0600; the config gets paths only; stale Secrets are removed', () => {
    const files = writeGatewayCertificates(dir, { node: { name: 'n1', addresses: [], interceptionMode: null }, ingress: ingress(['edge/a', 'certs/b']) });
    expect(Object.keys(files).sort()).toEqual(['certs/b', 'edge/a']);
    expect(readFileSync(files['edge/a']!.keyFile, 'utf8')).toBe('KEY edge/a');
    expect(statSync(files['edge/a']!.keyFile).mode & 0o777).toBe(0o600);
    expect(statSync(join(dir, 'edge')).mode & 0o077).toBe(0);
    writeGatewayCertificates(dir, { node: { name: 'n1', addresses: [], interceptionMode: null }, ingress: ingress(['edge/a']) });
    expect(existsSync(join(dir, 'certs'))).toBe(false);
    expect(existsSync(files['edge/a']!.certFile)).toBe(true);
  });

  test('a node that does not serve the Gateway holds none of its keys', () => {
    writeGatewayCertificates(dir, { node: { name: 'n1', addresses: [], interceptionMode: null }, ingress: ingress(['edge/a']) });
    expect(writeGatewayCertificates(dir, { node: { name: 'n2', addresses: [], interceptionMode: null }, ingress: ingress(['edge/a'], ['n1']) })).toEqual({});
    expect(existsSync(join(dir, 'edge'))).toBe(false);
  });
});
