import * as asn from '@peculiar/asn1-schema';
import * as asnCsr from '@peculiar/asn1-csr';
import * as asnX509 from '@peculiar/asn1-x509';
import * as asn1js from 'asn1js';
import { createPublicKey, verify, type KeyObject } from 'node:crypto';
import { InvalidInputError } from '../errors.js';

/**
 * Reading a node's PKCS#10 request on the controller's hot path (one request
 * per identity and renewal). The request is decoded once by
 * @peculiar/asn1-schema (no hand-written ASN.1) and its signature checked by
 * node's crypto, synchronously, on the original bytes of
 * certificationRequestInfo. The higher-level @peculiar/x509 request class
 * decodes the same bytes several times over (extensions, public key, the
 * re-encoded TBS for its WebCrypto verify), which made up most of the
 * controller's cost per certificate (bench/identity-issue.ts).
 *
 * The request is decoded into a view of RFC 2986's CertificationRequest
 * (CsrView below, declared with the library's own schema decorators, as
 * @peculiar/asn1-csr declares the full one) that also keeps the
 * SubjectPublicKeyInfo's DER as sent: the certificate certifies those bytes,
 * so encoding the decoded key again was work for nothing. A P-256 key is
 * imported into node's crypto from its point (as a JWK), which skips
 * OpenSSL 3's generic key decoder (about 40 % of the import) and the key
 * detail lookup; any other key goes through the DER and is described (and
 * refused) by what node reads.
 */

class CsrInfoView {
  version = 0;
  subject = new asnX509.Name();
  subjectPKInfo = new asnX509.SubjectPublicKeyInfo();
  /** Filled by the parser (raw: true): the SubjectPublicKeyInfo's DER as sent. */
  subjectPKInfoRaw?: Uint8Array;
  attributes = new asnCsr.Attributes();
}
asn.AsnProp({ type: asn.AsnPropTypes.Integer })(CsrInfoView.prototype, 'version');
asn.AsnProp({ type: asnX509.Name })(CsrInfoView.prototype, 'subject');
asn.AsnProp({ type: asnX509.SubjectPublicKeyInfo, raw: true })(CsrInfoView.prototype, 'subjectPKInfo');
asn.AsnProp({ type: asnCsr.Attributes, implicit: true, context: 0, optional: true })(CsrInfoView.prototype, 'attributes');

class CsrView {
  info = new CsrInfoView();
  /** Filled by the parser (raw: true): the signed bytes as sent. */
  infoRaw?: Uint8Array;
  signatureAlgorithm = new asnX509.AlgorithmIdentifier();
  signature: ArrayBuffer = new ArrayBuffer(0);
}
asn.AsnProp({ type: CsrInfoView, raw: true })(CsrView.prototype, 'info');
asn.AsnProp({ type: asnX509.AlgorithmIdentifier })(CsrView.prototype, 'signatureAlgorithm');
asn.AsnProp({ type: asn.AsnPropTypes.BitString })(CsrView.prototype, 'signature');

export interface ParsedCsr {
  commonNames: string[];
  dnsNames: string[];
  uris: string[];
  /** Other SAN kinds present (ip, email, ...): a workload CSR must have none. */
  otherNames: string[];
  /** e.g. "ECDSA P-256", "RSA 2048". */
  keyAlgorithm: string;
  signatureValid: boolean;
  /** SubjectPublicKeyInfo, DER as the request carries it: what the certificate certifies. */
  spki: Buffer;
}

const OID_CN = '2.5.4.3';
const OID_EXTENSION_REQUEST = '1.2.840.113549.1.9.14';
const OID_SAN = '2.5.29.17';

/** Signature algorithms a request may be signed with -> node's digest name (null: the key's own, Ed25519). */
const SIGNATURE_HASH: Record<string, string | null> = {
  '1.2.840.10045.4.3.2': 'sha256', // ecdsa-with-SHA256
  '1.2.840.10045.4.3.3': 'sha384',
  '1.2.840.10045.4.3.4': 'sha512',
  '1.2.840.113549.1.1.11': 'sha256', // sha256WithRSAEncryption
  '1.2.840.113549.1.1.12': 'sha384',
  '1.2.840.113549.1.1.13': 'sha512',
  '1.3.101.112': null, // Ed25519
};

const CURVE_NAME: Record<string, string> = { prime256v1: 'P-256', secp384r1: 'P-384', secp521r1: 'P-521' };

/** "ECDSA P-256", "RSA 2048", "Ed25519", ... of a node KeyObject. */
export function describeKeyObject(k: KeyObject): string {
  const d = k.asymmetricKeyDetails ?? {};
  if (k.asymmetricKeyType === 'ec') return `ECDSA ${CURVE_NAME[d.namedCurve ?? ''] ?? d.namedCurve ?? '?'}`;
  if (k.asymmetricKeyType === 'rsa' || k.asymmetricKeyType === 'rsa-pss') return `RSA ${d.modulusLength ?? '?'}`;
  if (k.asymmetricKeyType === 'ed25519') return 'Ed25519';
  return k.asymmetricKeyType ?? '?';
}

