import { once } from 'node:events';
import net from 'node:net';
import { NOT_PRODUCTION_BANNER, PassthroughProxy, parseHostPort } from '../../src/proxy/passthrough.js';
import { InvalidInputError } from '../../src/errors.js';

describe('passthrough proxy (the test proxy, not the production one)', () => {
  test('says loudly what it is not', () => {
    expect(NOT_PRODUCTION_BANNER).toMatch(/NOT the production proxy/);
  });

  test('--listen takes IPv4:port and names the flag when it is wrong', () => {
    expect(parseHostPort('--listen', '10.77.1.1:15001')).toEqual({ host: '10.77.1.1', port: 15001 });
    for (const bad of ['10.77.1.1', '10.77.1.1:0', '10.77.1.1:70000', 'host:15001', '300.1.1.1:1']) {
      expect(() => parseHostPort('--listen', bad)).toThrow(InvalidInputError);
      expect(() => parseHostPort('--listen', bad)).toThrow(/--listen/);
    }
  });

  test('a connection without an original destination is recorded and closed, not forwarded', async () => {
    const proxy = new PassthroughProxy({ host: '127.0.0.1', port: 0 });
    const { port } = await proxy.start();
    try {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => {});
      await once(s, 'close');
      expect(proxy.records).toHaveLength(1);
      expect(proxy.records[0]).toMatchObject({ event: 'close', source: '127.0.0.1', originalDst: null });
      expect(proxy.records[0]!.error).toBeDefined();
    } finally {
      await proxy.close();
    }
  });
});
