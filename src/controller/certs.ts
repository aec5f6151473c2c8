import { createPrivateKey, randomBytes, X509Certificate } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { CommandError, FsmNodeError } from '../errors.js';
import { writeFileAtomic } from '../policy/store.js';
import { run } from '../util/exec.js';
import { logger } from '../util/log.js';

/**
 * The controller's CA and serving certificate. Generated on first start and
 * kept (files in the lab's state directory; a Secret in a cluster), so agents
 * that pinned the CA keep trusting the controller across restarts. Node's
 * crypto can parse X.509 but not build it, so generation shells out to the
 * openssl CLI (once per CA lifetime); checks use X509Certificate.
 */

export interface TlsMaterial {
  caCert: string;
  caKey: string;
  cert: string;
  key: string;
}

export class CertificateError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('FSMN_ERR_CERTIFICATE', message, options);
  }
}

/** Where the material is kept. createIfAbsent returns what is stored afterwards (another replica may have won). */
export type CertStore = PemStore<TlsMaterial>;

const log = logger('controller-certs');
const RENEW_BEFORE_MS = 30 * 24 * 3600 * 1000;

/**
 * The stored material if it is usable for `sans`; otherwise new material:
 * a new CA only when there is none (or it is broken or expiring), a new serving
 * certificate under the kept CA when SANs changed or it nears expiry.
 */
export async function ensureTls(store: CertStore, sans: string[], o: OpensslOptions & { now?: Date } = {}): Promise<TlsMaterial> {
  const now = o.now ?? new Date();
  let m = await store.load();
  if (!m || !caUsable(m, now)) {
    if (m) log.warn({ store: store.description }, 'stored CA is unusable or expiring; generating a new CA (agents must get the new ca.crt)');
    const fresh = await generateTls(sans, o);
    m = m ? (await store.replace(fresh), fresh) : await store.createIfAbsent(fresh);
    log.info({ store: store.description }, 'controller CA and serving certificate ready');
  }
  const why = servingProblem(m, sans, now);
  if (why) {
    log.info({ store: store.description, why }, 'issuing a new serving certificate under the kept CA');
    const { cert, key } = await issueServing(m.caCert, m.caKey, sans, o);
    m = { ...m, cert, key };
    await store.replace(m);
  }
  return m;
}

function caUsable(m: TlsMaterial, now: Date): boolean {
  try {
    const ca = new X509Certificate(m.caCert);
    return ca.ca && ca.checkPrivateKey(createPrivateKey(m.caKey)) && new Date(ca.validTo).getTime() - now.getTime() > RENEW_BEFORE_MS;
  } catch {
    return false;
  }
}

/** Why the serving certificate cannot be used as is, or undefined when it can. */
export function servingProblem(m: TlsMaterial, sans: string[], now = new Date()): string | undefined {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(m.cert);
    if (!cert.checkPrivateKey(createPrivateKey(m.key))) return 'key does not match certificate';
  } catch (err) {
    return `unreadable: ${(err as Error).message}`;
  }
  if (!cert.checkIssued(new X509Certificate(m.caCert)) || !cert.verify(new X509Certificate(m.caCert).publicKey)) return 'not issued by the CA';
  if (new Date(cert.validTo).getTime() - now.getTime() < RENEW_BEFORE_MS) return 'expires within 30 days';
  const have = new Set((cert.subjectAltName ?? '').split(', ').map((s) => s.replace(/^IP Address:/, 'IP:')));
  const missing = sans.filter((s) => !have.has(sanEntry(s)));
  return missing.length ? `does not cover ${missing.join(', ')}` : undefined;
}

const sanEntry = (s: string): string => (isIP(s) ? `IP:${s}` : `DNS:${s}`);

/** Which openssl binary to run (a path, or a name looked up on PATH). */
export interface OpensslOptions {
  openssl?: string;
}

/** Run openssl; an argument "@name" stands for the file `name` in the scratch directory `dir`. */
async function openssl(args: string[], dir: string, o: OpensslOptions): Promise<string> {
  const bin = o.openssl ?? 'openssl';
  try {
    return (await run(bin, args.map((a) => (a.startsWith('@') ? join(dir, a.slice(1)) : a)))).stdout;
  } catch (err) {
    if (err instanceof CommandError && err.exitCode === null) {
      throw new CertificateError(`${bin} was not found: openssl is needed once to create the controller CA and serving certificate (Debian: apt-get install openssl)`, { cause: err });
    }
    throw new CertificateError(`openssl ${args[0]} failed: ${(err as Error).message}`, { cause: err });
  }
}

async function withTmp<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'fsm-node-certs-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

const EC_KEY = ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256'];

