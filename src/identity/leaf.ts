import * as asn from '@peculiar/asn1-schema';
import * as asnX509 from '@peculiar/asn1-x509';
import { createHash, randomBytes, sign, type KeyObject } from 'node:crypto';
import type { ParsedCsr } from './csr.js';
import { encode, encoded } from './encoded.js';

/**
 * Workload leaves on the controller's hot path (docs/security.md "Issuing").
 * The certificate is put together from the ASN.1 structures of
 * @peculiar/asn1-x509 (no hand-written DER), its TBS encoded once and signed
 * by node's crypto with a KeyObject made once per CA. Everything that is the
 * same for every leaf of a CA (issuer name, signature algorithm, the constant
 * extensions, the authority key identifier) is built and encoded once in
 * leafIssuer() and copied in as bytes (encoded.ts); so is the public key,
 * as the request carried it, and the signed TBS into the certificate.
 * The higher-level X509CertificateGenerator re-parses each extension and
 * the finished certificate and signs through a WebCrypto job: about 4 ms a
 * certificate, against well under 1 ms here (bench/identity-issue.ts).
 */

/** What signing a leaf needs of its CA, prepared once per CA. */
export interface LeafIssuer {
  /** The CA certificate's subject, which becomes each leaf's issuer (encoded once). */
  name: asnX509.Name;
  key: KeyObject;
  /** The signature algorithm (encoded once). */
  algorithm: asnX509.AlgorithmIdentifier;
  /** node's digest name for sign(); null for keys that bring their own (Ed25519). */
  hash: string | null;
  /** basicConstraints, keyUsage, extKeyUsage, authorityKeyIdentifier (each encoded once). */
  extensions: asnX509.Extension[];
}

const OID = {
  ecdsaSha256: '1.2.840.10045.4.3.2',
  ecdsaSha384: '1.2.840.10045.4.3.3',
  ecdsaSha512: '1.2.840.10045.4.3.4',
  rsaSha256: '1.2.840.113549.1.1.11',
  ed25519: '1.3.101.112',
  commonName: '2.5.4.3',
};

function extension(extnID: string, critical: boolean, value: object): asnX509.Extension {
  return new asnX509.Extension({ extnID, critical, extnValue: new asn.OctetString(asn.AsnConvert.serialize(value)) });
}

/** Signature algorithm for a CA key: ECDSA with the curve's hash, RSA PKCS#1 v1.5 with SHA-256, Ed25519. */
function signatureFor(key: KeyObject): { algorithm: asnX509.AlgorithmIdentifier; hash: string | null } {
  if (key.asymmetricKeyType === 'ec') {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    const [algorithm, hash] = curve === 'secp384r1' ? [OID.ecdsaSha384, 'sha384'] : curve === 'secp521r1' ? [OID.ecdsaSha512, 'sha512'] : [OID.ecdsaSha256, 'sha256'];
    return { algorithm: new asnX509.AlgorithmIdentifier({ algorithm }), hash };
  }
  // RSA signature algorithm identifiers carry an explicit NULL parameter (RFC 4055).
  if (key.asymmetricKeyType === 'rsa') return { algorithm: new asnX509.AlgorithmIdentifier({ algorithm: OID.rsaSha256, parameters: null }), hash: 'sha256' };
  if (key.asymmetricKeyType === 'ed25519') return { algorithm: new asnX509.AlgorithmIdentifier({ algorithm: OID.ed25519 }), hash: null };
  throw new Error(`a ${key.asymmetricKeyType} key cannot sign workload certificates`);
}

/**
 * Prepare a CA (its certificate, DER, and private key) for signing leaves.
 * The authority key identifier is the CA's own subject key identifier when
 * it has one (what path builders match), else the SHA-1 of its public key.
 */
