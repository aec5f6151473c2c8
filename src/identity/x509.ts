// tsyringe (used inside @peculiar/x509) needs the Reflect metadata API; this
// import must be evaluated before the library's, hence first.
import 'reflect-metadata';
import * as asn1x509 from '@peculiar/asn1-x509';
import { AsnConvert } from '@peculiar/asn1-schema';
import * as x509 from '@peculiar/x509';
import { createPrivateKey, KeyObject, randomBytes, webcrypto } from 'node:crypto';
import { FsmNodeError, InvalidInputError } from '../errors.js';
import { parseCsr, type ParsedCsr } from './csr.js';
import { leafIssuer, signLeafCertificate, type LeafIssuer } from './leaf.js';
import { identityDnsName, parseIdentityDnsName, parseSpiffeId, spiffeId, validateTrustDomain, type WorkloadIdentity } from './spiffe.js';

// The controller's hot path lives in csr.ts (reading requests) and leaf.ts (signing leaves); re-exported for callers of this module.
export { parseCsr, type ParsedCsr };

/**
 * X.509 for workload identities, over @peculiar/x509 (a maintained library on
 * WebCrypto): no hand-written ASN.1 and no openssl process per certificate, so
 * issuing is a few milliseconds of in-process signing. Everything crosses
 * this module's boundary as PEM text; keys inside are WebCrypto CryptoKeys.
 * Workload keys are ECDSA P-256; a CA key may be EC (P-256/384/521) or RSA,
 * so a user-supplied root or intermediate of either kind can sign.
 */

// WebCrypto types by name (the project's lib has no DOM, whose globals these are).
type Crypto = webcrypto.Crypto;
type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;
type Algorithm = webcrypto.Algorithm;
type EcdsaParams = webcrypto.EcdsaParams;
type EcKeyImportParams = webcrypto.EcKeyImportParams;
type RsaHashedImportParams = webcrypto.RsaHashedImportParams;

const crypto: Crypto = webcrypto;
x509.cryptoProvider.set(crypto as never);

export class X509Error extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('FSMN_ERR_X509', message, options);
  }
}

export const DEFAULT_SKEW_MS = 5 * 60_000;
const P256 = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const ECDSA_SHA256 = { name: 'ECDSA', hash: 'SHA-256' } as const;

export type KeyPair = CryptoKeyPair;

/** A fresh ECDSA P-256 key pair (extractable: the agent writes the private key to its state directory). */
export async function generateKeyPair(): Promise<KeyPair> {
  return (await crypto.subtle.generateKey(P256, true, ['sign', 'verify'])) as CryptoKeyPair;
}

/** PKCS#8 PEM ("PRIVATE KEY") of a private key. */
export async function privateKeyToPem(key: CryptoKey): Promise<string> {
  const der = Buffer.from(await crypto.subtle.exportKey('pkcs8', key));
  return x509.PemConverter.encode(der, 'PRIVATE KEY') + '\n';
}

/** Signing algorithm and import parameters for a private key of any kind node can read (PKCS#8, SEC1 or PKCS#1 PEM). */
function keyAlgorithms(pem: string): { importAlg: EcKeyImportParams | RsaHashedImportParams; signAlg: Algorithm | EcdsaParams; der: Buffer } {
  let k;
  try {
    k = createPrivateKey(pem);
  } catch (err) {
    throw new InvalidInputError('privateKey', '(PEM text)', `cannot be read: ${(err as Error).message}`);
  }
  const der = k.export({ type: 'pkcs8', format: 'der' });
  if (k.asymmetricKeyType === 'ec') {
    const curve = ({ prime256v1: 'P-256', secp384r1: 'P-384', secp521r1: 'P-521' } as Record<string, string>)[k.asymmetricKeyDetails?.namedCurve ?? ''];
    if (!curve) throw new InvalidInputError('privateKey', k.asymmetricKeyDetails?.namedCurve, 'is an EC key on a curve other than P-256, P-384 or P-521');
    const hash = curve === 'P-256' ? 'SHA-256' : curve === 'P-384' ? 'SHA-384' : 'SHA-512';
    return { importAlg: { name: 'ECDSA', namedCurve: curve }, signAlg: { name: 'ECDSA', hash }, der };
  }
  if (k.asymmetricKeyType === 'rsa') {
    return { importAlg: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, signAlg: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, der };
  }
  throw new InvalidInputError('privateKey', k.asymmetricKeyType, 'must be an EC or RSA key');
}

/** A private key from PEM, with the signature algorithm it signs with. */
export async function importPrivateKey(pem: string): Promise<{ key: CryptoKey; signingAlgorithm: Algorithm | EcdsaParams }> {
  const a = keyAlgorithms(pem);
  return { key: await crypto.subtle.importKey('pkcs8', a.der, a.importAlg, false, ['sign']), signingAlgorithm: a.signAlg };
}

