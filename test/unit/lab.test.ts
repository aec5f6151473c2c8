import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { expectIntercepted, judgePodCase, meshView } from '../../src/lab/check.js';
import { chooseProxy, labAttachmentsIn, summarizeRemoved } from '../../src/lab/lab.js';
import { deniedPair, renderManifests } from '../../src/lab/manifests.js';
import type { LabNode, LabPod } from '../../src/lab/state.js';
import { compileFiles, labInput } from './lab-fixtures.js';

const input = labInput;

const compile = compileFiles;

describe('lab manifests', () => {
  test('compile without a single issue into one policy per node with its own pods', () => {
    const compiler = compile(renderManifests(input));
    expect(compiler.reporter.active()).toEqual([]);
    const n1 = compiler.get('n1')!.policy;
    expect(n1.mesh).toMatchObject({ name: 'fsmlab', interceptionMode: 'ebpf', trafficPolicy: 'smi' });
    expect(n1.pods.map((p) => [p.name, p.ip, p.cgroup.path]).sort()).toEqual([
      ['p1', '10.77.1.2', '/cg/fsmlab-n1/pods/p1'],
      ['p2', '10.77.1.3', '/cg/fsmlab-n1/pods/p2'],
    ]);
    expect(compiler.get('n2')!.policy.pods.map((p) => p.name).sort()).toEqual(['p3', 'p4']);
  });

  test('hold the services, the 80/20 split and access rules that deny exactly one pair', () => {
    const n1 = compile(renderManifests(input)).get('n1')!.policy;
    const echo = n1.services.find((s) => s.name === 'echo')!;
    expect(echo.endpoints.map((e) => e.ip).sort()).toEqual(['10.77.1.2', '10.77.1.3', '10.77.2.2', '10.77.2.3']);
    expect(n1.services.find((s) => s.name === 'echo-v2')!.endpoints.map((e) => e.ip).sort()).toEqual(['10.77.1.3', '10.77.2.3']);
    expect(n1.splits).toEqual([
      expect.objectContaining({ name: 'echo-canary', service: 'echo', backends: [{ service: 'echo-v2', weight: 100 }], matches: [expect.objectContaining({ pathRegex: '/canary(/.*)?' })] }),
      expect.objectContaining({ name: 'echo-split', service: 'echo', backends: [{ service: 'echo-v1', weight: 80 }, { service: 'echo-v2', weight: 20 }], matches: [] }),
    ]);
    expect(deniedPair(input.pods)).toEqual({ from: 'p4', to: 'p1' });
    const toP1 = n1.access.find((a) => a.destination.serviceAccount === 'p1')!;
    expect(toP1.sources.map((s) => s.serviceAccount).sort()).toEqual(['p1', 'p2', 'p3']);
  });
});

describe('lab check expectations', () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'fsmlab-unit-'));
    for (const [name, text] of renderManifests(input)) {
      mkdirSync(dirname(join(dir, name)), { recursive: true });
      writeFileSync(join(dir, name), text);
    }
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  test('read the 80/20 split and the canary (the split with matches) apart', () => {
    const view = meshView(dir);
    expect(Object.fromEntries(view.split)).toEqual({ 'echo-v1': 80, 'echo-v2': 20 });
    expect([...view.canary]).toEqual(['echo-v2']);
  });

  test('follow the manifests: a removed pod or an excluded port is not intercepted', () => {
    expect(expectIntercepted(meshView(dir), 'p2', 8080)).toBe(true);
    rmSync(join(dir, 'pods', 'p2.yaml'));
    writeFileSync(
      join(dir, 'pods', 'p3.yaml'),
      renderManifests(input).get('pods/p3.yaml')!.replace('annotations:\n', 'annotations:\n    flomesh.io/outbound-port-exclusion-list: "8080"\n'),
    );
    const view = meshView(dir);
    expect(expectIntercepted(view, 'p2', 8080)).toBe(false);
    expect(expectIntercepted(view, 'p3', 8080)).toBe(false);
    expect(expectIntercepted(view, 'p3', 9090)).toBe(true);
    expect(expectIntercepted(view, 'p1', 8080)).toBe(true);
  });
});

