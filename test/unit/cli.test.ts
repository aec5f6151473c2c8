import { jest } from '@jest/globals';
import { commands, main } from '../../src/cli/main.js';

function capture() {
  let out = '';
  let err = '';
  const o = jest.spyOn(process.stdout, 'write').mockImplementation((s: string | Uint8Array) => ((out += String(s)), true));
  const e = jest.spyOn(process.stderr, 'write').mockImplementation((s: string | Uint8Array) => ((err += String(s)), true));
  return { get out() { return out; }, get err() { return err; }, restore: () => { o.mockRestore(); e.mockRestore(); } };
}

describe('fsm-node CLI', () => {
  test('top-level help lists every subcommand', async () => {
    const c = capture();
    expect(await main(['--help'])).toBe(0);
    c.restore();
    for (const name of ['agent', 'controller', 'lab', 'status', 'mode', 'cleanup']) expect(c.out).toContain(`  ${name}`);
  });

  test.each(commands.map((c) => c.name))('%s --help shows usage and every option', async (name) => {
    const c = capture();
    expect(await main([name, '--help'])).toBe(0);
    c.restore();
    expect(c.out).toContain(`fsm-node ${name} `);
    const cmd = commands.find((x) => x.name === name)!;
    for (const opt of Object.keys(cmd.options)) expect(c.out).toContain(`--${opt}`);
  });

  test('unknown command is a usage error naming it', async () => {
    const c = capture();
    expect(await main(['frobnicate'])).toBe(2);
    c.restore();
    expect(c.err).toContain('"frobnicate"');
  });

  test('unknown flag is a usage error naming the flag', async () => {
    const c = capture();
    expect(await main(['status', '--bogus'])).toBe(2);
    c.restore();
    expect(c.err).toContain('--bogus');
  });

  test('missing flag value is a usage error', async () => {
    const c = capture();
    expect(await main(['agent', '--node'])).toBe(2);
    c.restore();
    expect(c.err).toContain('--node');
  });

  test('invalid mode value lists the allowed values', async () => {
    const c = capture();
    expect(await main(['mode', 'set', 'turbo'])).toBe(2);
    c.restore();
    expect(c.err).toContain('ebpf, iptables, auto');
  });
});