/** PEM blocks of a text holding one or more certificates, in order. */
export function splitPem(text: string): string[] {
  return text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g)?.map((b) => `${b}\n`) ?? [];
}

// Extensions are looked up by OID: lookup by class breaks when the library is
// loaded twice (CommonJS and ESM copies, as under jest), the OID never does.
const OID_SAN = '2.5.29.17';
const OID_BASIC = '2.5.29.19';
const basic = (c: x509.X509Certificate) => c.getExtension(OID_BASIC) as x509.BasicConstraintsExtension | null;

function serial(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x01; // positive and without a leading zero byte
  return b.toString('hex');
}

function certFromPem(pem: string, field: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(pem);
  } catch (err) {
    throw new InvalidInputError(field, '(PEM text)', `is not an X.509 certificate: ${(err as Error).message}`);
  }
}

// ---- CSR ---------------------------------------------------------------------

/** A PKCS#10 request for `identity`: CN and DNS SAN in the Pipy-readable form, URI SAN the SPIFFE ID. */
export async function createCsr(keys: KeyPair, trustDomain: string, identity: WorkloadIdentity): Promise<string> {
  const dns = identityDnsName(trustDomain, identity);
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    name: [{ CN: [dns] }],
    keys,
    signingAlgorithm: ECDSA_SHA256,
    extensions: [
      new x509.SubjectAlternativeNameExtension([
        { type: 'dns', value: dns },
        { type: 'url', value: spiffeId(trustDomain, identity) },
      ]),
    ],
  });
  return csr.toString('pem') + '\n';
}

function describeKey(alg: Algorithm): string {
  const a = alg as Algorithm & { namedCurve?: string; modulusLength?: number };
  if (a.name === 'ECDSA' || a.name === 'ECDH') return `ECDSA ${a.namedCurve ?? '?'}`;
  if (a.modulusLength) return `RSA ${a.modulusLength}`;
  return a.name;
}

// ---- signing -------------------------------------------------------------------

/** A CA that signs: its certificate, its key, and the chain from it up to (not including) the root. */
export interface CaSigner {
  certPem: string;
  key: CryptoKey;
  signingAlgorithm: Algorithm | EcdsaParams;
  /** Intermediates above `certPem`, nearest first (empty for a root). */
  parentsPem: string[];
  /** Parsed once, not per certificate signed. */
  readonly prepared?: PreparedCa;
}

interface PreparedCa {
  subject: string;
  notBefore: Date;
  notAfter: Date;
  selfSigned: boolean;
  leaf: LeafIssuer;
}

function prepare(ca: CaSigner, keyObject?: KeyObject): PreparedCa {
  if (ca.prepared) return ca.prepared;
  const cert = certFromPem(ca.certPem, 'ca.crt');
  return {
    subject: cert.subject,
    notBefore: cert.notBefore,
    notAfter: cert.notAfter,
    selfSigned: cert.subject === cert.issuer,
    leaf: leafIssuer(new Uint8Array(cert.rawData), keyObject ?? KeyObject.from(ca.key)),
  };
}

/** A signer from PEM certificate + key (+ the certificates above it). Checks that the key matches and the cert is a CA. */
export async function loadSigner(certPem: string, keyPem: string, parentsPem: string[] = []): Promise<CaSigner> {
  const cert = certFromPem(certPem, 'ca.crt');
  const bc = basic(cert);
  if (!bc?.ca) throw new InvalidInputError('ca.crt', cert.subject, 'is not a CA certificate (basicConstraints CA:TRUE is missing)');
  const { key, signingAlgorithm } = await importPrivateKey(keyPem);
  // Prove the pair: sign a probe and verify it with the certificate's public key.
  const probe = randomBytes(32);
  const sigAlg = signingAlgorithm.name === 'ECDSA' ? signingAlgorithm : { name: signingAlgorithm.name };
  const sig = await crypto.subtle.sign(sigAlg, key, probe);
  const matches = await cert.publicKey
    .export(crypto)
    .then((pub) => crypto.subtle.verify(sigAlg, pub, sig, probe))
    .catch(() => false); // a key of another kind than the certificate's
  if (!matches) throw new InvalidInputError('ca.key', '(PEM text)', `does not belong to certificate ${cert.subject}`);
  const signer: CaSigner = { certPem: cert.toString('pem') + '\n', key, signingAlgorithm, parentsPem };
  // node's KeyObject for signing leaves: made once here, not per certificate.
  return { ...signer, prepared: prepare(signer, createPrivateKey(keyPem)) };
}