describe('judging one request', () => {
  const node: LabNode = {
    name: 'n1', index: 1, netns: 'fsmlab-n1', gateway: '10.77.1.1', underlayIp: '10.78.0.1', podCidr: '10.77.1.0/24',
    podsCgroup: '', proxyCgroup: '', bpffsDir: '', stateDir: '', tokenFile: '', agentUrl: '',
  };
  const pod = (name: string, nodeName: string, ip: string): LabPod => ({ name, node: nodeName, ip, netns: '', cgroupPath: '', version: 'v1' });
  const p1 = pod('p1', 'n1', '10.77.1.2');
  const p2 = pod('p2', 'n1', '10.77.1.3');
  const p3 = pod('p3', 'n2', '10.77.2.2');
  const answer = (name: string, peer: string) => ({ ok: true, status: 200, localPort: 40000, body: JSON.stringify({ pod: name, peer, method: 'GET', path: '/' }) });
  const rec = (dst: string) => ({ event: 'open', source: '10.77.1.2', sourcePort: 40000, originalDst: { address: dst, port: 8080 } });

  test('passes a same-node hop through the proxy that stayed on the node', () => {
    const r = judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, answer('p2', '10.77.1.1'), [rec('10.77.1.3')]);
    expect(r.result).toBe('pass');
    expect(r.reason).toMatch(/stayed on n1/);
  });

  test('passes a cross-node hop seen from the node underlay address', () => {
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [rec('10.77.2.2')]).result).toBe('pass');
  });

  test('an older connection from the same source port (to another pod) does not stand in for this one', () => {
    // Linux reuses a source port for other destinations; the log spans the lab's life.
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [rec('10.77.1.3'), rec('10.77.2.2')]).result).toBe('pass');
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [rec('10.77.2.2'), rec('10.77.1.3')]).result).toBe('fail');
  });

  test('a connection whose source port conntrack rewrote is found by its source address, when it is the only one', () => {
    // iptables REDIRECT: an earlier connection from port 40000 (to another pod, in TIME_WAIT) holds the reply
    // tuple proxy:15001 <- p1:40000, so the kernel gave this one another port; the proxy logged 51234.
    const moved = { ...rec('10.77.2.2'), sourcePort: 51234 };
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [moved]).result).toBe('pass');
    // Two opens from p1 and neither on its port: which one is this request's cannot be told.
    const other = { ...rec('10.77.2.2'), sourcePort: 51235 };
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [moved, other]).result).toBe('fail');
    // Another pod's record never stands in.
    expect(judgePodCase({ from: p1, to: p3, fromNode: node, intercepted: true }, answer('p3', '10.78.0.1'), [{ ...moved, source: '10.77.1.3' }]).result).toBe('fail');
  });

  test('fails when the proxy has no record of the connection (not intercepted)', () => {
    const r = judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, answer('p2', '10.77.1.2'), []);
    expect(r).toMatchObject({ result: 'fail', reason: expect.stringMatching(/no record/) });
  });

  test('fails on a wrong original destination, a wrong answer or a failed request', () => {
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, answer('p2', '10.77.1.1'), [rec('10.77.1.9')]).result).toBe('fail');
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, answer('p3', '10.77.1.1'), [rec('10.77.1.3')]).result).toBe('fail');
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, { ok: false, error: 'ECONNREFUSED' }, []).result).toBe('fail');
  });

  test('fails a same-node hop that left the node (server saw the underlay address)', () => {
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: true }, answer('p2', '10.78.0.1'), [rec('10.77.1.3')]).result).toBe('fail');
  });

  test('a pod out of the mesh must go direct: a proxy record fails it', () => {
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: false }, answer('p2', '10.77.1.2'), []).result).toBe('pass');
    expect(judgePodCase({ from: p1, to: p2, fromNode: node, intercepted: false }, answer('p2', '10.77.1.1'), [rec('10.77.1.3')]).result).toBe('fail');
  });
});

describe('proxy choice', () => {
  test('auto falls back to passthrough and says why; pipy without a binary is an error naming the flag', () => {
    const auto = chooseProxy('auto', { PATH: '/nonexistent' }, false);
    expect(auto.kind).toBe('passthrough');
    expect(auto.note).toMatch(/no Pipy binary found.*NOT enforced/);
    expect(() => chooseProxy('pipy', { PATH: '/nonexistent' }, true)).toThrow(/--proxy.*pipy/);
    expect(chooseProxy('auto', { PIPY_BIN: process.execPath }, false).note).toMatch(/proxy program/);
    expect(chooseProxy('auto', { PIPY_BIN: process.execPath }, true).kind).toBe('pipy');
  });
});

describe('lab down output', () => {
  test('counts what cleanup removed per part and kind', () => {
    expect(summarizeRemoved([])).toBe('nothing installed');
    expect(
      summarizeRemoved(['ebpf: removed link connect4 (id 7)', 'ebpf: removed link inbound (id 8)', 'ebpf: removed map pin fsm_pods', 'iptables: removed chain FSMN_OUTBOUND', 'proxy: stopped']),
    ).toBe('ebpf: 3 removed (2 link, 1 map); iptables: 1 removed (1 chain); proxy: stopped');
  });
});

test('the leftover check finds BPF attachments on lab cgroups only', () => {
  const tree = [
    'CgroupPath',
    'ID       AttachType      AttachFlags     Name',
    '/sys/fs/cgroup/unified/fsmlab-n1/pods',
    '    3027     cgroup_inet4_connect multi           fsm_connect4',
    '/sys/fs/cgroup/unified/fsmt123-n1/pods',
    '    3028     cgroup_inet4_connect multi           fsm_connect4',
    '/sys/fs/cgroup/unified/system.slice',
    '    12       cgroup_device   multi',
  ].join('\n');
  expect(labAttachmentsIn(tree)).toEqual(['bpf attachment on /sys/fs/cgroup/unified/fsmlab-n1/pods: 3027 cgroup_inet4_connect multi fsm_connect4']);
});
