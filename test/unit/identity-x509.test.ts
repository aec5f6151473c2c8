import { execFileSync } from 'node:child_process';
import * as asn from '@peculiar/asn1-schema';
import * as asnX509 from '@peculiar/asn1-x509';
import { X509Certificate, generateKeyPairSync, webcrypto } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidInputError } from '../../src/errors.js';
import {
  createCsr,
  createIntermediate,
  createRoot,
  generateKeyPair,
  loadSigner,
  namesDisagree,
  parseCertificate,
  parseCsr,
  privateKeyToPem,
  signLeaf,
  splitPem,
  verifyChain,
} from '../../src/identity/x509.js';

const TD = 'cluster.local';
const id = { namespace: 'demo', serviceAccount: 'web' };
const DAY = 24 * 3600_000;

async function rootSigner(name = 'test root') {
  const root = await createRoot({ commonName: name, lifetimeMs: 365 * DAY });
  return { root, signer: await loadSigner(root.certPem, root.keyPem) };
}

describe('workload X.509', () => {
  test('a CSR carries the identity in CN, DNS SAN and SPIFFE URI SAN, with a P-256 key', async () => {
    const keys = await generateKeyPair();
    const csr = await parseCsr(await createCsr(keys, TD, id));
    expect(csr).toMatchObject({
      commonNames: ['web.demo.sa.cluster.local'],
      dnsNames: ['web.demo.sa.cluster.local'],
      uris: ['spiffe://cluster.local/ns/demo/sa/web'],
      otherNames: [],
      keyAlgorithm: 'ECDSA P-256',
      signatureValid: true,
    });
  });

  test('a leaf signed by a root: names, usages, backdated notBefore, chain verifies; node crypto agrees', async () => {
    const { root, signer } = await rootSigner();
    const keys = await generateKeyPair();
    const now = new Date();
    const leaf = await signLeaf(await createCsr(keys, TD, id), signer, { trustDomain: TD, identity: id, lifetimeMs: DAY, now });
    expect(leaf.chainPem).toEqual([leaf.certPem]);
    const info = parseCertificate(leaf.certPem);
    expect(info.identity).toEqual(id);
    expect(info.trustDomain).toBe(TD);
    expect(info.isCa).toBe(false);
    expect(namesDisagree(info)).toBeUndefined();
    expect(info.notBefore.getTime()).toBe(Math.floor((now.getTime() - 5 * 60_000) / 1000) * 1000);
    expect(info.notAfter.getTime()).toBe(Math.floor((now.getTime() + DAY) / 1000) * 1000);
    expect(await verifyChain(leaf.chainPem, [root.certPem])).toBeUndefined();

    // An independent reader (OpenSSL inside node) sees the same certificate.
    const n = new X509Certificate(leaf.certPem);
    expect(n.checkIssued(new X509Certificate(root.certPem))).toBe(true);
    expect(n.verify(new X509Certificate(root.certPem).publicKey)).toBe(true);
    expect(n.subjectAltName).toBe('DNS:web.demo.sa.cluster.local, URI:spiffe://cluster.local/ns/demo/sa/web');
    expect(n.keyUsage).toEqual(expect.arrayContaining(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']));
    expect(n.subject).toBe('CN=web.demo.sa.cluster.local');
  });

  test('a leaf is canonical DER: the parts copied in as bytes (issuer, algorithm, extensions, the request\'s key) decode and re-encode to the same bytes', async () => {
    const { root, signer } = await rootSigner();
    const keys = await generateKeyPair();
    const csrPem = await createCsr(keys, TD, id);
    const leaf = await signLeaf(csrPem, signer, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    const der = new X509Certificate(leaf.certPem).raw;
    const cert = asn.AsnConvert.parse(der, asnX509.Certificate);
    expect(Buffer.from(asn.AsnConvert.serialize(cert)).equals(der)).toBe(true);
    // Each part the issuer writes as bytes, read back as a structure.
    const rootCert = asn.AsnConvert.parse(new X509Certificate(root.certPem).raw, asnX509.Certificate);
    expect(Buffer.from(asn.AsnConvert.serialize(cert.tbsCertificate.issuer)).equals(Buffer.from(asn.AsnConvert.serialize(rootCert.tbsCertificate.subject)))).toBe(true);
    expect(cert.tbsCertificate.signature.algorithm).toBe('1.2.840.10045.4.3.2');
    expect(cert.signatureAlgorithm.algorithm).toBe('1.2.840.10045.4.3.2');
    expect(cert.tbsCertificate.extensions!.map((e) => [e.extnID, e.critical])).toEqual([
      ['2.5.29.19', true],
      ['2.5.29.15', true],
      ['2.5.29.37', false],
      ['2.5.29.35', false],
      ['2.5.29.17', false],
      ['2.5.29.14', false],
    ]);
    expect(Buffer.from(asn.AsnConvert.serialize(cert.tbsCertificate.subjectPublicKeyInfo)).equals((await parseCsr(csrPem)).spki)).toBe(true);
    expect(Buffer.from(asn.AsnConvert.serialize(cert.tbsCertificate.subjectPublicKeyInfo)).equals(Buffer.from(await webcrypto.subtle.exportKey('spki', keys.publicKey)))).toBe(true);
  });

  test('the private key exported as PKCS#8 matches the issued certificate', async () => {
    const { signer } = await rootSigner();
    const keys = await generateKeyPair();
    const leaf = await signLeaf(await createCsr(keys, TD, id), signer, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    const { createPrivateKey } = await import('node:crypto');
    expect(new X509Certificate(leaf.certPem).checkPrivateKey(createPrivateKey(await privateKeyToPem(keys.privateKey)))).toBe(true);
  });

  test('an intermediate signs; the chain carries it; verification needs only the root', async () => {
    const { root, signer } = await rootSigner();
    const inter = await createIntermediate(signer, { commonName: 'test intermediate', lifetimeMs: 30 * DAY });
    const interSigner = await loadSigner(inter.certPem, inter.keyPem);
    const keys = await generateKeyPair();
    const leaf = await signLeaf(await createCsr(keys, TD, id), interSigner, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    expect(leaf.chainPem).toHaveLength(2);
    expect(leaf.chainPem[1]).toBe(inter.certPem);
    expect(await verifyChain(leaf.chainPem, [root.certPem])).toBeUndefined();
    // Without the intermediate the leaf does not reach the root.
    expect(await verifyChain([leaf.certPem], [root.certPem])).toMatch(/not signed by any root/);
    // The intermediate's lifetime caps the leaf's.
    const long = await signLeaf(await createCsr(keys, TD, id), interSigner, { trustDomain: TD, identity: id, lifetimeMs: 365 * DAY });
    expect(long.notAfter.getTime()).toBeLessThanOrEqual(parseCertificate(inter.certPem).notAfter.getTime());
  });

  test('verification refuses a foreign root, an expired leaf, and a non-CA issuer', async () => {
    const { signer } = await rootSigner('ours');
    const foreign = await createRoot({ commonName: 'ours', lifetimeMs: 365 * DAY }); // same name, other key
    const keys = await generateKeyPair();
    const leaf = await signLeaf(await createCsr(keys, TD, id), signer, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    expect(await verifyChain(leaf.chainPem, [foreign.certPem])).toMatch(/not signed by any root/);
    expect(await verifyChain(leaf.chainPem, [foreign.certPem], new Date(Date.now() + 2 * DAY))).toMatch(/is not valid at/);
    const other = await signLeaf(await createCsr(await generateKeyPair(), TD, id), signer, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    expect(await verifyChain([leaf.certPem, other.certPem], [signer.certPem])).toMatch(/is not a CA/);
    expect(await verifyChain([], [signer.certPem])).toBe('empty chain');
    expect(await verifyChain(leaf.chainPem, [])).toBe('empty trust bundle');
  });

  test('a CSR whose signature does not verify is refused', async () => {
    const { signer } = await rootSigner();
    const a = await createCsr(await generateKeyPair(), TD, id);
    // Flip one byte inside the signature (the last bytes of the DER).
    const body = a.replace(/-----[^-]+-----/g, '').replace(/\s+/g, '');
    const der = Buffer.from(body, 'base64');
    der[der.length - 3] = der[der.length - 3]! ^ 0xff;
    const tampered = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString('base64').replace(/(.{64})/g, '$1\n')}\n-----END CERTIFICATE REQUEST-----\n`;
    await expect(signLeaf(tampered, signer, { trustDomain: TD, identity: id, lifetimeMs: DAY })).rejects.toThrow(/signature does not verify/);
    await expect(parseCsr('not a csr')).rejects.toThrow(InvalidInputError);
  });

  test('user-supplied CA keys: RSA and SEC1 EC PEM are accepted; a mismatched key is refused', async () => {
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const { root } = await rootSigner();
    await expect(loadSigner(root.certPem, ec.privateKey.export({ type: 'sec1', format: 'pem' }) as string)).rejects.toThrow(/does not belong to certificate/);
    await expect(loadSigner(root.certPem, rsa.privateKey.export({ type: 'pkcs1', format: 'pem' }) as string)).rejects.toThrow(/does not belong/);
    const keys = await generateKeyPair();
    const leaf = await signLeaf(await createCsr(keys, TD, id), await loadSigner(root.certPem, root.keyPem), { trustDomain: TD, identity: id, lifetimeMs: DAY });
    await expect(loadSigner(leaf.certPem, root.keyPem)).rejects.toThrow(/is not a CA certificate/);
  });

  test('splitPem keeps order', async () => {
    const a = await createRoot({ commonName: 'a', lifetimeMs: DAY });
    const b = await createRoot({ commonName: 'b', lifetimeMs: DAY });
    expect(splitPem(a.certPem + b.certPem)).toEqual([a.certPem, b.certPem]);
    expect(splitPem('nothing')).toEqual([]);
  });
});

describe('issuing on node crypto: other CA key kinds and requests from another encoder (OpenSSL)', () => {
  let dir = '';
  beforeAll(() => (dir = mkdtempSync(join(tmpdir(), 'fsmt-x509-'))));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const openssl = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });

  test.each([
    ['RSA 2048', ['-newkey', 'rsa:2048'], 'sha256WithRSAEncryption'],
    ['EC P-384', ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384'], 'ecdsa-with-SHA384'],
  ])('a %s root made by openssl signs leaves that OpenSSL verifies, the AKI naming the root SKI', async (_kind, keyArgs, sigAlg) => {
    openssl(['req', '-x509', ...keyArgs, '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=openssl root', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign']);
    const caPem = readFileSync(join(dir, 'ca.crt'), 'utf8');
    const signer = await loadSigner(caPem, readFileSync(join(dir, 'ca.key'), 'utf8'));
    const leaf = await signLeaf(await createCsr(await generateKeyPair(), TD, id), signer, { trustDomain: TD, identity: id, lifetimeMs: DAY });
    const n = new X509Certificate(leaf.certPem);
    const ca = new X509Certificate(caPem);
    expect(n.checkIssued(ca)).toBe(true);
    expect(n.verify(ca.publicKey)).toBe(true);
    expect(await verifyChain(leaf.chainPem, [caPem])).toBeUndefined();
    const text = execFileSync('openssl', ['x509', '-noout', '-text'], { input: leaf.certPem }).toString();
    expect(text).toContain(`Signature Algorithm: ${sigAlg}`);
    const ski = /Subject Key Identifier:\s+([0-9A-F:]+)/.exec(execFileSync('openssl', ['x509', '-noout', '-text'], { input: caPem }).toString())?.[1];
    expect(ski).toBeDefined();
    expect(text).toMatch(new RegExp(`Authority Key Identifier:\\s+(keyid:)?${ski}`));
    // The verify an operator would run.
    expect(execFileSync('openssl', ['verify', '-CAfile', join(dir, 'ca.crt')], { input: leaf.certPem }).toString()).toMatch(/OK/);
  });

  test('a request made by openssl req reads the same as ours; a flipped bit in its body fails the signature', async () => {
    openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'w.key', '-out', 'w.csr', '-subj', '/CN=web.demo.sa.cluster.local', '-addext', 'subjectAltName=DNS:web.demo.sa.cluster.local,URI:spiffe://cluster.local/ns/demo/sa/web,IP:10.0.0.1']);
    const pem = readFileSync(join(dir, 'w.csr'), 'utf8');
    expect(await parseCsr(pem)).toMatchObject({
      commonNames: ['web.demo.sa.cluster.local'],
      dnsNames: ['web.demo.sa.cluster.local'],
      uris: ['spiffe://cluster.local/ns/demo/sa/web'],
      otherNames: [expect.stringMatching(/^ip:/)],
      keyAlgorithm: 'ECDSA P-256',
      signatureValid: true,
    });
    // Change one letter of the CN inside the signed part: still a well-formed request, no longer the one signed.
    const der = Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
    const at = der.indexOf(Buffer.from('web.demo'));
    der[at] = 'x'.charCodeAt(0);
    const forged = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString('base64')}\n-----END CERTIFICATE REQUEST-----\n`;
    expect(await parseCsr(forged)).toMatchObject({ commonNames: ['xeb.demo.sa.cluster.local'], signatureValid: false });
  });
});

describe('workload certificates in a real TLS 1.3 handshake (OpenSSL via node:tls)', () => {
  async function leafFor(signer: Awaited<ReturnType<typeof rootSigner>>['signer'], sa: string) {
    const keys = await generateKeyPair();
    const identity = { namespace: 'demo', serviceAccount: sa };
    const leaf = await signLeaf(await createCsr(keys, TD, identity), signer, { trustDomain: TD, identity, lifetimeMs: DAY });
    return { cert: leaf.chainPem.join(''), key: await privateKeyToPem(keys.privateKey) };
  }

  async function handshake(server: { cert: string; key: string; ca: string }, client: { cert: string; key: string; ca: string }): Promise<{ ok: boolean; peerOfServer?: string; peerOfClient?: string; error?: string; serverError?: string }> {
    const tls = await import('node:tls');
    return new Promise((resolve) => {
      let peerOfServer: string | undefined;
      let serverError: string | undefined;
      // The server judges the client certificate itself (rejectUnauthorized off), so the reason of a refusal is known for certain.
      const srv = tls.createServer({ ...server, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3' }, (s) => {
        if (!s.authorized) {
          serverError = String(s.authorizationError);
          s.destroy();
          return;
        }
        peerOfServer = s.getPeerCertificate().subjectaltname;
        s.end('hi');
      });
      const sockets = new Set<import('node:net').Socket>();
      srv.on('connection', (s) => sockets.add(s));
      srv.on('tlsClientError', () => undefined);
      srv.listen(0, '127.0.0.1', () => {
        const port = (srv.address() as { port: number }).port;
        const c = tls.connect({ port, host: '127.0.0.1', ...client, servername: 'web.demo.sa.cluster.local', minVersion: 'TLSv1.3', checkServerIdentity: () => undefined });
        let settled = false;
        const done = (r: { ok: boolean; error?: string; peerOfClient?: string }) => {
          if (settled) return;
          settled = true;
          c.destroy();
          for (const s of sockets) s.destroy();
          srv.close();
          resolve({ ...r, peerOfServer, ...(serverError ? { serverError } : {}) });
        };
        c.on('data', () => done({ ok: true, peerOfClient: c.getPeerCertificate().subjectaltname }));
        c.on('error', (err) => done({ ok: false, error: err.message }));
        // TLS 1.3: the client is done before the server has judged its certificate; the refusal arrives as an alert or a close.
        c.on('close', () => done({ ok: false, error: 'closed by the server' }));
      });
    });
  }

  test('two identities of one root authenticate each other; the peer identity is in its SANs', async () => {
    const { root, signer } = await rootSigner();
    const web = await leafFor(signer, 'web');
    const db = await leafFor(signer, 'db');
    const r = await handshake({ ...web, ca: root.certPem }, { ...db, ca: root.certPem });
    expect(r).toEqual({ ok: true, peerOfServer: 'DNS:db.demo.sa.cluster.local, URI:spiffe://cluster.local/ns/demo/sa/db', peerOfClient: 'DNS:web.demo.sa.cluster.local, URI:spiffe://cluster.local/ns/demo/sa/web' });
  });

  test('a client certificate from a foreign CA is refused', async () => {
    const ours = await rootSigner('ours');
    const foreign = await rootSigner('foreign');
    const web = await leafFor(ours.signer, 'web');
    const intruder = await leafFor(foreign.signer, 'db');
    const r = await handshake({ ...web, ca: ours.root.certPem }, { ...intruder, ca: ours.root.certPem });
    expect(r.ok).toBe(false);
    expect(r.serverError).toBe('UNABLE_TO_VERIFY_LEAF_SIGNATURE');
    expect(r.peerOfServer).toBeUndefined();
  });
});
