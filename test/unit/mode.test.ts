import { chooseMode, desiredMode } from '../../src/agent/mode.js';

const both = {};
const noEbpf = { ebpf: 'cgroup/getsockopt programs not loadable (kernel has no BPF_CGROUP_GETSOCKOPT)' };
const noIptables = { iptables: 'ipset not found' };

describe('desired mode precedence', () => {
  test('Node label beats mesh default beats agent flag', () => {
    expect(desiredMode({ nodeLabel: 'iptables', meshDefault: 'ebpf', flag: 'auto' })).toEqual({ desired: 'iptables', source: 'node-label' });
    expect(desiredMode({ meshDefault: 'ebpf', flag: 'iptables' })).toEqual({ desired: 'ebpf', source: 'mesh-default' });
    expect(desiredMode({ nodeLabel: '', meshDefault: '', flag: 'iptables' })).toEqual({ desired: 'iptables', source: 'agent-flag' });
  });

  test('an invalid value names its source and the allowed values', () => {
    expect(() => desiredMode({ nodeLabel: 'turbo', flag: 'auto' })).toThrow(/flomesh.io\/interception-mode "turbo".*ebpf, iptables, auto/);
    expect(() => desiredMode({ meshDefault: 'EBPF', flag: 'auto' })).toThrow(/mesh interceptionMode "EBPF"/);
  });
});

describe('effective mode', () => {
  test('auto prefers eBPF when the probe allows it', () => {
    expect(chooseMode({ flag: 'auto' }, both)).toMatchObject({ ready: true, effective: 'ebpf' });
    expect(chooseMode({ flag: 'auto' }, both)).not.toHaveProperty('fallbackReason');
  });

  test('eBPF missing: falls back to iptables with the reason naming the capability', () => {
    const d = chooseMode({ nodeLabel: 'ebpf', flag: 'auto' }, noEbpf);
    expect(d).toMatchObject({ ready: true, desired: 'ebpf', effective: 'iptables' });
    expect(d.ready && d.fallbackReason).toContain('BPF_CGROUP_GETSOCKOPT');
  });

  test('iptables desired but missing falls back to eBPF', () => {
    expect(chooseMode({ flag: 'iptables' }, noIptables)).toMatchObject({ ready: true, effective: 'ebpf', fallbackReason: 'iptables unavailable: ipset not found' });
  });

  test('neither mode works: not ready, with both reasons', () => {
    const d = chooseMode({ flag: 'auto' }, { ...noEbpf, ...noIptables });
    expect(d.ready).toBe(false);
    expect(!d.ready && d.reason).toMatch(/ebpf: .*GETSOCKOPT.*iptables: ipset not found/);
  });

  test('a restart with the same inputs keeps the persisted choice even if eBPF now probes fine', () => {
    const first = chooseMode({ flag: 'auto' }, noEbpf);
    expect(first).toMatchObject({ effective: 'iptables' });
    const again = chooseMode({ flag: 'auto' }, both, { desired: 'auto', effective: 'iptables' });
    expect(again).toMatchObject({ ready: true, effective: 'iptables' });
  });

  test('new desired mode overrides the persisted choice', () => {
    expect(chooseMode({ nodeLabel: 'ebpf', flag: 'auto' }, both, { desired: 'auto', effective: 'iptables' })).toMatchObject({ effective: 'ebpf' });
  });

  test('persisted mode that no longer works falls back with a reason', () => {
    expect(chooseMode({ flag: 'auto' }, noEbpf, { desired: 'auto', effective: 'ebpf' })).toMatchObject({ effective: 'iptables', fallbackReason: expect.stringContaining('GETSOCKOPT') });
  });
});