export interface LeafOptions {
  trustDomain: string;
  identity: WorkloadIdentity;
  lifetimeMs: number;
  /** How far notBefore is set back, for clocks that lag the issuer's. Default 5 min. */
  skewMs?: number;
  now?: Date;
}

/**
 * A workload leaf for the public key in `csrPem`, signed by `ca`. The names
 * come from `identity`, never from the request (the caller has checked the
 * request names the same identity). Never outlives the CA's certificate.
 */
export async function signLeaf(csrIn: string | ParsedCsr, ca: CaSigner, o: LeafOptions): Promise<{ certPem: string; chainPem: string[]; notAfter: Date }> {
  const csr = typeof csrIn === 'string' ? await parseCsr(csrIn) : csrIn;
  if (!csr.signatureValid) throw new InvalidInputError('csr', '(PEM text)', 'its signature does not verify (not signed by the key it carries)');
  const p = prepare(ca);
  const now = o.now ?? new Date();
  const notBefore = new Date(Math.max(now.getTime() - (o.skewMs ?? DEFAULT_SKEW_MS), p.notBefore.getTime()));
  const notAfter = new Date(Math.min(now.getTime() + o.lifetimeMs, p.notAfter.getTime()));
  if (notAfter.getTime() <= now.getTime()) throw new X509Error(`the signing CA ${p.subject} has expired (${p.notAfter.toISOString()})`);
  const certPem = signLeafCertificate(p.leaf, csr, { dnsName: identityDnsName(o.trustDomain, o.identity), uri: spiffeId(o.trustDomain, o.identity), notBefore, notAfter });
  // X.509 times have whole seconds: report the notAfter the certificate carries.
  return { certPem, chainPem: [certPem, ...(p.selfSigned ? [] : [ca.certPem]), ...ca.parentsPem], notAfter: new Date(Math.floor(notAfter.getTime() / 1000) * 1000) };
}

export interface CaOptions {
  commonName: string;
  lifetimeMs: number;
  now?: Date;
  skewMs?: number;
  /** For an intermediate: at most this many CAs below it (default 0: it signs leaves only). */
  pathLength?: number;
  /** For an intermediate: the only DNS domain and URI host its certificates may name (a critical name constraint). */
  permittedDomain?: string;
}

/** A critical NameConstraints extension permitting only `domain` (and its subdomains) as DNS name and URI host. */
function nameConstraints(domain: string): x509.Extension {
  const subtree = (name: asn1x509.GeneralName) => new asn1x509.GeneralSubtree({ base: name });
  const value = new asn1x509.NameConstraints({
    permittedSubtrees: new asn1x509.GeneralSubtrees([subtree(new asn1x509.GeneralName({ dNSName: domain })), subtree(new asn1x509.GeneralName({ uniformResourceIdentifier: domain }))]),
  });
  return new x509.Extension(asn1x509.id_ce_nameConstraints, true, AsnConvert.serialize(value));
}

async function caExtensions(keys: KeyPair, pathLength: number | undefined): Promise<x509.Extension[]> {
  return [
    new x509.BasicConstraintsExtension(true, pathLength, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
    await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
  ];
}

/** A self-signed ECDSA P-256 root: certificate and PKCS#8 key, PEM. */
export async function createRoot(o: CaOptions): Promise<{ certPem: string; keyPem: string }> {
  const keys = await generateKeyPair();
  const now = o.now ?? new Date();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: [{ CN: [o.commonName] }],
    notBefore: new Date(now.getTime() - (o.skewMs ?? DEFAULT_SKEW_MS)),
    notAfter: new Date(now.getTime() + o.lifetimeMs),
    keys,
    signingAlgorithm: ECDSA_SHA256,
    extensions: await caExtensions(keys, o.pathLength),
  });
  return { certPem: cert.toString('pem') + '\n', keyPem: await privateKeyToPem(keys.privateKey) };
}

/** An ECDSA P-256 intermediate under `parent`. */
export async function createIntermediate(parent: CaSigner, o: CaOptions): Promise<{ certPem: string; keyPem: string }> {
  const keys = await generateKeyPair();
  const parentCert = certFromPem(parent.certPem, 'ca.crt');
  const now = o.now ?? new Date();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: [{ CN: [o.commonName] }],
    issuer: parentCert.subjectName.toString(),
    notBefore: new Date(Math.max(now.getTime() - (o.skewMs ?? DEFAULT_SKEW_MS), parentCert.notBefore.getTime())),
    notAfter: new Date(Math.min(now.getTime() + o.lifetimeMs, parentCert.notAfter.getTime())),
    publicKey: keys.publicKey,
    signingKey: parent.key,
    signingAlgorithm: parent.signingAlgorithm,
    extensions: [
      ...(await caExtensions(keys, o.pathLength ?? 0)),
      await x509.AuthorityKeyIdentifierExtension.create(parentCert.publicKey),
      ...(o.permittedDomain !== undefined ? [nameConstraints(validateTrustDomain(o.permittedDomain, 'permittedDomain'))] : []),
    ],
  });
  return { certPem: cert.toString('pem') + '\n', keyPem: await privateKeyToPem(keys.privateKey) };
}

