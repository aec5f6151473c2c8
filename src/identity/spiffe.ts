import { InvalidInputError } from '../errors.js';

/**
 * Workload identity names (docs/security.md "Identity model"). A mesh pod's
 * identity is its Kubernetes service account. It is written three ways in a
 * certificate:
 *   - URI SAN  spiffe://<trust domain>/ns/<namespace>/sa/<service account>
 *     (the SPIFFE ID: what other meshes and tools understand);
 *   - DNS SAN  <service account>.<namespace>.sa.<trust domain>
 *   - subject CN, the same text as the DNS SAN.
 * Pipy 1.5 exposes only the subject and the DNS SANs of a peer certificate
 * to PipyJS, so the proxy reads the DNS SAN (or CN); the issuer writes all
 * three from one identity, so they never disagree.
 *
 * The DNS form parses back unambiguously because the trust domain is known
 * and a namespace is a single DNS label: strip ".sa.<td>", the last label is
 * the namespace, the rest (which may contain dots) the service account.
 */

export interface WorkloadIdentity {
  namespace: string;
  serviceAccount: string;
}

export const DEFAULT_TRUST_DOMAIN = 'cluster.local';

const LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const MAX_DNS_NAME = 253;

function isSubdomain(s: string): boolean {
  return s.length > 0 && s.length <= MAX_DNS_NAME && s.split('.').every((l) => LABEL.test(l));
}

/**
 * A trust domain usable in both the SPIFFE ID and the DNS SAN: lower-case DNS
 * labels (SPIFFE also allows "_", which a DNS name cannot carry, so it is refused).
 */
export function validateTrustDomain(td: string, field = 'trustDomain'): string {
  if (typeof td !== 'string' || !isSubdomain(td)) {
    throw new InvalidInputError(field, td, 'must be lower-case DNS labels (a-z, 0-9, "-") separated by dots, at most 253 characters');
  }
  return td;
}

/** A namespace (RFC 1123 label) and service account (RFC 1123 subdomain), as Kubernetes allows them. */
export function validateIdentity(id: WorkloadIdentity, field = 'identity'): WorkloadIdentity {
  if (typeof id?.namespace !== 'string' || !LABEL.test(id.namespace)) {
    throw new InvalidInputError(`${field}.namespace`, id?.namespace, 'must be a Kubernetes namespace name (a DNS label of at most 63 characters)');
  }
  if (typeof id.serviceAccount !== 'string' || !isSubdomain(id.serviceAccount)) {
    throw new InvalidInputError(`${field}.serviceAccount`, id.serviceAccount, 'must be a Kubernetes service account name (a DNS subdomain)');
  }
  return { namespace: id.namespace, serviceAccount: id.serviceAccount };
}

/** "ns/sa": the key identities go by in maps, logs and metric labels. */
export function identityKey(id: WorkloadIdentity): string {
  return `${id.namespace}/${id.serviceAccount}`;
}

export function sameIdentity(a: WorkloadIdentity, b: WorkloadIdentity): boolean {
  return a.namespace === b.namespace && a.serviceAccount === b.serviceAccount;
}

export function spiffeId(trustDomain: string, id: WorkloadIdentity): string {
  validateTrustDomain(trustDomain);
  validateIdentity(id);
  return `spiffe://${trustDomain}/ns/${id.namespace}/sa/${id.serviceAccount}`;
}

/** The SPIFFE ID's parts; strict: exactly spiffe://<td>/ns/<ns>/sa/<sa>, and `trustDomain` when given must match. */
export function parseSpiffeId(uri: string, trustDomain?: string, field = 'spiffeId'): { trustDomain: string; identity: WorkloadIdentity } {
  const m = typeof uri === 'string' ? /^spiffe:\/\/([^/]+)\/ns\/([^/]+)\/sa\/([^/]+)$/.exec(uri) : null;
  if (!m) throw new InvalidInputError(field, uri, 'is not a workload SPIFFE ID spiffe://<trust domain>/ns/<namespace>/sa/<service account>');
  const td = validateTrustDomain(m[1]!, `${field} trust domain`);
  if (trustDomain !== undefined && td !== trustDomain) throw new InvalidInputError(field, uri, `belongs to trust domain ${td}, not ${trustDomain}`);
  return { trustDomain: td, identity: validateIdentity({ namespace: m[2]!, serviceAccount: m[3]! }, field) };
}

/** "<sa>.<ns>.sa.<td>": the DNS SAN and subject CN Pipy can read. */
export function identityDnsName(trustDomain: string, id: WorkloadIdentity): string {
  validateTrustDomain(trustDomain);
  validateIdentity(id);
  const name = `${id.serviceAccount}.${id.namespace}.sa.${trustDomain}`;
  if (name.length > MAX_DNS_NAME) {
    throw new InvalidInputError('identity', identityKey(id), `its DNS name ${name.slice(0, 40)}... is longer than ${MAX_DNS_NAME} characters with trust domain ${trustDomain}`);
  }
  return name;
}

/** The identity a DNS SAN (or CN) of the form <sa>.<ns>.sa.<td> names. */
export function parseIdentityDnsName(name: string, trustDomain: string, field = 'dnsName'): WorkloadIdentity {
  const suffix = `.sa.${validateTrustDomain(trustDomain)}`;
  if (typeof name !== 'string' || !name.endsWith(suffix)) throw new InvalidInputError(field, name, `does not end in ${suffix}`);
  const head = name.slice(0, -suffix.length);
  const dot = head.lastIndexOf('.');
  if (dot <= 0) throw new InvalidInputError(field, name, `is not <service account>.<namespace>${suffix}`);
  return validateIdentity({ namespace: head.slice(dot + 1), serviceAccount: head.slice(0, dot) }, field);
}
