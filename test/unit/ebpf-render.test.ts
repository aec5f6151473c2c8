import { AddrFlag, CfgFlag, Dir, PodFlag, addrKeyCodec, cidrKeyCodec, configCodec, portKeyCodec, tupleCodec, origDstCodec, seqKeyCodec, pendingCodec, metaCodec, META_MAGIC } from '../../src/dataplane/ebpf/abi.js';
import { diffMap, encodeMaps, renderAddrs, renderMaps, type CgroupIds } from '../../src/dataplane/ebpf/render.js';
import { validateDesired } from '../../src/dataplane/ebpf/validate.js';
import { noExclusions, type DesiredState } from '../../src/dataplane/types.js';
import { InvalidInputError } from '../../src/errors.js';

const PODS = '/sys/fs/cgroup/kubepods';

function state(): DesiredState {
  return {
    proxy: { address: '10.0.0.1', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/sys/fs/cgroup/fsm/proxy' },
    nodeAddresses: ['192.168.1.10', '10.0.0.1'],
    proxySources: ['10.0.0.1', '192.168.1.0/24'],
    mesh: { ...noExclusions(), outboundPorts: [9090, 9090], outboundIncludeCidrs: [] },
    pods: [
      {
        uid: 'uid-b',
        namespace: 'ns',
        name: 'b',
        ip: '10.0.0.3',
        cgroupPath: `${PODS}/b`,
        inbound: 'strict',
        exclusions: { outboundPorts: [], outboundCidrs: ['172.16.5.9/16'], outboundIncludeCidrs: [], inboundPorts: [8081] },
      },
      { uid: 'uid-a', namespace: 'ns', name: 'a', ip: '10.0.0.2', cgroupPath: `${PODS}/a`, inbound: 'permissive', exclusions: { ...noExclusions(), outboundIncludeCidrs: ['10.0.0.0/8'] } },
    ],
  };
}

const ids: CgroupIds = { proxy: 7n, pods: new Map([['uid-a', 100n], ['uid-b', 200n]]) };

describe('eBPF render: DesiredState -> map entries', () => {
  test('renders every owned map, canonical and sorted whatever the input order', () => {
    const r = renderMaps(validateDesired(state()), ids, { fastPath: true });
    expect(r.config).toEqual({ proxyIp4: '10.0.0.1', outboundPort: 15001, inboundPort: 15003, proxyCgroupId: 7n, flags: CfgFlag.fastPath });
    expect(r.pods).toEqual([
      [100n, { flags: PodFlag.hasInclude, uid: 'uid-a' }],
      [200n, { flags: PodFlag.strict, uid: 'uid-b' }],
    ]);
    expect(r.podIps).toEqual([
      [{ family: 2, addr: '10.0.0.2' }, 100n],
      [{ family: 2, addr: '10.0.0.3' }, 200n],
    ]);
    expect(r.ports).toEqual([
      [{ scope: 0n, port: 9090, dir: Dir.out }, 1],
      [{ scope: 200n, port: 8081, dir: Dir.in }, 1],
    ]);
    // host bits masked, per-pod scope
    expect(r.cidrExcl).toEqual([[{ prefixLen: 16, family: 2, scope: 200n, addr: '172.16.0.0' }, 1]]);
    expect(r.cidrIncl).toEqual([[{ prefixLen: 8, family: 2, scope: 100n, addr: '10.0.0.0' }, 1]]);
    const shuffled = state();
    shuffled.pods.reverse();
    expect(renderMaps(validateDesired(shuffled), ids, { fastPath: true })).toEqual(r);
  });

  test('fast path off clears the config flag only', () => {
    expect(renderMaps(validateDesired(state()), ids, { fastPath: false }).config.flags).toBe(0);
  });

  test('a mesh-wide inclusion list makes every pod an inclusion-list pod', () => {
    const s = state();
    s.mesh.outboundIncludeCidrs = ['10.0.0.0/16'];
    const r = renderMaps(validateDesired(s), ids, { fastPath: true });
    expect(r.pods.map(([, v]) => v.flags & PodFlag.hasInclude)).toEqual([PodFlag.hasInclude, PodFlag.hasInclude]);
    expect(r.cidrIncl).toContainEqual([{ prefixLen: 16, family: 2, scope: 0n, addr: '10.0.0.0' }, 1]);
  });

  test('fsm_addrs entries carry the flags of every covering prefix (LPM returns the longest match only)', () => {
    expect(renderAddrs([0x0a000001, 0xc0a8010a], [{ network: 0x0a000001, prefix: 32 }, { network: 0xc0a80100, prefix: 24 }])).toEqual([
      [{ prefixLen: 32, family: 2, addr: '10.0.0.1' }, AddrFlag.node | AddrFlag.proxySource],
      [{ prefixLen: 24, family: 2, addr: '192.168.1.0' }, AddrFlag.proxySource],
      [{ prefixLen: 32, family: 2, addr: '192.168.1.10' }, AddrFlag.node | AddrFlag.proxySource],
    ]);
  });

  test('two pods in one cgroup, or a pod in the proxy cgroup, are refused', () => {
    expect(() => renderMaps(validateDesired(state()), { proxy: 7n, pods: new Map([['uid-a', 100n], ['uid-b', 100n]]) }, { fastPath: true })).toThrow(/same cgroup/);
    expect(() => renderMaps(validateDesired(state()), { proxy: 100n, pods: ids.pods }, { fastPath: true })).toThrow(/proxy's cgroup/);
  });

  /** n as `bytes` little-endian bytes, in hex. */
  const le = (n: number, bytes: number): string => Buffer.from(new Uint8Array(new BigUint64Array([BigInt(n)]).buffer).subarray(0, bytes)).toString('hex');

  test('encodes keys and values in the C layout (golden bytes)', () => {
    const enc = encodeMaps(renderMaps(validateDesired(state()), ids, { fastPath: true }));
    // struct fsm_config: ip4 (network order), ports (network order), ip6[16], cgroup id, flags, reserved
    expect(enc.fsm_config.get(le(0, 4))!.toString('hex')).toBe(['0a000001', '3a99', '3a9b', '00'.repeat(16), le(7, 8), le(1, 4), '00'.repeat(4)].join(''));
    // struct fsm_port_key: scope u64, port u16 (host order), dir u8, pad[5]
    expect([...enc.fsm_ports.keys()]).toContain([le(0, 8), le(9090, 2), '01', '00'.repeat(5)].join(''));
    // struct fsm_cidr_key: prefixlen = 96 + 16, family, scope, addr[16]
    expect([...enc.fsm_cidr_excl.keys()]).toEqual([[le(112, 4), le(2, 4), le(200, 8), 'ac100000', '00'.repeat(12)].join('')]);
    // struct fsm_pod: flags, reserved, uid[48]
    const pod = enc.fsm_pods.get(le(200, 8))!;
    expect(pod.length).toBe(56);
    expect(pod.subarray(8).toString('utf8').replace(/\0+$/, '')).toBe('uid-b');
  });

  test('codecs round-trip and agree with the C struct sizes', () => {
    expect([configCodec.size, addrKeyCodec.size, portKeyCodec.size, cidrKeyCodec.size, tupleCodec.size, origDstCodec.size, seqKeyCodec.size, pendingCodec.size, metaCodec.size]).toEqual([40, 24, 16, 32, 40, 32, 48, 40, 4096]);
    const k = { prefixLen: 24, family: 2, scope: 5n, addr: '10.1.2.0' };
    expect(cidrKeyCodec.decode(cidrKeyCodec.encode(k))).toEqual(k);
    // struct fsm_seq_key: family, pod_addr[16], proxy_addr[16], proxy_port u16, pad, pod_seq u32, proxy_seq u32
    const sk = { family: 2, podAddr: '10.1.0.5', proxyAddr: '10.1.0.1', proxyPort: 15001, podSeq: 0xdeadbeef, proxySeq: 7 };
    expect(seqKeyCodec.encode(sk).toString('hex')).toBe([le(2, 4), '0a010005', '00'.repeat(12), '0a010001', '00'.repeat(12), le(15001, 2), '0000', le(0xdeadbeef, 4), le(7, 4)].join(''));
    const p = { orig: { addr: '10.1.0.9', port: 8080, family: 2, podCgroupId: 42n }, podPort: 40000 };
    expect(pendingCodec.decode(pendingCodec.encode(p))).toEqual(p);
    const m = { magic: META_MAGIC, abi: 1, json: '{"owner":"fsm-node"}' };
    expect(metaCodec.decode(metaCodec.encode(m))).toEqual(m);
  });
});

describe('eBPF diff', () => {
  test('writes new and changed entries, prunes the rest, nothing for an identical state', () => {
    const cur = new Map([
      ['01', Buffer.from([1])],
      ['02', Buffer.from([2])],
      ['03', Buffer.from([3])],
    ]);
    const want = new Map([
      ['01', Buffer.from([1])],
      ['02', Buffer.from([9])],
      ['04', Buffer.from([4])],
    ]);
    expect(diffMap(cur, want)).toEqual({ upserts: [['02', Buffer.from([9])], ['04', Buffer.from([4])]], deletes: ['03'] });
    expect(diffMap(want, want)).toEqual({ upserts: [], deletes: [] });
  });
});

describe('eBPF validation: the field and the value at fault', () => {
  const cases: Array<[string, (s: DesiredState) => void, RegExp]> = [
    ['bad CIDR', (s) => (s.mesh.outboundCidrs = ['10.0.0.0/33']), /mesh\.outboundCidrs\[0\] "10\.0\.0\.0\/33"/],
    ['bad port', (s) => (s.pods[0]!.exclusions.inboundPorts = [0]), /pods\[0\]\.exclusions\.inboundPorts\[0\] 0/],
    ['bad pod ip', (s) => (s.pods[1]!.ip = '10.0.0'), /pods\[1\]\.ip "10\.0\.0"/],
    ['duplicate ip', (s) => (s.pods[1]!.ip = s.pods[0]!.ip), /pods\[1\]\.ip "10\.0\.0\.3": also used by pods\[0\]/],
    ['duplicate uid', (s) => (s.pods[1]!.uid = 'uid-b'), /pods\[1\]\.uid "uid-b"/],
    ['relative cgroup', (s) => (s.pods[0]!.cgroupPath = 'kubepods/b'), /pods\[0\]\.cgroupPath "kubepods\/b"/],
    ['pod in the proxy cgroup', (s) => (s.pods[0]!.cgroupPath = s.proxy.cgroupPath), /proxy's cgroup/],
    ['uid too long for the map', (s) => (s.pods[0]!.uid = 'x'.repeat(48)), /pods\[0\]\.uid/],
    ['loopback proxy', (s) => (s.proxy.address = '127.0.0.1'), /proxy\.address "127\.0\.0\.1"/],
    ['bad inbound mode', (s) => ((s.pods[0] as { inbound: string }).inbound = 'lenient'), /pods\[0\]\.inbound "lenient"/],
  ];
  test.each(cases)('%s', (_name, spoil, message) => {
    const s = state();
    spoil(s);
    const err = (() => {
      try {
        validateDesired(s);
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(InvalidInputError);
    expect((err as Error).message).toMatch(message);
  });
});