// ---- reading and verifying -------------------------------------------------------

export interface CertificateInfo {
  subject: string;
  issuer: string;
  serialNumber: string;
  commonNames: string[];
  dnsNames: string[];
  uris: string[];
  notBefore: Date;
  notAfter: Date;
  isCa: boolean;
  keyAlgorithm: string;
  /** The workload identity the URI SAN names (undefined when there is none). */
  identity?: WorkloadIdentity;
  trustDomain?: string;
}

export function parseCertificate(pem: string, field = 'certificate'): CertificateInfo {
  const c = certFromPem(pem, field);
  const names = (c.getExtension(OID_SAN) as x509.SubjectAlternativeNameExtension | null)?.names.items ?? [];
  const uris = names.filter((n) => n.type === 'url').map((n) => n.value);
  const info: CertificateInfo = {
    subject: c.subject,
    issuer: c.issuer,
    serialNumber: c.serialNumber,
    commonNames: c.subjectName.getField('CN'),
    dnsNames: names.filter((n) => n.type === 'dns').map((n) => n.value),
    uris,
    notBefore: c.notBefore,
    notAfter: c.notAfter,
    isCa: basic(c)?.ca ?? false,
    keyAlgorithm: describeKey(c.publicKey.algorithm),
  };
  const spiffe = uris.find((u) => u.startsWith('spiffe://'));
  if (spiffe) {
    const p = parseSpiffeId(spiffe, undefined, `${field} URI SAN`);
    info.identity = p.identity;
    info.trustDomain = p.trustDomain;
  }
  return info;
}

/** Whether the Pipy-readable names (CN, DNS SAN) agree with the SPIFFE ID; the reason when not. */
export function namesDisagree(info: CertificateInfo): string | undefined {
  if (!info.identity || !info.trustDomain) return 'no SPIFFE ID in a URI SAN';
  const dns = identityDnsName(info.trustDomain, info.identity);
  if (!info.dnsNames.includes(dns)) return `DNS SAN ${dns} missing`;
  for (const d of info.dnsNames) parseIdentityDnsName(d, info.trustDomain, 'DNS SAN');
  if (info.commonNames.some((cn) => cn !== dns)) return `CN ${info.commonNames.join(',')} is not ${dns}`;
  return undefined;
}

/**
 * Verify `chainPem` (leaf first, then intermediates) against the roots of
 * `bundlePem` at `now`: every signature, every validity window, CA flags on
 * the issuers. Returns the reason it fails, or undefined when it holds.
 */
export async function verifyChain(chainPem: string[], bundlePem: string[], now = new Date()): Promise<string | undefined> {
  if (chainPem.length === 0) return 'empty chain';
  if (bundlePem.length === 0) return 'empty trust bundle';
  const chain = chainPem.map((p, i) => certFromPem(p, `chain[${i}]`));
  const roots = bundlePem.map((p, i) => certFromPem(p, `bundle[${i}]`));
  const inWindow = (c: x509.X509Certificate) => c.notBefore.getTime() <= now.getTime() && now.getTime() <= c.notAfter.getTime();
  for (let i = 0; i < chain.length; i++) {
    const c = chain[i]!;
    if (!inWindow(c)) return `chain[${i}] ${c.subject} is not valid at ${now.toISOString()} (${c.notBefore.toISOString()} .. ${c.notAfter.toISOString()})`;
    if (roots.some((r) => r.equal(c))) return undefined; // reached a trusted certificate itself
    const issuer = chain[i + 1];
    if (issuer) {
      if (!basic(issuer)?.ca) return `chain[${i + 1}] ${issuer.subject} is not a CA`;
      if (issuer.subject !== c.issuer || !(await c.verify({ publicKey: issuer, signatureOnly: true }).catch(() => false))) {
        return `chain[${i}] ${c.subject} is not signed by chain[${i + 1}] ${issuer.subject}`;
      }
      continue;
    }
    for (const r of roots) {
      if (r.subject !== c.issuer || !inWindow(r) || !basic(r)?.ca) continue;
      if (await c.verify({ publicKey: r, signatureOnly: true }).catch(() => false)) return undefined;
    }
    return `chain[${i}] ${c.subject} (issuer ${c.issuer}) is not signed by any root in the trust bundle`;
  }
  return 'no trusted certificate in the chain';
}
