import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse } from 'yaml';
import { notReady } from '../../src/lab/clusters/check.js';
import { describeClusterLink, renderClusterLinkCommands } from '../../src/lab/clusters/link.js';
import { linkActionFromFlags as clusterLinkAction } from '../../src/lab/faults.js';
import { defaultTrafficPolicy, expectedTiers, gatewayNodes, renderClusterManifests, renderClusterMulticluster, renderTrafficPolicy } from '../../src/lab/clusters/manifests.js';
import { clusterPrefix, clusterSubnetBase, renderNodeClusterRoutes, renderRouterIpBatch, routerAddress, underlayCidr, validateClusterCount } from '../../src/lab/clusters/net.js';
import { manifestServices, renderClusters, type ClusterView } from '../../src/lab/clusters/status.js';
import { clustersetIngress, clustersetPort, clusterControllerPort, peerEgressPort, renderClusterSet } from '../../src/lab/clusters/up.js';
import { parseEgress } from '../../src/lab/clusters/relay.js';
import { parseClusterSet, parseGlobalTrafficPolicy, parseServiceExport } from '../../src/multicluster/api.js';
import { matchesSweepPrefix, ownedByTopology, underlayNetnsName } from '../../src/lab/topology.js';
import { compileFiles } from './lab-fixtures.js';

const nodes = [
  { name: 'c2-n1', address: '10.80.0.1' },
  { name: 'c2-n2', address: '10.80.0.2' },
  { name: 'c2-n3', address: '10.80.0.3' },
];
const pods = [
  { name: 'c2-p1', node: 'c2-n1', ip: '10.79.1.2', cgroupPath: '/cg/fsmlab-c2-n1/pods/c2-p1', version: 'v1' as const },
  { name: 'c2-p2', node: 'c2-n2', ip: '10.79.2.2', cgroupPath: '/cg/fsmlab-c2-n2/pods/c2-p2', version: 'v1' as const },
];


describe('cluster lab network', () => {
  test('each cluster has its own pod and underlay subnets; c1 keeps the usual lab addresses', () => {
    expect([1, 2, 3, 4].map(clusterSubnetBase)).toEqual([77, 79, 81, 83]);
    expect(underlayCidr(clusterSubnetBase(1))).toBe('10.78.0.0/24');
    expect(underlayCidr(clusterSubnetBase(2))).toBe('10.80.0.0/24');
    expect(routerAddress(clusterSubnetBase(2))).toBe('10.80.0.253');
  });

  test('a node routes only the other clusters\' underlays, via the router leg on its own underlay', () => {
    expect(renderNodeClusterRoutes(2, 3)).toEqual(['route add 10.78.0.0/24 via 10.80.0.253 dev ul0', 'route add 10.82.0.0/24 via 10.80.0.253 dev ul0']);
    // No pod subnet (10.77/10.79 ...) is routed across.
    expect(renderNodeClusterRoutes(1, 2).join(' ')).not.toMatch(/10\.79\./);
    expect(renderRouterIpBatch(2)).toEqual(['link set lo up', 'addr add 10.78.0.253/24 dev c1', 'link set c1 up', 'addr add 10.80.0.253/24 dev c2', 'link set c2 up']);
  });

  test('every name stays under the lab prefix (lab down sweeps it) and apart from the single lab\'s own', () => {
    const p = clusterPrefix('fsmlab', 2);
    for (const n of [`${p}-n1`, `${p}-n1-c2-p1`, underlayNetnsName(p), 'fsmlab-rt']) expect(matchesSweepPrefix(n, 'fsmlab')).toBe(true);
    expect(ownedByTopology(`${p}-n1`, 'fsmlab')).toBe(false);
    expect(ownedByTopology(`${p}-n1-c2-p1`, p)).toBe(true);
  });

  test('--clusters is 2 to 4', () => {
    expect(validateClusterCount(2)).toBe(2);
    expect(() => validateClusterCount(1)).toThrow(/--clusters.*at least two/);
    expect(() => validateClusterCount(5)).toThrow(/from 2 to 4/);
  });
});