export async function generateTls(sans: string[], o: OpensslOptions = {}): Promise<TlsMaterial> {
  return withTmp(async (dir) => {
    await openssl([...EC_KEY, '-out', '@ca.key'], dir, o);
    const caKey = readFileSync(join(dir, 'ca.key'), 'utf8');
    await openssl(
      ['req', '-x509', '-new', '-key', '@ca.key', '-subj', '/CN=fsm-node-controller-ca', '-days', '3650', '-sha256',
        '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign', '-out', '@ca.crt'],
      dir,
      o,
    );
    const caCert = readFileSync(join(dir, 'ca.crt'), 'utf8');
    return { caCert, caKey, ...(await issueServing(caCert, caKey, sans, o)) };
  });
}

export async function issueServing(caCert: string, caKey: string, sans: string[], o: OpensslOptions = {}): Promise<{ cert: string; key: string }> {
  if (sans.length === 0) throw new CertificateError('the serving certificate needs at least one subject alternative name');
  return withTmp(async (dir) => {
    await writeFile(join(dir, 'ca.crt'), caCert);
    await writeFile(join(dir, 'ca.key'), caKey, { mode: 0o600 });
    await writeFile(
      join(dir, 'ext.cnf'),
      `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=${sans.map(sanEntry).join(',')}\n`,
    );
    await openssl([...EC_KEY, '-out', '@tls.key'], dir, o);
    await openssl(['req', '-new', '-key', '@tls.key', '-subj', '/CN=fsm-node-controller', '-out', '@tls.csr'], dir, o);
    await openssl(
      ['x509', '-req', '-in', '@tls.csr', '-CA', '@ca.crt', '-CAkey', '@ca.key', '-set_serial', `0x${randomBytes(16).toString('hex')}`,
        '-days', '825', '-sha256', '-extfile', '@ext.cnf', '-out', '@tls.crt'],
      dir,
      o,
    );
    return { cert: readFileSync(join(dir, 'tls.crt'), 'utf8'), key: readFileSync(join(dir, 'tls.key'), 'utf8') };
  });
}

/**
 * Where PEM material is kept: the controller's own CA and serving certificate
 * (TlsMaterial), the mesh's workload CA (src/identity/providers/builtin.ts),
 * each as one set of named PEM texts. Files in a directory in the lab; one
 * Secret per set in a cluster. `optional` members may be absent ('' on load).
 */
export type PemSet<T> = { [K in keyof T]: string };

export interface PemStoreLayout<T extends PemSet<T>> {
  /** Member -> file name in the directory, and key in the Secret. */
  files: { [K in keyof T]: string };
  /** Members that are private keys (mode 0600). */
  secret: (keyof T)[];
  /** Members that may be missing. */
  optional?: (keyof T)[];
}

export interface PemStore<T extends PemSet<T>> {
  readonly description: string;
  load(): Promise<T | undefined>;
  createIfAbsent(m: T): Promise<T>;
  replace(m: T): Promise<void>;
}

const TLS_LAYOUT: PemStoreLayout<TlsMaterial> = { files: { caCert: 'ca.crt', caKey: 'ca.key', cert: 'tls.crt', key: 'tls.key' }, secret: ['caKey', 'key'] };

/** PEM files in a directory (keys 0600). */
export class FilePemStore<T extends PemSet<T>> implements PemStore<T> {
  readonly description: string;

  constructor(
    private readonly dir: string,
    private readonly layout: PemStoreLayout<T>,
  ) {
    this.description = `directory ${dir}`;
  }

  async load(): Promise<T | undefined> {
    const out: Record<string, string> = {};
    for (const [k, f] of Object.entries(this.layout.files) as [keyof T & string, string][]) {
      try {
        out[k] = readFileSync(join(this.dir, f), 'utf8');
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new CertificateError(`cannot read certificates in ${this.dir}: ${(err as Error).message}`, { cause: err });
        if (!this.layout.optional?.includes(k)) return undefined;
        out[k] = '';
      }
    }
    return out as T;
  }

  async createIfAbsent(m: T): Promise<T> {
    // One controller per state directory: no race to settle here.
    await this.replace(m);
    return m;
  }

  async replace(m: T): Promise<void> {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    for (const [k, f] of Object.entries(this.layout.files) as [keyof T & string, string][]) {
      await writeFileAtomic(join(this.dir, f), m[k], this.layout.secret.includes(k) ? 0o600 : 0o644);
    }
  }
}

/** Lab: four PEM files in the controller's state directory (keys 0600). ca.crt is what agents are given. */
export class FileCertStore extends FilePemStore<TlsMaterial> {
  constructor(dir: string) {
    super(dir, TLS_LAYOUT);
  }
}

