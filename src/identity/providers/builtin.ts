import { errorMessage } from '../../errors.js';
import { FilePemStore, SecretPemStore, type PemStore, type PemStoreLayout, type SecretApi } from '../../controller/certs.js';
import { logger } from '../../util/log.js';
import { ProviderError, type CertificateProvider, type IssuedCertificate, type IssueRequest } from '../provider.js';
import { createRoot, loadSigner, parseCertificate, signLeaf, splitPem, verifyChain, type CaSigner } from '../x509.js';

const log = logger('identity-builtin-ca');

/**
 * The mesh's workload CA as kept in a store (files mesh-ca/ in the
 * controller's state directory in the lab; the Secret fsm-node-mesh-ca in a
 * cluster). The same layout serves the generated root and a CA the user
 * supplies:
 *   ca.crt     the certificate that signs workload certificates (a root or an intermediate)
 *   ca.key     its private key (PEM: PKCS#8, SEC1 or PKCS#1; EC or RSA)
 *   chain.crt  optional: the intermediates above ca.crt, nearest first (sent with every leaf)
 *   trust.crt  optional: the roots to publish; default ca.crt when it is self-signed.
 *              During a root rotation: the old root and the new one.
 * It is separate from the controller's own CA (fsm-node-controller-tls),
 * which only vouches for the controller's serving certificate to agents.
 */
export interface MeshCaMaterial {
  caCert: string;
  caKey: string;
  chain: string;
  trust: string;
}

export const MESH_CA_LAYOUT: PemStoreLayout<MeshCaMaterial> = {
  files: { caCert: 'ca.crt', caKey: 'ca.key', chain: 'chain.crt', trust: 'trust.crt' },
  secret: ['caKey'],
  optional: ['chain', 'trust'],
};
export const MESH_CA_SECRET = 'fsm-node-mesh-ca';
export const MESH_CA_DIR = 'mesh-ca';

export const meshCaFileStore = (dir: string): PemStore<MeshCaMaterial> => new FilePemStore(dir, MESH_CA_LAYOUT);
export const meshCaSecretStore = (api: SecretApi, namespace: string, name = MESH_CA_SECRET): PemStore<MeshCaMaterial> => new SecretPemStore(api, namespace, name, MESH_CA_LAYOUT);

const YEAR = 365 * 24 * 3600_000;
export const GENERATED_ROOT_LIFETIME_MS = 10 * YEAR;

export interface BuiltinOptions {
  store: PemStore<MeshCaMaterial>;
  /** Generate a root when the store has none (default true; false: the user must supply one). */
  generate?: boolean;
  now?: () => Date;
}

interface Loaded {
  signer: CaSigner;
  bundle: string[];
  /** The stored texts this was made from, to notice edits. */
  stamp: string;
}

/**
 * The built-in CA. Loads (or generates once and stores) the signing
 * certificate and key; signs in-process. refresh() re-reads the store, so a
 * new CA or trust list dropped into the directory / Secret takes effect
 * without a restart; a broken edit is refused and the last good CA kept.
 */
export class BuiltinProvider implements CertificateProvider {
  private loaded: Loaded | undefined;
  private readonly now: () => Date;

  private constructor(private readonly o: BuiltinOptions) {
    this.now = o.now ?? (() => new Date());
  }

  static async start(o: BuiltinOptions): Promise<BuiltinProvider> {
    const p = new BuiltinProvider(o);
    let m = await o.store.load();
    if (!m || !m.caCert.trim()) {
      if (o.generate === false) throw new ProviderError('invalid', `no mesh CA in ${o.store.description} (ca.crt and ca.key) and generation is off`);
      const root = await createRoot({ commonName: 'fsm-node mesh root', lifetimeMs: GENERATED_ROOT_LIFETIME_MS, now: p.now() });
      m = await o.store.createIfAbsent({ caCert: root.certPem, caKey: root.keyPem, chain: '', trust: '' });
      log.info({ store: o.store.description }, 'generated the mesh root CA');
    }
    p.loaded = await p.load(m);
    log.info({ store: o.store.description, signer: parseCertificate(p.loaded.signer.certPem).subject, roots: p.loaded.bundle.length }, 'mesh CA ready');
    return p;
  }