export function leafIssuer(caCertDer: Uint8Array, key: KeyObject): LeafIssuer {
  const ca = asn.AsnConvert.parse(caCertDer, asnX509.Certificate).tbsCertificate;
  const ski = ca.extensions?.find((e) => e.extnID === asnX509.id_ce_subjectKeyIdentifier);
  const keyId = ski
    ? asn.AsnConvert.parse(ski.extnValue.buffer, asnX509.SubjectKeyIdentifier).buffer
    : createHash('sha1').update(Buffer.from(ca.subjectPublicKeyInfo.subjectPublicKey)).digest();
  const { algorithm, hash } = signatureFor(key);
  return {
    name: encode(ca.subject),
    key,
    algorithm: encode(algorithm),
    hash,
    extensions: [
      extension(asnX509.id_ce_basicConstraints, true, new asnX509.BasicConstraints({ cA: false })),
      extension(asnX509.id_ce_keyUsage, true, new asnX509.KeyUsage(asnX509.KeyUsageFlags.digitalSignature)),
      extension(asnX509.id_ce_extKeyUsage, false, new asnX509.ExtendedKeyUsage([asnX509.id_kp_serverAuth, asnX509.id_kp_clientAuth])),
      extension(asnX509.id_ce_authorityKeyIdentifier, false, new asnX509.AuthorityKeyIdentifier({ keyIdentifier: new asnX509.KeyIdentifier(keyId) })),
    ].map((e) => encode<asnX509.Extension>(e)),
  };
}

export interface LeafContent {
  /** CN and DNS SAN (the Pipy-readable identity). */
  dnsName: string;
  /** URI SAN (the SPIFFE ID). */
  uri: string;
  notBefore: Date;
  notAfter: Date;
}

/** A positive 127-bit serial without a leading zero byte. */
function serial(): ArrayBuffer {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x01;
  return b.buffer.slice(b.byteOffset, b.byteOffset + b.length);
}

function pem(der: Uint8Array, label: string): string {
  const b64 = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n');
  return `-----BEGIN ${label}-----\n${b64}${b64.endsWith('\n') ? '' : '\n'}-----END ${label}-----\n`;
}

/**
 * The leaf for the key of `csr` (whose signature the caller has verified),
 * signed by `issuer`, as PEM. Names come from `content`, never the request.
 */
export function signLeafCertificate(issuer: LeafIssuer, csr: Pick<ParsedCsr, 'spki'>, content: LeafContent): string {
  const cn = new asnX509.AttributeTypeAndValue({ type: OID.commonName, value: new asnX509.AttributeValue({ utf8String: content.dnsName }) });
  const tbs = new asnX509.TBSCertificate({
    version: asnX509.Version.v3,
    serialNumber: serial(),
    signature: issuer.algorithm,
    issuer: issuer.name,
    validity: new asnX509.Validity({ notBefore: content.notBefore, notAfter: content.notAfter }),
    subject: new asnX509.Name([new asnX509.RelativeDistinguishedName([cn])]),
    // The key as the request carried it (its signature verified with exactly these bytes).
    subjectPublicKeyInfo: encoded(csr.spki),
    extensions: new asnX509.Extensions([
      ...issuer.extensions,
      extension(asnX509.id_ce_subjectAltName, false, new asnX509.SubjectAlternativeName([new asnX509.GeneralName({ dNSName: content.dnsName }), new asnX509.GeneralName({ uniformResourceIdentifier: content.uri })])),
      // SHA-1 of the whole SubjectPublicKeyInfo (RFC 7093 allows any stable method).
      extension(asnX509.id_ce_subjectKeyIdentifier, false, new asnX509.SubjectKeyIdentifier(createHash('sha1').update(csr.spki).digest())),
    ]),
  });
  // Encode the TBS once: its DER is what is signed, and the same bytes go into the certificate.
  const tbsDer = asn.AsnConvert.serialize(tbs);
  const signature = sign(issuer.hash, new Uint8Array(tbsDer), { key: issuer.key, dsaEncoding: 'der' });
  const cert = new asnX509.Certificate({ tbsCertificate: encoded(tbsDer), signatureAlgorithm: issuer.algorithm, signatureValue: signature.buffer.slice(signature.byteOffset, signature.byteOffset + signature.length) as ArrayBuffer });
  return pem(new Uint8Array(asn.AsnConvert.serialize(cert)), 'CERTIFICATE');
}
