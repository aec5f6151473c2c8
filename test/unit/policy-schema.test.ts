import { ListParseError, parseCidrList, parsePortList } from '../../src/policy/fsm.js';
import { formatPath, NodePolicySchema, POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';

const policy = (): NodePolicy => ({
  apiVersion: POLICY_API_VERSION,
  kind: 'NodePolicy',
  version: '0123456789abcdef',
  mesh: {
    name: 'fsm',
    inbound: 'strict',
    interceptionMode: 'auto',
    egress: 'allow',
    trafficPolicy: 'smi',
    exclusions: { outboundPorts: [6379], outboundCidrs: ['169.254.0.0/16'], outboundIncludeCidrs: [], inboundPorts: [] },
  },
  proxies: [{ node: 'node-a', addresses: ['192.168.1.10'] }],
  node: { name: 'node-a', addresses: ['192.168.1.10'], interceptionMode: null },
  meshPods: [{ ip: '10.0.0.1', namespace: 'app', serviceAccount: 'web', node: 'node-a' }],
  pods: [
    {
      uid: 'u1',
      namespace: 'app',
      name: 'web-1',
      ip: '10.0.0.1',
      serviceAccount: 'web',
      cgroup: { qosClass: 'Burstable', path: null },
      exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: ['10.0.0.0/8'], inboundPorts: [9090] },
    },
  ],
  access: [
    {
      namespace: 'app',
      name: 't',
      destination: { namespace: 'app', serviceAccount: 'web', port: null },
      sources: [{ namespace: 'app', serviceAccount: 'api' }],
      rules: [
        { kind: 'HTTPRouteGroup', name: 'routes', matches: [{ name: 'api', pathRegex: '/api', methods: ['GET'], headers: {} }] },
        { kind: 'TCPRoute', name: 'tcp', ports: [5432] },
      ],
    },
  ],
  services: [
    {
      namespace: 'app',
      name: 'web',
      clusterIPs: ['172.16.0.1'],
      ports: [{ name: 'http', port: 80, protocol: 'TCP', appProtocol: null }],
      endpoints: [{ ip: '10.0.0.1', ports: { http: 8080 }, node: 'node-a', pod: { namespace: 'app', name: 'web-1' }, serviceAccount: 'web' }],
    },
  ],
  splits: [{ namespace: 'app', name: 's', service: 'web', backends: [{ service: 'web', weight: 100 }], matches: [] }],
});

describe('NodePolicy schema', () => {
  test('a document without meshPods (an older controller, an older stored copy) reads as no mesh pods known', () => {
    const { meshPods: _dropped, ...old } = policy();
    const r = NodePolicySchema.safeParse(JSON.parse(JSON.stringify(old)));
    expect(r.success && r.data.meshPods).toEqual([]);
  });

  test('a mesh pod with a bad address is rejected by field', () => {
    const p = { ...policy(), meshPods: [{ ip: '10.0.0.300', namespace: 'app', serviceAccount: 'web', node: 'node-a' }] };
    const r = NodePolicySchema.safeParse(p);
    expect(r.success).toBe(false);
    expect(!r.success && formatPath(r.error.issues[0]!.path)).toBe('meshPods[0].ip');
  });

  test('a policy survives a JSON round trip and still parses to the same value', () => {
    const p = policy();
    const r = NodePolicySchema.safeParse(JSON.parse(JSON.stringify(p)));
    expect(r.success).toBe(true);
    expect(r.success && r.data).toEqual(p);
  });

  test.each([
    ['a version that is not a hash', (p: NodePolicy) => void (p.version = 'v1'), 'version'],
    ['a bad CIDR in pod exclusions', (p: NodePolicy) => void (p.pods[0]!.exclusions.outboundCidrs = ['10.0.0.0/33']), 'pods[0].exclusions.outboundCidrs[0]'],
    ['a port out of range', (p: NodePolicy) => void (p.services[0]!.endpoints[0]!.ports.http = 70000), 'services[0].endpoints[0].ports.http'],
    ['an unknown interception mode', (p: NodePolicy) => void ((p.node as { interceptionMode: unknown }).interceptionMode = 'xdp'), 'node.interceptionMode'],
    ['a negative weight', (p: NodePolicy) => void (p.splits[0]!.backends[0]!.weight = -1), 'splits[0].backends[0].weight'],
    ['an unknown field', (p: NodePolicy) => void ((p as unknown as Record<string, unknown>).extra = 1), '(root)'],
    ['a pod IP that is not an address', (p: NodePolicy) => void (p.pods[0]!.ip = '10.0.0'), 'pods[0].ip'],
  ])('rejects %s, naming the field', (_what, mutate, field) => {
    const p = policy();
    mutate(p);
    const r = NodePolicySchema.safeParse(p);
    expect(r.success).toBe(false);
    if (!r.success) expect(r.error.issues.map((i) => formatPath(i.path))).toContain(field);
  });
});

describe('FSM annotation lists', () => {
  test('port lists: trimmed, deduplicated, sorted', () => {
    expect(parsePortList(' 8080, 80,80 ,')).toEqual([80, 8080]);
    expect(parsePortList('')).toEqual([]);
  });

  test.each([['80,http'], ['0'], ['65536'], ['80-90']])('port list %j names the bad item', (v) => {
    expect(() => parsePortList(v)).toThrow(ListParseError);
  });

  test('CIDR lists: bare addresses become host routes, IPv6 works', () => {
    expect(parseCidrList('10.0.0.0/8, 192.168.1.1,fd00::/8')).toEqual(['10.0.0.0/8', '192.168.1.1/32', 'fd00::/8']);
  });

  test.each([['10.0.0.0/33', 'prefix length'], ['10.0.0/8', 'IP address'], ['10.0.0.0/8/1', 'not a CIDR'], ['fd00::/129', 'prefix length']])('CIDR %j is rejected: %s', (v, why) => {
    let err: unknown;
    try {
      parseCidrList(`10.1.0.0/16,${v}`);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ListParseError);
    expect((err as ListParseError).item).toBe(v);
    expect((err as Error).message).toContain(why);
  });
});
