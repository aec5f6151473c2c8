import { constants, deflateRawSync, gunzipSync, inflateRawSync } from 'node:zlib';
import { PolicyHub, storedBlock } from '../../src/controller/hub.js';
import { baseMesh, compiled, pod } from './policy-fixtures.js';

describe('policy hub encodings', () => {
  test('a stored block after a fully flushed deflate prefix inflates to prefix + block', () => {
    const prefix = deflateRawSync(Buffer.from('{"services":[1,2,3]'), { finishFlush: constants.Z_FULL_FLUSH });
    for (const tail of ['', ',"version":"abc"}', 'x'.repeat(1023)]) {
      expect(inflateRawSync(Buffer.concat([prefix, storedBlock(Buffer.from(tail))])).toString()).toBe(`{"services":[1,2,3]${tail}`);
    }
  });

  test('gzip bodies inflate to the plain policy whether the node’s tail is stored or deflated', async () => {
    // node-a gets enough pods for its own part to pass the stored-tail limit; node-b keeps a short one.
    const many = Array.from({ length: 20 }, (_, i) => pod(`web-${i + 10}`, { ip: `10.0.0.${i + 20}`, sa: 'web' }));
    const c = compiled([...baseMesh(), ...many]);
    const hub = new PolicyHub((n) => c.get(n));
    const tails = ['node-a', 'node-b'].map((n) => c.get(n)!.pieces()[1].length);
    expect(tails[0]).toBeGreaterThan(1024);
    expect(tails[1]).toBeLessThan(1024);
    for (const n of ['node-a', 'node-b']) {
      const gz = await hub.gzip(c.get(n)!);
      expect(gunzipSync(gz).toString()).toBe(c.get(n)!.json());
      expect(gz.readUInt32LE(gz.length - 4)).toBe(Buffer.byteLength(c.get(n)!.json()));
    }
  });
});