describe('cluster lab manifests', () => {
  const files = renderClusterManifests({ cluster: 'c2', clusters: ['c1', 'c2'], mode: 'iptables', nodes, pods });

  test('compile without an issue; the first two nodes are the clusterset gateways', () => {
    const compiler = compileFiles(files);
    expect(compiler.reporter.active()).toEqual([]);
    expect(gatewayNodes(nodes)).toEqual(['c2-n1', 'c2-n2']);
    expect(compiler.gatewayNodes().map((g) => `${g.node}=${g.addresses.join(',')}`)).toEqual(['c2-n1=10.80.0.1', 'c2-n2=10.80.0.2']);
    const p = compiler.get('c2-n1')!.policy;
    // Permissive: the source identity does not cross clusters yet, and smi would refuse every remote request.
    expect(p.mesh).toMatchObject({ interceptionMode: 'iptables', trafficPolicy: 'permissive' });
    expect(p.services.find((s) => s.name === 'echo')!.endpoints.map((e) => e.ip).sort()).toEqual(['10.79.1.2', '10.79.2.2']);
  });

  test('the multicluster directory holds a valid export (c1 the oldest) and a FailOver policy naming the others', () => {
    const c1 = renderClusterMulticluster({ cluster: 'c1', clusters: ['c1', 'c2'] });
    const c2 = renderClusterMulticluster({ cluster: 'c2', clusters: ['c1', 'c2'] });
    const e1 = parseServiceExport(parse(c1.get('exports.yaml')!));
    const e2 = parseServiceExport(parse(c2.get('exports.yaml')!));
    expect([e1.namespace, e1.name]).toEqual(['demo', 'echo']);
    expect(e1.createdMs).toBeLessThan(e2.createdMs);
    expect(parseGlobalTrafficPolicy(parse(c2.get('policy.yaml')!)).spec).toEqual({ mode: 'FailOver', weights: {}, failOver: ['c1'] });
    expect(defaultTrafficPolicy('c1', ['c1', 'c2', 'c3'])).toEqual({ mode: 'FailOver', failOver: ['c2', 'c3'] });
    expect(parseGlobalTrafficPolicy(parse(renderTrafficPolicy({ mode: 'ActiveActive', weights: { c1: 3 } }))).spec.weights).toEqual({ c1: 3 });
  });

  test('expected tiers follow the controller\'s rule', () => {
    expect(expectedTiers({ mode: 'Locality' }, 'c2', ['c1', 'c2'])).toEqual([['c2']]);
    expect(expectedTiers({ mode: 'ActiveActive' }, 'c2', ['c1', 'c2'])).toEqual([['c1', 'c2']]);
    expect(expectedTiers({ mode: 'FailOver', failOver: ['c1'] }, 'c2', ['c1', 'c2'])).toEqual([['c2'], ['c1']]);
  });

  test('the ClusterSet file of each cluster is valid for the controller and names every other cluster', () => {
    const cs = parseClusterSet(parse(renderClusterSet(2, 3)));
    expect(cs.clusterId).toBe('c2');
    expect(cs.listen).toBe(`127.0.0.1:${clustersetPort(2)}`);
    // Peers are reached through this cluster's relay (over the uplinks), never directly on loopback.
    expect(cs.peers).toEqual([
      { clusterId: 'c1', url: `https://127.0.0.1:${peerEgressPort(2, 1)}` },
      { clusterId: 'c3', url: `https://127.0.0.1:${peerEgressPort(2, 3)}` },
    ]);
    expect(cs.caFile).toBe('../ca.crt');
    expect(clustersetIngress(1)).toBe('10.78.0.254:15444');
    // Node API, clusterset listener and relay egress ports of all clusters are distinct.
    const ks = [1, 2, 3, 4];
    const ports = ks.flatMap((k) => [clusterControllerPort(k), clustersetPort(k), ...ks.filter((j) => j !== k).map((j) => peerEgressPort(k, j))]);
    expect(new Set(ports).size).toBe(ports.length);
  });

  test('lab check\'s "not ready" pods leave the Service but stay enrolled (the client pod is one of them)', () => {
    const changed = new Map([...files].map(([k, v]) => [k, k === 'pods/c2-p1.yaml' ? notReady(v) : v]));
    const compiler = compileFiles(changed);
    expect(compiler.reporter.active()).toEqual([]);
    const p = compiler.get('c2-n1')!.policy;
    expect(p.services.find((s) => s.name === 'echo')!.endpoints.map((e) => e.ip)).toEqual(['10.79.2.2']);
    expect(p.pods.map((x) => x.name)).toEqual(['c2-p1']);
  });

  test('lab status lists the Services of a manifests directory', () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmn-lab-clusters-'));
    try {
      for (const [name, text] of files) {
        mkdirSync(join(dir, name, '..'), { recursive: true });
        writeFileSync(join(dir, name), text);
      }
      writeFileSync(join(dir, '.hidden.yaml'), 'kind: Service\nmetadata: {name: nope}\n');
      expect(manifestServices(dir)).toEqual([{ namespace: 'demo', name: 'echo', clusterIP: '10.96.0.10', ports: [8080] }]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('clusterset relay', () => {
  test('egress is LOCALPORT=IPv4:PORT, checked by name', () => {
    expect(parseEgress('15447=10.80.0.254:15444')).toEqual({ localPort: 15447, target: { host: '10.80.0.254', port: 15444 } });
    expect(() => parseEgress('15447')).toThrow(/--egress/);
    expect(() => parseEgress('x=10.80.0.254:15444')).toThrow(/--egress/);
    expect(() => parseEgress('15447=host:15444')).toThrow(/IPv4:PORT/);
  });
});

describe('lab link CLUSTER', () => {
  const c = { uplink: { netns: 'fsmlab-c1-ul', dev: 'up0', routerNetns: 'fsmlab-rt', routerDev: 'c1' } };

  test('takes exactly one action, with values checked by name', () => {
    expect(clusterLinkAction({ down: true })).toEqual({ kind: 'down' });
    expect(clusterLinkAction({ delay: '50', loss: '1.5' })).toEqual({ kind: 'shape', shape: { delayMs: 50, lossPct: 1.5 } });
    expect(() => clusterLinkAction({})).toThrow(/exactly one/);
    expect(() => clusterLinkAction({ down: true, up: true })).toThrow(/exactly one/);
    expect(() => clusterLinkAction({ delay: '-1' })).toThrow(/--delay/);
    expect(() => clusterLinkAction({ loss: '101' })).toThrow(/--loss/);
  });

  test('cuts at the bridge end and shapes both ends, only inside lab namespaces', () => {
    expect(renderClusterLinkCommands(c, { kind: 'down' })).toEqual([{ cmd: 'ip', args: ['-n', 'fsmlab-c1-ul', 'link', 'set', 'up0', 'down'] }]);
    const shape = renderClusterLinkCommands(c, { kind: 'shape', shape: { delayMs: 20 } });
    expect(shape.map((s) => s.args.slice(0, 2))).toEqual([
      ['-n', 'fsmlab-c1-ul'],
      ['-n', 'fsmlab-rt'],
    ]);
    expect(shape[0]!.args).toEqual(['-n', 'fsmlab-c1-ul', 'qdisc', 'replace', 'dev', 'up0', 'root', 'netem', 'delay', '20ms']);
    const clear = renderClusterLinkCommands(c, { kind: 'clear' });
    expect(clear[clear.length - 1]!.args).toEqual(['-n', 'fsmlab-c1-ul', 'link', 'set', 'up0', 'up']);
    for (const step of [...shape, ...clear]) expect(step.args[1]).toMatch(/^fsmlab-/);
    expect(describeClusterLink('c1', { kind: 'down' })).toMatch(/^c1: uplink down/);
  });
});

describe('lab status of clusters', () => {
  test('one line per cluster with controller, uplink and peers, then its exports and imports with clusterset IPs', () => {
    const v: ClusterView = {
      name: 'c1',
      underlayCidr: '10.78.0.0/24',
      router: { netns: 'fsmlab-rt', address: '10.78.0.253' },
      uplink: 'down',
      controller: { url: 'https://127.0.0.1:15443', pid: 42, up: true },
      clusterset: { url: 'https://127.0.0.1:15444', peers: [{ cluster: 'c2', url: 'https://127.0.0.1:15447', lastSeen: null, error: null, exports: 1, leaseExpired: false }], relay: { pid: 43, up: true } },
      nodes: [
        { name: 'c1-n1', underlayIp: '10.78.0.1', gateway: true },
        { name: 'c1-n3', underlayIp: '10.78.0.3', gateway: false },
      ],
      pods: [],
      services: [{ namespace: 'demo', name: 'echo', clusterIP: '10.96.0.10', ports: [8080] }],
      exports: [{ namespace: 'demo', name: 'echo', readyEndpoints: 2, conditions: [{ type: 'Valid', status: 'True', reason: 'Exported', message: '' }] }],
      imports: [{ namespace: 'demo', name: 'echo', type: 'ClusterSetIP', ips: ['241.0.3.4'], clusters: ['c1', 'c2'], ports: [8080], tiers: [['c1:1'], ['c2:1']] }],
    };
    const lines = renderClusters([v]);
    expect(lines[0]).toMatch(/^cluster c1: controller https:\/\/127\.0\.0\.1:15443 up \(pid 42\); uplink DOWN .*peers: c2 ok, 1 exports$/);
    expect(lines[1]).toBe('  nodes: c1-n1 (gateway) c1-n3; services: echo.demo 10.96.0.10');
    expect(lines).toContain('  import echo.demo: clusterset IP 241.0.3.4 (ClusterSetIP), from c1 c2, tiers c1:1 > c2:1');
  });
});