/** The DER inside a PEM block with one of `labels`; undefined when there is none. */
export function pemBody(pem: string, labels: string[]): Buffer | undefined {
  for (const label of labels) {
    const m = new RegExp(`-----BEGIN ${label}-----([A-Za-z0-9+/=\\s]+)-----END ${label}-----`).exec(pem);
    if (m) return Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64');
  }
  return undefined;
}

function generalNames(names: asnX509.GeneralName[], out: Pick<ParsedCsr, 'dnsNames' | 'uris' | 'otherNames'>): void {
  for (const n of names) {
    if (n.dNSName !== undefined) out.dnsNames.push(n.dNSName);
    else if (n.uniformResourceIdentifier !== undefined) out.uris.push(n.uniformResourceIdentifier);
    else if (n.iPAddress !== undefined) out.otherNames.push(`ip:${n.iPAddress}`);
    else if (n.rfc822Name !== undefined) out.otherNames.push(`email:${n.rfc822Name}`);
    else if (n.registeredID !== undefined) out.otherNames.push(`id:${n.registeredID}`);
    else out.otherNames.push(n.directoryName ? 'dn' : n.otherName ? `other:${n.otherName.typeId}` : 'other');
  }
}

const OID_EC_PUBLIC_KEY = '1.2.840.10045.2.1';
/** The namedCurve parameter of a P-256 key, as the library encodes it. */
const P256_PARAMETERS = Buffer.from(new asn1js.ObjectIdentifier({ value: '1.2.840.10045.3.1.7' }).toBER(false));

/** node's KeyObject for a request's key, and its description ("ECDSA P-256", "RSA 2048", ...). */
function importPublicKey(spki: Buffer, info: asnX509.SubjectPublicKeyInfo): { key: KeyObject; keyAlgorithm: string } {
  const params = info.algorithm.parameters;
  const point = new Uint8Array(info.subjectPublicKey);
  // An uncompressed P-256 point (SEC 1: 0x04, X, Y): what every agent sends.
  if (info.algorithm.algorithm === OID_EC_PUBLIC_KEY && params && P256_PARAMETERS.equals(new Uint8Array(params)) && point.length === 65 && point[0] === 4) {
    const coordinate = (from: number) => Buffer.from(point.buffer, point.byteOffset + from, 32).toString('base64url');
    return { key: createPublicKey({ key: { kty: 'EC', crv: 'P-256', x: coordinate(1), y: coordinate(33) }, format: 'jwk' }), keyAlgorithm: 'ECDSA P-256' };
  }
  const key = createPublicKey({ key: spki, format: 'der', type: 'spki' });
  return { key, keyAlgorithm: describeKeyObject(key) };
}

/**
 * A PEM PKCS#10 request: its names, key algorithm, and whether it is signed
 * by the key it carries. Throws InvalidInputError naming `field` when the
 * text is not a certificate request at all.
 */
export async function parseCsr(pem: string, field = 'csr'): Promise<ParsedCsr> {
  const shown = typeof pem === 'string' ? `${pem.slice(0, 40)}...` : pem;
  let req: CsrView;
  let spki: Buffer;
  let key: KeyObject;
  let keyAlgorithm: string;
  try {
    const der = typeof pem === 'string' ? pemBody(pem, ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST']) : undefined;
    if (!der) throw new Error('no -----BEGIN CERTIFICATE REQUEST----- block');
    req = asn.AsnConvert.parse(der, CsrView);
    if (!req.info.subjectPKInfoRaw) throw new Error('no subject public key');
    spki = Buffer.from(req.info.subjectPKInfoRaw);
    ({ key, keyAlgorithm } = importPublicKey(spki, req.info.subjectPKInfo));
  } catch (err) {
    throw new InvalidInputError(field, shown, `is not a PEM certificate request: ${(err as Error).message}`);
  }
  const info = req.info;
  const out: ParsedCsr = { commonNames: [], dnsNames: [], uris: [], otherNames: [], keyAlgorithm, signatureValid: false, spki };
  for (const rdn of info.subject) for (const atv of rdn) if (atv.type === OID_CN) out.commonNames.push(atv.value.toString());
  try {
    for (const attr of info.attributes) {
      if (attr.type !== OID_EXTENSION_REQUEST) continue;
      for (const v of attr.values) {
        for (const ext of asn.AsnConvert.parse(v, asnX509.Extensions)) {
          if (ext.extnID === OID_SAN) generalNames(asn.AsnConvert.parse(ext.extnValue.buffer, asnX509.SubjectAlternativeName), out);
        }
      }
    }
  } catch (err) {
    throw new InvalidInputError(`${field} extensions`, shown, `cannot be read: ${(err as Error).message}`);
  }
  const hash = SIGNATURE_HASH[req.signatureAlgorithm.algorithm];
  if (hash !== undefined && req.infoRaw) {
    try {
      // The signed bytes as sent, not a re-encoding: DER from another encoder need not round-trip.
      out.signatureValid = verify(hash, Buffer.from(req.infoRaw), { key, dsaEncoding: 'der' }, Buffer.from(req.signature));
    } catch {
      out.signatureValid = false; // a signature algorithm that does not fit the key
    }
  }
  return out;
}
