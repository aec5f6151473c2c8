import { prettyLine } from '../../src/util/log.js';

describe('terminal log lines', () => {
  test('level, module, message and fields on one line; pid and hostname left out', () => {
    const line = prettyLine(JSON.stringify({ level: 40, time: Date.UTC(2026, 0, 1, 12, 0, 1, 123), pid: 7, module: 'agent', msg: 'interception mode fell back', effective: 'iptables', reason: 'bpffs: no bpffs mount', n: 2 }));
    expect(line).toBe('12:00:01.123 WARN  agent: interception mode fell back effective=iptables reason="bpffs: no bpffs mount" n=2\n');
  });

  test('a line that is not JSON passes through unchanged', () => {
    expect(prettyLine('plain text')).toBe('plain text\n');
  });
});
