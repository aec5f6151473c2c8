import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Ingress } from './schema.js';
import { gatewayCertificates, type GatewayCertificateFiles } from './render.js';
import type { NodePolicy } from '../policy/schema.js';

/**
 * The agent's side of Gateway TLS: the listener certificates the node's
 * Gateways use are written as PEM files (key 0600, directory 0700) under
 * `<dir>/<namespace>/<secret>/`, and the proxy config names the files, never
 * the key (the same rule as the tunnel identities, src/proxy/config.ts).
 * Files are replaced atomically and only when their content changed; Secrets
 * no Gateway of the node uses any more are removed.
 */

function writeIfChanged(path: string, text: string): void {
  try {
    if (readFileSync(path, 'utf8') === text) return;
  } catch {
    // absent: write it
  }
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, text, { mode: 0o600 });
  renameSync(tmp, path);
}

export function writeGatewayCertificates(dir: string, policy: Pick<NodePolicy, 'node'> & { ingress?: Ingress | undefined }): Record<string, GatewayCertificateFiles> {
  const wanted = gatewayCertificates(policy);
  const out: Record<string, GatewayCertificateFiles> = {};
  for (const [secret, pem] of wanted) {
    const [ns, name] = secret.split('/') as [string, string];
    const d = join(dir, ns, name);
    mkdirSync(d, { recursive: true, mode: 0o700 });
    // Key first: a proxy reload between the two writes never pairs a new certificate with an old key.
    writeIfChanged(join(d, 'key.pem'), pem.keyPem);
    writeIfChanged(join(d, 'cert.pem'), pem.certPem);
    out[secret] = { certFile: join(d, 'cert.pem'), keyFile: join(d, 'key.pem') };
  }
  // Stale Secrets: their keys do not stay on the node.
  let namespaces: string[] = [];
  try {
    namespaces = readdirSync(dir);
  } catch {
    return out;
  }
  for (const ns of namespaces) {
    for (const name of readdirSync(join(dir, ns))) if (!wanted.has(`${ns}/${name}`)) rmSync(join(dir, ns, name), { recursive: true, force: true });
    if (readdirSync(join(dir, ns)).length === 0) rmSync(join(dir, ns), { recursive: true, force: true });
  }
  return out;
}
