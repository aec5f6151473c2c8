import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createCsr, createRoot, generateKeyPair, loadSigner, privateKeyToPem, signLeaf, type CaSigner } from '../src/identity/x509.js';
import type { ProxyIdentityFiles, ProxyTrust } from '../src/proxy/config.js';

/**
 * Workload certificates for benchmarks that run the node proxies with mutual
 * TLS tunnels, as the agent writes them: a key (0600) and a chain per
 * identity under `dir/<ns>/<sa>/`, signed by one throwaway root.
 */

export const BENCH_TRUST_DOMAIN = 'cluster.local';

export interface BenchCa {
  signer: CaSigner;
  trust: ProxyTrust;
}

export async function benchCa(): Promise<BenchCa> {
  const root = await createRoot({ commonName: 'fsmbench-root', lifetimeMs: 86_400_000 });
  return { signer: await loadSigner(root.certPem, root.keyPem), trust: { trustDomain: BENCH_TRUST_DOMAIN, bundle: [root.certPem] } };
}

/** One identity's key and certificate files, valid for `lifetimeMs` (default 1 h). */
export async function benchLeaf(ca: CaSigner, namespace: string, serviceAccount: string, dir: string, lifetimeMs = 3_600_000): Promise<ProxyIdentityFiles> {
  const keys = await generateKeyPair();
  const identity = { namespace, serviceAccount };
  const signed = await signLeaf(await createCsr(keys, BENCH_TRUST_DOMAIN, identity), ca, { trustDomain: BENCH_TRUST_DOMAIN, identity, lifetimeMs });
  const d = join(dir, namespace, serviceAccount);
  mkdirSync(d, { recursive: true, mode: 0o700 });
  writeFileSync(join(d, 'key.pem'), await privateKeyToPem(keys.privateKey), { mode: 0o600 });
  chmodSync(join(d, 'key.pem'), 0o600);
  writeFileSync(join(d, 'cert.pem'), signed.chainPem.join(''));
  return { certPath: join(d, 'cert.pem'), keyPath: join(d, 'key.pem'), notAfter: signed.notAfter, state: 'valid' };
}
