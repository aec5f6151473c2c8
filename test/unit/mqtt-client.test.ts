import { encodeConnect, encodePublish, encodeSubscribe, Framer, decodePublish, packet } from '../../src/lab/mqtt-client.js';

/**
 * The lab/test MQTT client's wire format (src/lab/mqtt-client.ts): what it
 * sends is what the spec's examples say, and its framer cuts a byte stream
 * into packets wherever the chunks break.
 */

describe('mqtt-client wire format', () => {
  test('CONNECT 3.1.1 and 5, with a will', () => {
    // 3.1.1: "MQTT", level 4, clean session, keep alive 60, client id "c1".
    expect(encodeConnect({ version: 4, clientId: 'c1' }).toString('hex')).toBe('100e00044d5154540402003c00026331');
    // 5: the same with an empty property block before the payload.
    expect(encodeConnect({ version: 5, clientId: 'c1' }).toString('hex')).toBe('100f00044d5154540502003c0000026331');
    // will flag 0x04, will QoS 1 (0x08), retain 0x20: flags 0x2e; 3.1.1 has no will properties.
    const w = encodeConnect({ version: 4, clientId: 'c', will: { topic: 't', payload: 'x', qos: 1, retain: true } });
    expect(w[9]).toBe(0x2e);
    expect(w.subarray(w.length - 6).toString('hex')).toBe('000174000178');
  });

  test('PUBLISH carries QoS, retain and packet id; SUBSCRIBE has the reserved flags 0010', () => {
    const p = encodePublish(5, 'a/b', 'hi', 1, 7, true);
    expect(p[0]).toBe(0x33);
    expect(decodePublish(5, { type: 3, flags: p[0]! & 15, body: p.subarray(2) })).toMatchObject({ topic: 'a/b', qos: 1, retain: true, pid: 7, payload: Buffer.from('hi') });
    expect(encodeSubscribe(4, 1, [{ filter: 'a/#', qos: 2 }]).toString('hex')).toBe('820800010003612f2302');
  });

  test('the framer cuts packets at any chunk boundary, with multi-byte lengths', () => {
    const big = packet(0x30, Buffer.alloc(300, 1));
    const stream = Buffer.concat([packet(0xc0, Buffer.alloc(0)), big, packet(0x90, Buffer.from([0, 1, 0x80]))]);
    for (const cut of [1, 2, 3, 7, 150, stream.length - 1]) {
      const f = new Framer();
      const got = [...f.push(stream.subarray(0, cut)), ...f.push(stream.subarray(cut))];
      expect(got.map((p) => [p.type, p.body.length])).toEqual([[12, 0], [3, 300], [9, 3]]);
    }
  });
});
