import * as asn from '@peculiar/asn1-schema';
import * as asn1js from 'asn1js';

/**
 * DER that the ASN.1 library has already produced (or parsed from what a
 * node sent), placed as it is into a structure @peculiar/asn1-schema
 * serializes. The controller issues every leaf of a CA with the same issuer
 * name, signature algorithm and four extensions, and certifies the public
 * key exactly as the node's request carries it; re-building and re-encoding
 * those ASN.1 trees for every certificate was a third of the cost of a leaf
 * (bench/identity-issue.ts). No ASN.1 is written by hand here: the bytes are
 * always the library's own encoding of its own structures (encode()) or a
 * field of a request the library decoded.
 *
 * The serializer accepts any value with toASN()/fromASN() in place of a
 * field's class (its IAsnConvertible protocol); toASN() hands it an asn1js
 * RawData that also writes itself when nested in a SEQUENCE (RawData alone
 * only answers a top-level toBER()).
 */

/** asn1js's internal writer, as Sequence.toBER passes it to its children. */
interface BerWriter {
  write(buf: ArrayBuffer): void;
}

class NestedRawData extends asn1js.RawData {
  override toBER(sizeOnly?: boolean, writer?: BerWriter): ArrayBuffer {
    const der = this.dataView.slice().buffer;
    if (!writer) return der;
    writer.write(der);
    return new ArrayBuffer(0);
  }
}

export class Encoded implements asn.IAsnConvertible<asn1js.RawData> {
  constructor(readonly der: ArrayBuffer) {}

  toASN(): asn1js.RawData {
    return new NestedRawData({ data: this.der });
  }

  fromASN(): this {
    throw new Error('Encoded is only ever serialized, never parsed into');
  }

  toSchema(): asn1js.BaseBlock {
    throw new Error('Encoded is a value, not a schema');
  }
}

/**
 * `value` (an @peculiar ASN.1 structure) encoded once, usable wherever a
 * `T` is expected when serializing: the serializer copies its bytes.
 */
export function encode<T>(value: object): T {
  return new Encoded(asn.AsnConvert.serialize(value)) as unknown as T;
}

/** DER bytes already produced or checked by the library (e.g. a parsed field kept raw), as a `T` for serializing. */
export function encoded<T>(der: ArrayBuffer | Uint8Array): T {
  const buf = der instanceof ArrayBuffer ? der : der.buffer.slice(der.byteOffset, der.byteOffset + der.byteLength);
  return new Encoded(buf as ArrayBuffer) as unknown as T;
}
