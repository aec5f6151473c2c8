import { cgroupResolver, desiredState, kubepodsCandidates } from '../../src/policy/desired.js';
import type { PolicyPod } from '../../src/policy/schema.js';
import { baseMesh, compiled, meshConfig, pod } from './policy-fixtures.js';

const proxy = { address: '10.0.0.254', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/sys/fs/cgroup/fsm-node/proxy', uid: 1500 };
const hint = (uid: string, qosClass: PolicyPod['cgroup']['qosClass'], path: string | null = null): PolicyPod => ({
  uid,
  namespace: 'app',
  name: 'p',
  ip: '10.0.0.1',
  serviceAccount: 'default',
  cgroup: { qosClass, path },
  exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] },
});

describe('desiredState', () => {
  test('maps the node policy to the dataplane input', () => {
    const c = compiled([
      ...baseMesh(),
      meshConfig({ inbound: 'strict', outboundPortExclusionList: '53' }),
      pod('cache-1', { ip: '10.0.0.5', uid: 'u-cache', annotations: { 'flomesh.io/outbound-port-exclusion-list': '6379' } }),
    ]);
    const policy = c.get('node-a')!.policy;
    const d = desiredState(policy, {
      proxy,
      nodeAddresses: ['192.168.1.10'],
      cgroupPathFor: (p) => `/cg/${p.name}`,
    });
    expect(d.proxy).toEqual(proxy);
    expect(d.nodeAddresses).toEqual(['192.168.1.10']);
    expect(d.proxySources).toEqual(['10.0.0.254', '192.168.1.10', '192.168.1.11']);
    expect(d.mesh).toEqual({ outboundPorts: [53], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] });
    expect(d.pods.map((p) => p.name).sort()).toEqual(['cache-1', 'db-1', 'web-1']);
    expect(d.pods.find((p) => p.name === 'cache-1')).toEqual({
      uid: 'u-cache',
      namespace: 'app',
      name: 'cache-1',
      ip: '10.0.0.5',
      cgroupPath: '/cg/cache-1',
      inbound: 'strict',
      exclusions: { outboundPorts: [6379], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] },
    });
  });

  test('pods whose cgroup cannot be found are left out; the input policy is not mutated', () => {
    const policy = compiled(baseMesh()).get('node-a')!.policy;
    const snapshot = JSON.stringify(policy);
    const d = desiredState(policy, { proxy, nodeAddresses: [], cgroupPathFor: (p) => (p.name === 'db-1' ? undefined : '/cg/x') });
    expect(d.pods.map((p) => p.name)).toEqual(['web-1']);
    d.pods[0]!.exclusions.outboundPorts.push(1);
    d.mesh.outboundPorts.push(1);
    expect(JSON.stringify(policy)).toBe(snapshot);
  });
});

describe('pod cgroup paths', () => {
  const uid = '1b4e28ba-2fa1-11d2-883f-0016d3cca427';

  test('systemd and cgroupfs kubepods layouts per QoS class', () => {
    expect(kubepodsCandidates(uid, 'Burstable')).toEqual([
      'kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice',
      `kubepods/burstable/pod${uid}`,
    ]);
    expect(kubepodsCandidates(uid, 'Guaranteed')).toEqual(['kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice', `kubepods/pod${uid}`]);
    expect(kubepodsCandidates(uid, null)).toHaveLength(6);
  });

  test('the resolver picks the first layout that exists under the cgroup2 mount', () => {
    const existing = new Set([`/sys/fs/cgroup/kubepods/besteffort/pod${uid}`]);
    const resolve = cgroupResolver('/sys/fs/cgroup', (p) => existing.has(p));
    expect(resolve(hint(uid, null))).toBe(`/sys/fs/cgroup/kubepods/besteffort/pod${uid}`);
    expect(resolve(hint(uid, 'Burstable'))).toBeUndefined();
  });

  test('the lab annotation wins: relative to the mount, or absolute', () => {
    const resolve = cgroupResolver('/sys/fs/cgroup/unified', () => false);
    expect(resolve(hint(uid, 'Burstable', 'fsmt-lab/pod-a'))).toBe('/sys/fs/cgroup/unified/fsmt-lab/pod-a');
    expect(resolve(hint(uid, 'Burstable', '/sys/fs/cgroup/unified/x'))).toBe('/sys/fs/cgroup/unified/x');
  });
});
