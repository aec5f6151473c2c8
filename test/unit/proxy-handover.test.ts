import { configVersion, parseDrainAck, startFailure } from '../../src/proxy/handover.js';

describe('reload hand-over: what the instances print', () => {
  test('drain ack: one line per thread of the version the instance runs; other versions (programs a SIGHUP replaced) do not count', () => {
    const line = (why: string, v: string): string => `2026-12-04 21:00:00.000 [INF] fsmn-proxy drain ${why} version=${v}: requests 0, connections 0\n`;
    expect(parseDrainAck('', 'v2', 2)).toEqual({ done: false, deadline: 0 });
    expect(parseDrainAck(line('drained', 'v2'), 'v2', 2)).toEqual({ done: false, deadline: 0 });
    expect(parseDrainAck(line('drained', 'v1') + line('drained', 'v2'), 'v2', 2)).toEqual({ done: false, deadline: 0 });
    expect(parseDrainAck(line('drained', 'v2') + line('deadline', 'v2'), 'v2', 2)).toEqual({ done: true, deadline: 1 });
    // "v2" is not "v20".
    expect(parseDrainAck(line('drained', 'v20'), 'v2', 1).done).toBe(false);
  });

  test('config version as proxy/config.js reports it: the version field as a string, else none', () => {
    expect(configVersion('{"version": "00000000000000b1"}')).toBe('00000000000000b1');
    expect(configVersion('{"version": 7}')).toBe('7');
    expect(configVersion('{}')).toBe('none');
    expect(configVersion('not json')).toBe('none');
  });

  test('why a new instance failed: the program\'s [ERR] lines without their stamps, else the last lines', () => {
    const log = [
      '2026-12-04 20:55:20.526 [INF] [admin] Starting admin service...',
      '2026-12-04 20:55:20.550 [ERR] [pjs] File /main.js:',
      "2026-12-04 20:55:20.550 [ERR] [pjs] Error: invalid 'address:port' form",
      '',
    ].join('\n');
    expect(startFailure(log)).toBe("[pjs] File /main.js: | [pjs] Error: invalid 'address:port' form");
    expect(startFailure('a\nb\n')).toBe('a | b');
    expect(startFailure('')).toBe('no output');
    expect(startFailure('[ERR] ' + 'x'.repeat(50), 10)).toBe('[ERR] xxxx...');
  });
});
