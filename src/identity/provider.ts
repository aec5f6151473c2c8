import { FsmNodeError } from '../errors.js';
import type { WorkloadIdentity } from './spiffe.js';
import type { ParsedCsr } from './x509.js';

/**
 * One interface for every certificate authority the controller can use
 * (docs/security.md "Issuing"): the built-in CA (providers/builtin.ts) and
 * any external CA behind the Kubernetes CSR API (providers/kubernetes-csr.ts).
 * The controller has checked the request (the CSR names exactly `identity`
 * with a P-256 key, and the node may hold that identity) before it asks.
 */
export interface IssueRequest {
  /** PEM PKCS#10 request, made and signed on the node (the key never leaves it). */
  csrPem: string;
  /** The same request parsed, its signature verified, when the caller has done that already (saves doing it twice). */
  csr?: ParsedCsr;
  identity: WorkloadIdentity;
  trustDomain: string;
  lifetimeMs: number;
}

export interface IssuedCertificate {
  /** Leaf first, then any intermediates (not the root). */
  certChainPem: string[];
  notAfter: Date;
}

export interface CertificateProvider {
  issue(req: IssueRequest): Promise<IssuedCertificate>;
  /** PEM roots peers are verified against: during a root rotation the old and the new. */
  trustBundle(): string[];
  /** For logs and status: which CA this is. */
  describe(): string;
}

/**
 * The provider could not issue. `reason` is a short stable word for metrics
 * (denied, failed, timeout, unavailable, invalid); the message says why.
 */
export class ProviderError extends FsmNodeError {
  constructor(
    readonly reason: 'denied' | 'failed' | 'timeout' | 'unavailable' | 'invalid',
    message: string,
    options?: { cause?: unknown },
  ) {
    super('FSMN_ERR_CERT_PROVIDER', message, options);
  }
}
