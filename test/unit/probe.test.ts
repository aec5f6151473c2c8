import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mountCheck, probe, supportFrom, type ProbeCheck } from '../../src/agent/probe.js';

const check = (name: string, ok: boolean, neededBy: ProbeCheck['neededBy'], detail = ok ? 'fine' : `${name} missing`): ProbeCheck => ({ name, ok, neededBy, detail });

// /proc/mounts of a node with cgroup v2 at a non-standard place and bpffs, and one with neither.
const HYBRID = [
  'sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0',
  'tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0',
  'cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0',
  'cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0',
  'bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0',
  '',
].join('\n');
const V1_ONLY = ['sysfs /sys sysfs rw 0 0', 'cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0', ''].join('\n');

describe('supportFrom', () => {
  test('every check passes: both modes work', () => {
    expect(supportFrom([check('cgroup2', true, ['ebpf']), check('ipset', true, ['iptables']), check('btf', true, [])])).toEqual({});
  });

  test('a failed check makes only the modes that need it unusable, with the check named', () => {
    expect(supportFrom([check('cgroup2', false, ['ebpf'], 'cgroup v2 is not mounted'), check('ipset', true, ['iptables'])])).toEqual({ ebpf: 'cgroup2: cgroup v2 is not mounted' });
    expect(supportFrom([check('ipset', false, ['iptables'], 'ipset: not found')])).toEqual({ iptables: 'ipset: ipset: not found' });
  });

  test('the first failed check is the reason; checks no mode needs never block one', () => {
    const s = supportFrom([check('btf', false, []), check('bpffs', false, ['ebpf']), check('bpf-load:connect4', false, ['ebpf']), check('iptables', false, ['iptables'])]);
    expect(s).toEqual({ ebpf: 'bpffs: bpffs missing', iptables: 'iptables: iptables missing' });
  });
});

describe('mount checks', () => {
  test('cgroup v2 and bpffs are found where they are mounted, not where they usually are', () => {
    expect(mountCheck('cgroup2', HYBRID, 'cgroup2', 'absent')).toEqual({ name: 'cgroup2', neededBy: ['ebpf'], ok: true, detail: '/sys/fs/cgroup/unified' });
    expect(mountCheck('bpffs', HYBRID, 'bpf', 'absent')).toEqual({ name: 'bpffs', neededBy: ['ebpf'], ok: true, detail: '/sys/fs/bpf' });
  });

  test('a cgroup v1-only node fails the cgroup2 check with the message given', () => {
    expect(mountCheck('cgroup2', V1_ONLY, 'cgroup2', 'cgroup v2 is not mounted')).toEqual({ name: 'cgroup2', neededBy: ['ebpf'], ok: false, detail: 'cgroup v2 is not mounted' });
  });
});

describe('probe', () => {
  const dirs: string[] = [];
  afterAll(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  const objectDir = (): string => {
    const d = mkdtempSync(join(tmpdir(), 'fsmn-probe-'));
    dirs.push(d);
    return d;
  };

  test('a corrupt BPF object makes eBPF unavailable, naming the object; iptables is judged apart', async () => {
    const dir = objectDir();
    writeFileSync(join(dir, 'connect4.o'), Buffer.from('\x7fELF this is not an object file'));
    const r = await probe({ objectDir: dir, procMounts: HYBRID });
    const failed = r.checks.find((c) => c.name === 'bpf-load:connect4');
    expect(failed).toMatchObject({ ok: false, neededBy: ['ebpf'] });
    expect(failed?.detail).toContain(join(dir, 'connect4.o'));
    expect(r.support.ebpf).toMatch(/^bpf-load:connect4: /);
    expect(r.checks.find((c) => c.name === 'cgroup2')).toMatchObject({ ok: true, detail: '/sys/fs/cgroup/unified' });
    expect(r.platform.kernel).not.toBe('');
  });

  test('an empty object directory makes eBPF unavailable with the build step to run', async () => {
    const r = await probe({ objectDir: objectDir(), procMounts: HYBRID });
    expect(r.support.ebpf).toMatch(/^bpf-objects: no BPF objects in .* \(run npm run build:bpf\)$/);
  });

  test('a cgroup v1-only mount table makes eBPF unavailable for cgroup2 before anything is loaded', async () => {
    const dir = objectDir();
    writeFileSync(join(dir, 'connect4.o'), 'not an object');
    const r = await probe({ objectDir: dir, procMounts: V1_ONLY });
    expect(r.support.ebpf).toBe('cgroup2: cgroup v2 is not mounted (the eBPF dataplane attaches to cgroup v2 directories)');
  });
});
