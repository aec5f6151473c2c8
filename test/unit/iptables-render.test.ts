import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { InvalidInputError } from '../../src/errors.js';
import { planSets } from '../../src/dataplane/iptables/ipset.js';
import { makeNames } from '../../src/dataplane/iptables/names.js';
import { render } from '../../src/dataplane/iptables/render.js';
import { planTable } from '../../src/dataplane/iptables/tables.js';
import { validateDesired } from '../../src/dataplane/iptables/validate.js';
import { noExclusions, type DesiredState, type PodIntercept } from '../../src/dataplane/types.js';

/**
 * Golden files: the complete first transaction (what a sync sends to an empty
 * namespace) for sample states. A change to the rendering shows up as a diff
 * of these files in review. FSMN_UPDATE_GOLDEN=1 rewrites them.
 */

const goldenDir = join(dirname(fileURLToPath(import.meta.url)), 'golden');
const names = makeNames();

function golden(name: string, actual: string): void {
  const path = join(goldenDir, name);
  if (process.env.FSMN_UPDATE_GOLDEN === '1') {
    mkdirSync(goldenDir, { recursive: true });
    writeFileSync(path, actual);
  }
  if (!existsSync(path)) throw new Error(`golden file ${name} is missing; generate it with FSMN_UPDATE_GOLDEN=1 and review the diff`);
  expect(actual).toBe(readFileSync(path, 'utf8'));
}

function pod(n: number, over: Partial<PodIntercept> = {}): PodIntercept {
  return { uid: `uid-${n}`, namespace: 'demo', name: `pod-${n}`, ip: `10.77.1.${n + 1}`, cgroupPath: `/sys/fs/cgroup/pods/p${n}`, inbound: 'permissive', exclusions: noExclusions(), ...over };
}

