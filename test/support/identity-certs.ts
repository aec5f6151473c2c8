import { createHash } from 'node:crypto';
import { chmodSync, mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { identityDnsName } from '../../src/identity/spiffe.js';
import { createCsr, createRoot, generateKeyPair, loadSigner, privateKeyToPem, signLeaf, type CaSigner } from '../../src/identity/x509.js';
import type { ProxyIdentityFiles } from '../../src/proxy/config.js';

/**
 * Workload certificates for tests of the proxy's mutual TLS, made by the
 * project's own issuing code (src/identity/x509.ts), so the proxy is tested
 * with the certificates the agent will really hold. Identities are "ns/sa".
 */

export const TRUST_DOMAIN = 'cluster.local';

export interface TestCa {
  name: string;
  certPem: string;
  signer: CaSigner;
}

export interface Issued {
  identity: string;
  /** Leaf first, then any intermediates. */
  chainPem: string;
  keyPem: string;
  notAfter: Date;
}

const DAY = 86_400_000;

/** A root valid from a day ago for ten days (so backdated leaves fit under it). */
export async function testCa(name: string): Promise<TestCa> {
  const root = await createRoot({ commonName: name, lifetimeMs: 10 * DAY, now: new Date(Date.now() - DAY) });
  return { name, certPem: root.certPem, signer: await loadSigner(root.certPem, root.keyPem) };
}

const parse = (id: string) => {
  const [namespace, serviceAccount] = id.split('/') as [string, string];
  return { namespace, serviceAccount };
};

/** A leaf for `identity`, valid from `now - skew` for `lifetimeMs` (a `now` in the past gives an expired one). */
export async function issue(ca: TestCa, identity: string, lifetimeMs: number, now = new Date()): Promise<Issued> {
  const keys = await generateKeyPair();
  const csr = await createCsr(keys, TRUST_DOMAIN, parse(identity));
  const leaf = await signLeaf(csr, ca.signer, { trustDomain: TRUST_DOMAIN, identity: parse(identity), lifetimeMs, now, skewMs: 60_000 });
  return { identity, chainPem: leaf.chainPem.join(''), keyPem: await privateKeyToPem(keys.privateKey), notAfter: leaf.notAfter };
}

/**
 * Write an identity the way the agent keeps it: <dir>/<ns>/<sa>/{key.pem,cert.pem},
 * the key 0600, each file replaced atomically (key first). Returns what the
 * config renderer takes.
 */
export function writeIdentity(dir: string, issued: Issued, state = 'valid'): ProxyIdentityFiles {
  const d = join(dir, issued.identity);
  mkdirSync(d, { recursive: true, mode: 0o700 });
  const put = (name: string, text: string, mode: number) => {
    const tmp = join(d, `.${name}.tmp`);
    writeFileSync(tmp, text, { mode });
    chmodSync(tmp, mode);
    renameSync(tmp, join(d, name));
  };
  put('key.pem', issued.keyPem, 0o600);
  put('cert.pem', issued.chainPem, 0o644);
  return { certPath: join(d, 'cert.pem'), keyPath: join(d, 'key.pem'), notAfter: issued.notAfter, state };
}

/** The SNI a node proxy expects for `identity` (proxy/tls.js sniOf): a hash of its DNS name. */
export function tunnelServerName(identity: string): string {
  const name = identityDnsName(TRUST_DOMAIN, parse(identity));
  return `id-${createHash('sha256').update(name).digest('hex').slice(0, 32)}.${TRUST_DOMAIN}`;
}
