import { X509Certificate } from 'node:crypto';
import { InvalidInputError } from '../errors.js';
import { parseSpiffeId, type WorkloadIdentity } from '../identity/spiffe.js';
import { createCsr, createIntermediate, createRoot, generateKeyPair, loadSigner, privateKeyToPem, signLeaf } from '../identity/x509.js';
import { clusterTrustDomain } from './api.js';

/**
 * Cluster identities. A clusterset has one CA (its root key stays with
 * whoever set the clusterset up, never on a cluster); each cluster's
 * controller holds a certificate from it naming the controller's SPIFFE ID in
 * that cluster's own trust domain:
 *
 *   spiffe://<clusterId>.cluster.local/ns/fsm-system/sa/fsm-node-controller
 *
 * Peers authenticate each other with these certificates (mutual TLS, both
 * ways) and the cluster id is read from the trust domain the certificate
 * proves, never from anything the peer says.
 */

export const CONTROLLER_IDENTITY: WorkloadIdentity = { namespace: 'fsm-system', serviceAccount: 'fsm-node-controller' };

/**
 * The identity every node proxy of a clusterset member presents on its
 * gateway listener (and expects of another cluster's gateway): issued by the
 * cluster's own mesh CA like any workload identity, in the cluster's trust
 * domain. Inside the cluster it also vouches for the source of a tunnel it
 * forwards from another cluster (docs/security.md, "Across clusters").
 */
export const GATEWAY_IDENTITY: WorkloadIdentity = { namespace: 'fsm-system', serviceAccount: 'fsm-node-gateway' };

/** The identities a node needs for the clusterset: the gateway's, when the policy has a multicluster part. */
export function multiclusterIdentities(policy: { multicluster?: unknown }): WorkloadIdentity[] {
  return policy.multicluster ? [GATEWAY_IDENTITY] : [];
}

const YEAR_MS = 365 * 24 * 3600_000;

/** A new clusterset CA (self-signed P-256 root), PEM. */
export function createClustersetCa(name = 'fsm-node clusterset', lifetimeMs = 10 * YEAR_MS): Promise<{ certPem: string; keyPem: string }> {
  // pathLength 1: below the root, each cluster's mesh CA (issueMeshCa) signs that cluster's workloads.
  return createRoot({ commonName: name, lifetimeMs, pathLength: 1 });
}

/**
 * A cluster's mesh CA: an intermediate under the clusterset CA, name
 * constrained to the cluster's trust domain (DNS and URI subtrees
 * "<id>.cluster.local"), so the clusterset trusts what it signs for that
 * cluster and nothing else: a certificate it signs for another cluster's
 * trust domain fails chain verification everywhere (RFC 5280 4.2.1.10,
 * enforced by OpenSSL in every proxy). Use it as the cluster's built-in
 * identity provider CA (docs/multicluster.md).
 */
export async function issueMeshCa(ca: { certPem: string; keyPem: string }, clusterId: string, lifetimeMs = 5 * YEAR_MS): Promise<{ certPem: string; keyPem: string }> {
  const signer = await loadSigner(ca.certPem, ca.keyPem);
  return createIntermediate(signer, { commonName: `fsm-node mesh CA ${clusterId}`, lifetimeMs, pathLength: 0, permittedDomain: clusterTrustDomain(clusterId) });
}

/** A cluster's identity, signed by the clusterset CA. */
export async function issueClusterIdentity(ca: { certPem: string; keyPem: string }, clusterId: string, lifetimeMs = YEAR_MS): Promise<{ certPem: string; keyPem: string }> {
  const signer = await loadSigner(ca.certPem, ca.keyPem);
  const keys = await generateKeyPair();
  const trustDomain = clusterTrustDomain(clusterId);
  const csr = await createCsr(keys, trustDomain, CONTROLLER_IDENTITY);
  const { chainPem } = await signLeaf(csr, signer, { trustDomain, identity: CONTROLLER_IDENTITY, lifetimeMs });
  return { certPem: chainPem.join(''), keyPem: await privateKeyToPem(keys.privateKey) };
}

/**
 * The cluster a verified peer certificate (DER, as node's TLS hands it over)
 * belongs to, among `known` cluster ids; undefined when it names no cluster
 * controller or a cluster we do not peer with. The chain was verified by the
 * TLS layer against the clusterset CA.
 */
export function peerClusterOf(der: Buffer | undefined, known: Iterable<string>): string | undefined {
  if (!der || der.length === 0) return undefined;
  let uri: string | undefined;
  try {
    const cert = new X509Certificate(der);
    uri = cert.subjectAltName
      ?.split(/,\s*/)
      .find((n) => n.startsWith('URI:spiffe://'))
      ?.slice(4);
  } catch {
    return undefined;
  }
  if (!uri) return undefined;
  let parsed;
  try {
    parsed = parseSpiffeId(uri);
  } catch (err) {
    if (err instanceof InvalidInputError) return undefined;
    throw err;
  }
  if (parsed.identity.namespace !== CONTROLLER_IDENTITY.namespace || parsed.identity.serviceAccount !== CONTROLLER_IDENTITY.serviceAccount) return undefined;
  for (const id of known) if (clusterTrustDomain(id) === parsed.trustDomain) return id;
  return undefined;
}
