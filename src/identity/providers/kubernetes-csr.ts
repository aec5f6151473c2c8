import { X509Certificate } from 'node:crypto';
import { errorMessage } from '../../errors.js';
import { logger } from '../../util/log.js';
import { ProviderError, type CertificateProvider, type IssuedCertificate, type IssueRequest } from '../provider.js';
import { identityKey, sameIdentity } from '../spiffe.js';
import { parseCertificate, parseCsr, splitPem, verifyChain } from '../x509.js';

const log = logger('identity-k8s-csr');

/** The parts of a certificates.k8s.io/v1 CertificateSigningRequest this provider reads and writes. */
export interface CsrObject {
  metadata?: { name?: string; generateName?: string; labels?: Record<string, string> };
  spec?: { request?: string; signerName?: string; usages?: string[]; expirationSeconds?: number };
  status?: { certificate?: string; conditions?: { type?: string; status?: string; reason?: string; message?: string }[] };
}

/** The subset of the Kubernetes API the provider needs (CertificatesV1Api fits). */
export interface CsrApi {
  createCertificateSigningRequest(p: { body: CsrObject }): Promise<CsrObject>;
  readCertificateSigningRequest(p: { name: string }): Promise<CsrObject>;
  deleteCertificateSigningRequest(p: { name: string }): Promise<unknown>;
}

export interface KubernetesCsrOptions {
  api: CsrApi;
  /** e.g. "clusterissuers.cert-manager.io/mesh-ca", or a Vault-backed signer's name. */
  signerName: string;
  /** PEM roots of the signer (from a ConfigMap or file the operator provides): published and checked against. */
  trustBundle: () => string[];
  /** How long to wait for approval and the certificate (default 30 s). */
  timeoutMs?: number;
  /** Poll interval while waiting (default 250 ms). */
  pollMs?: number;
}

/** The API server refuses expirationSeconds below 600 (certificates.k8s.io/v1). */
export const MIN_EXPIRATION_SECONDS = 600;
export const CSR_LABEL = 'fsm-node.io/identity';

/**
 * An external CA behind the Kubernetes CertificateSigningRequest API
 * (docs/security.md "External CAs"): cert-manager's CSR support, a
 * Vault-backed signer, or any controller that approves and signs CSRs of a
 * signerName. Per certificate: create a CSR object with the node's PEM
 * request, the usages and expirationSeconds; poll until it is approved and
 * carries status.certificate (or is Denied/Failed, or the wait times out);
 * delete it afterwards whatever happened. The answer is checked, not
 * believed: it must name the requested identity, hold the request's public
 * key and verify against the configured trust bundle.
 */
export class KubernetesCsrProvider implements CertificateProvider {
  private readonly timeoutMs: number;
  private readonly pollMs: number;

  constructor(private readonly o: KubernetesCsrOptions) {
    this.timeoutMs = o.timeoutMs ?? 30_000;
    this.pollMs = o.pollMs ?? 250;
    if (!o.signerName.includes('/')) throw new ProviderError('invalid', `signerName ${JSON.stringify(o.signerName)} must be <domain>/<name>, e.g. clusterissuers.cert-manager.io/mesh-ca`);
  }

  describe(): string {
    return `Kubernetes CSR API, signer ${this.o.signerName}`;
  }

  trustBundle(): string[] {
    return this.o.trustBundle();
  }

  async issue(req: IssueRequest): Promise<IssuedCertificate> {
    const label = `${req.identity.namespace}.${req.identity.serviceAccount}`.slice(0, 63).replace(/[^a-z0-9]$/, 'x');
    const body: CsrObject = {
      metadata: { generateName: 'fsm-node-', labels: { [CSR_LABEL]: label } },
      spec: {
        request: Buffer.from(req.csrPem).toString('base64'),
        signerName: this.o.signerName,
        usages: ['digital signature', 'server auth', 'client auth'],
        expirationSeconds: Math.max(MIN_EXPIRATION_SECONDS, Math.ceil(req.lifetimeMs / 1000)),
      },
    };
    let created: CsrObject;
    try {
      created = await this.o.api.createCertificateSigningRequest({ body });
    } catch (err) {
      throw new ProviderError('unavailable', `cannot create a CertificateSigningRequest for ${this.o.signerName}: ${errorMessage(err)}`, { cause: err });
    }
    const name = created.metadata?.name;
    if (!name) throw new ProviderError('failed', 'the API server returned a CertificateSigningRequest without a name');
    try {
      const pem = await this.await(name);
      return await this.check(pem, req);
    } finally {
      await this.o.api.deleteCertificateSigningRequest({ name }).catch((err: unknown) => {
        log.warn({ csr: name, err: errorMessage(err) }, 'could not delete the CertificateSigningRequest');
      });
    }
  }

  /** status.certificate (PEM) once approved; ProviderError on Denied, Failed or timeout. */
  private async await(name: string): Promise<string> {
    const deadline = Date.now() + this.timeoutMs;
    for (;;) {
      let csr: CsrObject;
      try {
        csr = await this.o.api.readCertificateSigningRequest({ name });
      } catch (err) {
        throw new ProviderError('unavailable', `cannot read CertificateSigningRequest ${name}: ${errorMessage(err)}`, { cause: err });
      }
      const conds = csr.status?.conditions ?? [];
      const bad = conds.find((c) => (c.type === 'Denied' || c.type === 'Failed') && c.status !== 'False');
      if (bad) {
        throw new ProviderError(bad.type === 'Denied' ? 'denied' : 'failed', `CertificateSigningRequest ${name} for ${this.o.signerName} was ${bad.type === 'Denied' ? 'denied' : 'failed'}: ${bad.reason ?? ''}${bad.message ? ` ${bad.message}` : ''}`.trim());
      }
      const approved = conds.some((c) => c.type === 'Approved' && c.status !== 'False');
      if (approved && csr.status?.certificate) return Buffer.from(csr.status.certificate, 'base64').toString('utf8');
      if (Date.now() >= deadline) {
        throw new ProviderError('timeout', `CertificateSigningRequest ${name} for ${this.o.signerName} was ${approved ? 'approved but not signed' : 'not approved'} within ${this.timeoutMs} ms: is the signer running?`);
      }
      await new Promise((r) => setTimeout(r, this.pollMs));
    }
  }

  private async check(pem: string, req: IssueRequest): Promise<IssuedCertificate> {
    const chain = splitPem(pem);
    if (chain.length === 0) throw new ProviderError('failed', `signer ${this.o.signerName} returned no certificate`);
    const leaf = parseCertificate(chain[0]!, 'status.certificate');
    const want = identityKey(req.identity);
    if (!leaf.identity || !sameIdentity(leaf.identity, req.identity) || leaf.trustDomain !== req.trustDomain) {
      throw new ProviderError('failed', `signer ${this.o.signerName} returned a certificate for ${leaf.uris.join(',') || leaf.subject}, not spiffe://${req.trustDomain}/ns/${req.identity.namespace}/sa/${req.identity.serviceAccount}`);
    }
    const csr = await parseCsr(req.csrPem);
    const leafKey = new X509Certificate(chain[0]!).publicKey.export({ type: 'spki', format: 'der' });
    if (!csr.spki.equals(leafKey)) throw new ProviderError('failed', `signer ${this.o.signerName} returned a certificate for ${want} with another public key than the request's`);
    const why = await verifyChain(chain, this.trustBundle());
    if (why) throw new ProviderError('failed', `the certificate signer ${this.o.signerName} returned for ${want} does not verify against the configured trust bundle: ${why}`);
    return { certChainPem: chain, notAfter: leaf.notAfter };
  }
}