  describe(): string {
    return `built-in CA (${this.o.store.description})`;
  }

  trustBundle(): string[] {
    return this.loaded!.bundle;
  }

  async issue(req: IssueRequest): Promise<IssuedCertificate> {
    const { chainPem, notAfter } = await signLeaf(req.csr ?? req.csrPem, this.loaded!.signer, { trustDomain: req.trustDomain, identity: req.identity, lifetimeMs: req.lifetimeMs, now: this.now() });
    return { certChainPem: chainPem, notAfter };
  }

  /** Re-read the store; true when the CA or the trust list changed. A bad edit is logged and the last good CA kept. */
  async refresh(): Promise<boolean> {
    try {
      const m = await this.o.store.load();
      if (!m || stampOf(m) === this.loaded!.stamp) return false;
      this.loaded = await this.load(m);
      log.info({ store: this.o.store.description, roots: this.loaded.bundle.length }, 'mesh CA changed in the store');
      return true;
    } catch (err) {
      log.error({ store: this.o.store.description, err: errorMessage(err) }, 'mesh CA in the store is unusable; keeping the previous one');
      return false;
    }
  }

  /**
   * Root rotation, step 1 (docs/security.md "Rotation"): a new root signs
   * from now on; the old roots stay in the trust list, so certificates the
   * old root signed keep verifying until they are renewed.
   */
  async rotateRoot(): Promise<void> {
    const root = await createRoot({ commonName: 'fsm-node mesh root', lifetimeMs: GENERATED_ROOT_LIFETIME_MS, now: this.now() });
    const m: MeshCaMaterial = { caCert: root.certPem, caKey: root.keyPem, chain: '', trust: [...this.loaded!.bundle, root.certPem].join('') };
    await this.o.store.replace(m);
    this.loaded = await this.load(m);
    log.info({ roots: this.loaded.bundle.length }, 'root rotated: new root signs, old roots still trusted');
  }

  /** Root rotation, step 2, once every certificate was renewed (one lifetime later): trust only the signing root. */
  async retireOldRoots(): Promise<void> {
    const cur = this.loaded!.signer;
    if (cur.parentsPem.length > 0 || !isSelfSigned(cur.certPem)) throw new ProviderError('invalid', 'the signer is an intermediate: edit trust.crt instead');
    const m: MeshCaMaterial = { caCert: cur.certPem, caKey: (await this.o.store.load())!.caKey, chain: '', trust: '' };
    await this.o.store.replace(m);
    this.loaded = await this.load(m);
  }

  private async load(m: MeshCaMaterial): Promise<Loaded> {
    const parents = splitPem(m.chain);
    const signer = await loadSigner(m.caCert, m.caKey, parents);
    const signerInfo = parseCertificate(signer.certPem, 'ca.crt');
    if (signerInfo.notAfter.getTime() <= this.now().getTime()) throw new ProviderError('invalid', `mesh CA ${signerInfo.subject} in ${this.o.store.description} expired ${signerInfo.notAfter.toISOString()}`);
    let bundle = splitPem(m.trust);
    if (bundle.length === 0) {
      if (!isSelfSigned(signer.certPem)) throw new ProviderError('invalid', `ca.crt in ${this.o.store.description} is an intermediate: trust.crt must hold the root(s)`);
      bundle = [signer.certPem];
    }
    for (const [i, r] of bundle.entries()) if (!parseCertificate(r, `trust.crt[${i}]`).isCa) throw new ProviderError('invalid', `trust.crt[${i}] in ${this.o.store.description} is not a CA certificate`);
    // What it signs must verify against what it publishes, or every peer would refuse the mesh's certificates.
    const why = await verifyChain([signer.certPem, ...parents], bundle, this.now());
    if (why) throw new ProviderError('invalid', `ca.crt in ${this.o.store.description} does not chain to trust.crt: ${why}`);
    return { signer, bundle, stamp: stampOf(m) };
  }
}

const stampOf = (m: MeshCaMaterial): string => `${m.caCert}\n${m.caKey}\n${m.chain}\n${m.trust}`;

function isSelfSigned(pem: string): boolean {
  const c = parseCertificate(pem);
  return c.subject === c.issuer;
}