/** The subset of the Kubernetes API the Secret store needs (CoreV1Api fits). */
export interface SecretApi {
  readNamespacedSecret(p: { name: string; namespace: string }): Promise<{ data?: Record<string, string>; metadata?: { resourceVersion?: string } }>;
  createNamespacedSecret(p: { namespace: string; body: object }): Promise<unknown>;
  replaceNamespacedSecret(p: { name: string; namespace: string; body: object }): Promise<unknown>;
}

const statusOf = (err: unknown): number | undefined => (err as { code?: unknown }).code as number | undefined;

/**
 * Cluster: one Secret per set, shared by all replicas. Creation is
 * create-if-absent: the replica that loses the race (409 AlreadyExists) reads
 * and uses the winner's material.
 */
export class SecretPemStore<T extends PemSet<T>> implements PemStore<T> {
  readonly description: string;

  constructor(
    private readonly api: SecretApi,
    private readonly namespace: string,
    private readonly name: string,
    private readonly layout: PemStoreLayout<T>,
    private readonly type = 'Opaque',
  ) {
    this.description = `Secret ${namespace}/${name}`;
  }

  async load(): Promise<T | undefined> {
    try {
      const s = await this.api.readNamespacedSecret({ name: this.name, namespace: this.namespace });
      const d = s.data ?? {};
      const out: Record<string, string> = {};
      for (const [k, f] of Object.entries(this.layout.files) as [string, string][]) out[k] = Buffer.from(d[f] ?? '', 'base64').toString('utf8');
      return out as T;
    } catch (err) {
      if (statusOf(err) === 404) return undefined;
      throw new CertificateError(`cannot read ${this.description}: ${(err as Error).message}`, { cause: err });
    }
  }

  async createIfAbsent(m: T): Promise<T> {
    try {
      await this.api.createNamespacedSecret({ namespace: this.namespace, body: this.body(m) });
      return m;
    } catch (err) {
      if (statusOf(err) !== 409) throw new CertificateError(`cannot create ${this.description}: ${(err as Error).message}`, { cause: err });
      const winner = await this.load();
      if (!winner) throw new CertificateError(`${this.description} exists but cannot be read`);
      return winner;
    }
  }

  async replace(m: T): Promise<void> {
    await this.api.replaceNamespacedSecret({ name: this.name, namespace: this.namespace, body: this.body(m) });
  }

  private body(m: T): object {
    const b64 = (s: string) => Buffer.from(s).toString('base64');
    const data: Record<string, string> = {};
    for (const [k, f] of Object.entries(this.layout.files) as [keyof T & string, string][]) data[f] = b64(m[k]);
    return { apiVersion: 'v1', kind: 'Secret', metadata: { name: this.name, namespace: this.namespace }, type: this.type, data };
  }
}

/** Cluster: the controller's CA and serving certificate in one Secret (type kubernetes.io/tls plus ca.crt/ca.key). */
export class SecretCertStore extends SecretPemStore<TlsMaterial> {
  constructor(api: SecretApi, namespace: string, name = 'fsm-node-controller-tls') {
    super(api, namespace, name, TLS_LAYOUT, 'kubernetes.io/tls');
  }
}

/** The subset of the Kubernetes API publishCa needs (CoreV1Api fits). */
export interface ConfigMapApi {
  readNamespacedConfigMap(p: { name: string; namespace: string }): Promise<{ data?: Record<string, string> }>;
  createNamespacedConfigMap(p: { namespace: string; body: object }): Promise<unknown>;
  replaceNamespacedConfigMap(p: { name: string; namespace: string; body: object }): Promise<unknown>;
}

/**
 * Publish the CA certificate (public) in a ConfigMap the agent DaemonSet
 * mounts: agents must never see the Secret, which holds the CA key.
 */
export async function publishCa(api: ConfigMapApi, namespace: string, caCert: string, name = 'fsm-node-controller-ca'): Promise<void> {
  const body = { apiVersion: 'v1', kind: 'ConfigMap', metadata: { name, namespace }, data: { 'ca.crt': caCert } };
  try {
    const cur = await api.readNamespacedConfigMap({ name, namespace });
    if (cur.data?.['ca.crt'] !== caCert) await api.replaceNamespacedConfigMap({ name, namespace, body });
  } catch (err) {
    if (statusOf(err) !== 404) throw new CertificateError(`cannot publish ConfigMap ${namespace}/${name}: ${(err as Error).message}`, { cause: err });
    try {
      await api.createNamespacedConfigMap({ namespace, body });
    } catch (e) {
      if (statusOf(e) !== 409) throw new CertificateError(`cannot create ConfigMap ${namespace}/${name}: ${(e as Error).message}`, { cause: e });
    }
  }
}