export function sampleState(): DesiredState {
  return {
    proxy: { address: '10.77.1.1', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/sys/fs/cgroup/proxy', uid: 1500 },
    nodeAddresses: ['10.78.0.1', '10.77.1.1'],
    proxySources: ['10.78.0.2', '10.78.0.3', '10.79.0.0/16'],
    mesh: {
      // 17 ports: two multiport rules (at most 15 each); duplicates and order do not matter.
      outboundPorts: [6443, 22, 2379, 2380, 10250, 10255, 53, 9100, 9090, 8443, 3306, 5432, 6379, 11211, 27017, 9200, 9300, 22],
      outboundCidrs: ['169.254.169.254', '10.96.0.10/32', '192.168.7.9/24'],
      outboundIncludeCidrs: [],
      inboundPorts: [15020],
    },
    pods: [
      pod(3, { inbound: 'strict', exclusions: { ...noExclusions(), inboundPorts: [8080, 8081] } }),
      pod(1),
      pod(2, { exclusions: { ...noExclusions(), outboundPorts: [25, 587], outboundCidrs: ['172.16.0.0/12'] } }),
      pod(4, { inbound: 'strict', exclusions: { ...noExclusions(), outboundIncludeCidrs: ['10.0.0.0/8', '100.64.0.0/10'] } }),
    ],
  };
}

function firstTransaction(desired: DesiredState): string {
  const r = render(validateDesired(desired), names);
  const empty = { chains: new Map(), jumps: [] };
  const sets = planSets(new Map(), [], r.sets, names);
  return [
    '# ipset (sent through the ipset session)',
    ...sets.prepare,
    ...(['nat', 'filter'] as const).map((t) => `# iptables-restore --noflush (${t})\n${planTable({ table: t, ...empty }, r.tables[t]).text}`),
  ].join('\n');
}

describe('iptables rendering (golden)', () => {
  test('sample node: mesh-wide and per-pod exclusions, strict pods, own inclusion list', () => {
    golden('iptables-sample.txt', firstTransaction(sampleState()));
  });

  test('mesh-wide inclusion list: only listed destinations are redirected, for every pod', () => {
    const s = sampleState();
    s.mesh.outboundIncludeCidrs = ['10.0.0.0/8'];
    golden('iptables-mesh-include.txt', firstTransaction(s));
  });

  test('no pods: the rules are the same as with pods (enrolment never changes a rule)', () => {
    const withPods = render(validateDesired({ ...sampleState(), pods: [pod(1), pod(5, { inbound: 'strict' })] }), names);
    const without = render(validateDesired({ ...sampleState(), pods: [] }), names);
    expect(without.tables).toEqual(withPods.tables);
    expect(withPods.sets.find((s) => s.name === 'fsmn-pods')?.members).toEqual(
      new Map([
        ['10.77.1.2', 'uid-1'],
        ['10.77.1.6', 'uid-5'],
      ]),
    );
  });

  test('the order pods come in does not change the rendering', () => {
    const a = sampleState();
    const b = { ...sampleState(), pods: [...sampleState().pods].reverse() };
    expect(firstTransaction(b)).toBe(firstTransaction(a));
  });

  test('references: each set is named by as many rules as the kernel will count', () => {
    const r = render(validateDesired(sampleState()), names);
    expect(Object.fromEntries(r.references)).toEqual({ 'fsmn-pods': 1, 'fsmn-strict': 1, 'fsmn-out-ports': 1, 'fsmn-in-ports': 1, 'fsmn-proxy-src': 1 });
  });
});

describe('iptables validation', () => {
  const cases: Array<[string, (s: DesiredState) => void, RegExp]> = [
    ['invalid CIDR', (s) => (s.mesh.outboundCidrs = ['10.0.0.0/33']), /mesh\.outboundCidrs\[0\] "10\.0\.0\.0\/33"/],
    ['per-pod invalid CIDR', (s) => ((s.pods[2] as PodIntercept).exclusions.outboundIncludeCidrs = ['10.1.2']), /pods\[2\]\.exclusions\.outboundIncludeCidrs\[0\] "10\.1\.2"/],
    ['IPv6 CIDR', (s) => (s.mesh.outboundCidrs = ['fd00::/8']), /mesh\.outboundCidrs\[0\] "fd00::\/8".*IPv6/],
    ['port 0', (s) => (s.mesh.outboundPorts = [0]), /mesh\.outboundPorts\[0\] 0: not a TCP port/],
    ['port 65536', (s) => ((s.pods[0] as PodIntercept).exclusions.inboundPorts = [65536]), /pods\[0\]\.exclusions\.inboundPorts\[0\] 65536/],
    ['proxy port', (s) => (s.proxy.outboundPort = 70000), /proxy\.outboundPort 70000/],
    ['pod address with a leading zero', (s) => ((s.pods[1] as PodIntercept).ip = '10.77.1.02'), /pods\[1\]\.ip "10\.77\.1\.02"/],
    ['duplicate pod address', (s) => ((s.pods[1] as PodIntercept).ip = '10.77.1.4'), /pods\[1\]\.ip "10\.77\.1\.4": also used by pods\[\d\] \(uid uid-3\)/],
    ['duplicate uid', (s) => ((s.pods[1] as PodIntercept).uid = 'uid-3'), /pods\[1\]\.uid "uid-3": duplicate/],
    ['uid that would break a set comment', (s) => ((s.pods[0] as PodIntercept).uid = 'a"b'), /pods\[0\]\.uid "a\\"b"/],
    ['loopback proxy', (s) => (s.proxy.address = '127.0.0.1'), /proxy\.address "127\.0\.0\.1"/],
    ['inbound mode', (s) => ((s.pods[0] as PodIntercept).inbound = 'STRICT' as 'strict'), /pods\[0\]\.inbound "STRICT"/],
    ['node address', (s) => (s.nodeAddresses = ['10.0.0.300']), /nodeAddresses\[0\] "10\.0\.0\.300"/],
  ];
  test.each(cases)('%s: InvalidInputError naming field and value', (_name, mutate, message) => {
    const s = sampleState();
    mutate(s);
    let err: unknown;
    try {
      validateDesired(s);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidInputError);
    expect((err as Error).message).toMatch(message);
  });

  test('CIDRs are canonicalised the way iptables prints them', () => {
    const n = validateDesired(sampleState());
    const r = render(n, names);
    expect(r.tables.nat.chains.get('FSMN_OUTBOUND')).toContain('-A FSMN_OUTBOUND -d 192.168.7.0/24 -j RETURN');
    expect(r.tables.nat.chains.get('FSMN_OUTBOUND')).toContain('-A FSMN_OUTBOUND -d 169.254.169.254/32 -j RETURN');
  });

  test('a prefix that makes names too long is refused before anything is created', () => {
    expect(() => makeNames('averyveryverylongprefixx')).toThrow(/prefix "averyveryverylongprefixx": makes chain name AVERYVERYVERYLONGPREFIXX_OUTBOUND 33 characters long; iptables allows 28/);
    expect(() => makeNames('Fsm')).toThrow(InvalidInputError);
    expect(makeNames('fsmx').chains.outbound).toBe('FSMX_OUTBOUND');
  });
});
