import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mergeEnrolled, EnrolledStore, type EnrolledPod } from '../../src/cni/enrolled.js';
import { handleCni, type HandlerDeps } from '../../src/cni/handler.js';
import { CniService } from '../../src/cni/service.js';
import { decodeRequest, encodeRequest, parseCniArgs } from '../../src/cni/protocol.js';
import { noExclusions, type DesiredState } from '../../src/dataplane/types.js';
import { POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';
import { rootLogger } from '../../src/util/log.js';

/** The agent's CNI decisions (src/cni/handler.ts, enrolled.ts) with a fake sync: pure logic, no kernel. */

const prev = (ip: string) => ({ cniVersion: '1.0.0', interfaces: [{ name: 'eth0' }], ips: [{ address: `${ip}/32`, interface: 0 }] });
const policy = (pods: Array<{ name: string; ip: string }> = [], extra: Partial<NodePolicy['node']> = {}): NodePolicy => ({
  apiVersion: POLICY_API_VERSION,
  kind: 'NodePolicy',
  version: '0000000000000001',
  mesh: { name: 'fsm', inbound: 'strict', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
  proxies: [],
  node: { name: 'n1', addresses: [], interceptionMode: null, monitoredNamespaces: ['app'], optedOutPods: ['app/optout'], ...extra },
  meshPods: [],
  pods: pods.map((p) => ({ uid: `uid-${p.name}`, namespace: 'app', name: p.name, ip: p.ip, serviceAccount: 'sa', cgroup: { qosClass: null, path: `/cg/${p.name}` }, exclusions: { ...noExclusions(), outboundPorts: [9] } })),
  access: [],
  services: [],
  splits: [],
});
const desiredOf = (p: NodePolicy): DesiredState => ({
  proxy: { address: '10.0.0.1', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/proxy' },
  nodeAddresses: [],
  proxySources: [],
  mesh: noExclusions(),
  pods: p.pods.map((x) => ({ uid: x.uid, namespace: x.namespace, name: x.name, ip: x.ip, cgroupPath: x.cgroup.path!, inbound: 'strict', exclusions: x.exclusions })),
});

describe('CNI enrolment logic', () => {
  let dir: string;
  let store: EnrolledStore;
  let current: NodePolicy | undefined;
  let applied: Set<string>;
  let syncs: number;
  let deps: HandlerDeps;
  const req = (command: string, name: string, containerId: string, ip?: string, ns = 'app', failurePolicy = 'fail-closed') =>
    decodeRequest(
      encodeRequest(
        { CNI_COMMAND: command, CNI_CONTAINERID: containerId, CNI_NETNS: `/run/netns/${containerId}`, CNI_IFNAME: 'eth0', CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=${ns};K8S_POD_NAME=${name};K8S_POD_UID=uid-${name}` },
        JSON.stringify({ cniVersion: '1.0.0', name: 'k8s', type: 'fsm-node-cni', failurePolicy, ...(ip ? { prevResult: prev(ip) } : {}) }),
      ),
    );
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'fsmt-cni-logic-'));
    store = new EnrolledStore(join(dir, 'cni-enrolled'));
    current = policy();
    applied = new Set();
    syncs = 0;
    deps = {
      store,
      policy: () => current,
      // The fake sync applies what a real one would: the policy's pods plus the early ones.
      syncNow: async () => {
        syncs++;
        applied = new Set(mergeEnrolled(desiredOf(current!), current!, store.list(), store.deletions()).pods.map((p) => p.ip));
      },
      enrolled: (ip) => applied.has(ip),
      notEnrolling: () => undefined,
      findCgroup: (o) => ({ path: `/cg/pod-${o.uid}`, how: 'test' }),
      log: rootLogger.child({ module: 'test' }),
    };
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  test('CNI_ARGS parsing names a malformed pair', () => {
    expect(parseCniArgs('A=1;B=x=y;')).toEqual({ A: '1', B: 'x=y' });
    expect(() => parseCniArgs('A=1;oops')).toThrow(/CNI_ARGS is not KEY=VALUE/);
  });

  test('ADD of a monitored pod enrols it before answering with prevResult unchanged; a restarted agent still has it', async () => {
    const a = await handleCni(req('ADD', 'web', 'c1', '10.1.0.5'), deps);
    expect(a).toEqual({ exitCode: 0, stdout: `${JSON.stringify(prev('10.1.0.5'))}\n` });
    expect(syncs).toBe(1);
    expect(applied.has('10.1.0.5')).toBe(true);
    expect(new EnrolledStore(join(dir, 'cni-enrolled')).list().map((p) => p.ip)).toEqual(['10.1.0.5']);
  });

  test('unmonitored namespace, opted-out pod, non-Kubernetes ADD: passed through, not enrolled', async () => {
    for (const r of [req('ADD', 'x', 'c1', '10.1.0.6', 'other'), req('ADD', 'optout', 'c2', '10.1.0.7')]) {
      expect((await handleCni(r, deps)).exitCode).toBe(0);
    }
    expect(store.list()).toEqual([]);
    expect(syncs).toBe(0);
  });

  test('strict: no policy yet or the pod not applied is a CNI error; fail-open lets the pod start', async () => {
    current = undefined;
    const a = await handleCni(req('ADD', 'web', 'c1', '10.1.0.5'), deps);
    expect(a.exitCode).toBe(1);
    expect(JSON.parse(a.stdout)).toMatchObject({ code: 11, msg: expect.stringContaining('no policy yet') });
    expect((await handleCni(req('ADD', 'web', 'c1', '10.1.0.5', 'app', 'fail-open'), deps)).exitCode).toBe(0);
    current = policy();
    deps.syncNow = async () => undefined; // the sync ran but could not apply (no interception mode works)
    deps.notEnrolling = () => 'no interception mode works: ...';
    const b = await handleCni(req('ADD', 'web', 'c2', '10.1.0.5'), deps);
    expect(JSON.parse(b.stdout)).toMatchObject({ code: 11, details: 'no interception mode works: ...' });
    expect((await handleCni(req('ADD', 'web', 'c3'), deps)).stdout).toMatch(/chained after the primary CNI/);
  });

  test('the policy naming the pod keeps its identity and exclusions; a recreated sandbox keeps the pod enrolled at its new address; DEL of the old one does not undo it', async () => {
    await handleCni(req('ADD', 'web', 'old', '10.1.0.5'), deps);
    current = policy([{ name: 'web', ip: '10.1.0.5' }]);
    let merged = mergeEnrolled(desiredOf(current), current, store.list(), store.deletions());
    expect(merged.pods).toEqual([expect.objectContaining({ uid: 'uid-web', ip: '10.1.0.5', cgroupPath: '/cg/pod-uid-web', exclusions: expect.objectContaining({ outboundPorts: [9] }) })]);
    // New sandbox, new address, before the policy catches up.
    await handleCni(req('ADD', 'web', 'new', '10.1.0.9'), deps);
    expect((await handleCni(req('DEL', 'web', 'old'), deps)).exitCode).toBe(0);
    merged = mergeEnrolled(desiredOf(current), current, store.list(), store.deletions());
    expect(merged.pods.map((p) => p.ip)).toEqual(['10.1.0.9']);
    // DEL of the live sandbox: gone, also while the policy still names the pod at that address.
    current = policy([{ name: 'web', ip: '10.1.0.9' }]);
    await handleCni(req('DEL', 'web', 'new'), deps);
    expect(mergeEnrolled(desiredOf(current), current, store.list(), store.deletions()).pods).toEqual([]);
    // The policy drops the pod: the mark goes too.
    current = policy();
    store.prune(current, () => true);
    expect(store.deletions()).toEqual([]);
  });

  test('the store keeps one small file per sandbox (an ADD writes one pod, not the store), takes over the single file of earlier versions, and survives a restart', () => {
    const early = (i: number, extra: Partial<EnrolledPod> = {}): EnrolledPod => ({ containerId: `c${i}`, namespace: 'app', name: `p${i}`, uid: `uid-p${i}`, ip: `10.1.1.${i}`, cgroupPath: `/cg/p${i}`, netns: `/run/netns/c${i}`, at: 't', ...extra });
    writeFileSync(join(dir, 'cni-enrolled.json'), JSON.stringify({ pods: [early(1), early(2)], deleted: [{ namespace: 'app', name: 'old', uid: 'uid-old', ip: '10.1.1.9' }] }));
    const s1 = new EnrolledStore(join(dir, 'moved'), { legacyFile: join(dir, 'cni-enrolled.json') });
    expect(existsSync(join(dir, 'cni-enrolled.json'))).toBe(false);
    expect(s1.list().map((p) => p.containerId)).toEqual(['c1', 'c2']);
    expect(readdirSync(join(dir, 'moved', 'pods')).sort()).toEqual(['c1.json', 'c2.json']);
    s1.add(early(3));
    s1.remove('c1', undefined, undefined);
    expect(readdirSync(join(dir, 'moved', 'pods')).sort()).toEqual(['c2.json', 'c3.json']);
    const s2 = new EnrolledStore(join(dir, 'moved'));
    expect(s2.list().map((p) => p.ip)).toEqual(['10.1.1.2', '10.1.1.3']);
    expect(s2.deletions().map((d) => d.name).sort()).toEqual(['old', 'p1']);
    // A new sandbox at an address an early pod still holds: that one is gone (its DEL never came).
    s2.add(early(4, { ip: '10.1.1.2' }));
    expect(s2.list().map((p) => p.containerId)).toEqual(['c3', 'c4']);
    expect(new EnrolledStore(join(dir, 'moved')).list().map((p) => p.containerId)).toEqual(['c3', 'c4']);
  });

  test('mergeEnrolled matches early pods by uid, or by name when a uid is missing; hands back the same entry while its inputs are unchanged; leaves out a stale policy entry at an early pod\'s address', () => {
    const pol = policy([
      { name: 'a', ip: '10.1.0.1' },
      { name: 'b', ip: '10.1.0.2' },
      { name: 'c', ip: '10.1.0.3' },
    ]);
    const base = desiredOf(pol);
    const e = (name: string, ip: string, uid = `uid-${name}`): EnrolledPod => ({ containerId: `c-${name}`, namespace: 'app', name, uid, ip, cgroupPath: `/cg/live-${name}`, netns: '/run/netns/x', at: 't' });
    // a: by uid; b: the runtime gave no uid, matched by name; d: only early, now at c's old address (c is gone).
    const pods = [e('a', '10.1.0.11'), e('b', '10.1.0.12', ''), e('d', '10.1.0.3')];
    const m1 = mergeEnrolled(base, pol, pods, []);
    expect(m1.pods.map((p) => [p.uid, p.ip, p.cgroupPath])).toEqual([
      ['uid-a', '10.1.0.11', '/cg/live-a'],
      ['uid-b', '10.1.0.12', '/cg/live-b'],
      ['uid-d', '10.1.0.3', '/cg/live-d'],
    ]);
    expect(m1.pods[0]!.exclusions.outboundPorts).toEqual([9]); // the policy's exclusions stay
    const m2 = mergeEnrolled(base, pol, pods, []);
    expect(m2.pods.every((p, i) => p === m1.pods[i])).toBe(true);
    // A recreated sandbox of a: a new entry for a only.
    const m3 = mergeEnrolled(base, pol, [e('a', '10.1.0.21'), pods[1]!, pods[2]!], []);
    expect(m3.pods[0]).not.toBe(m1.pods[0]);
    expect(m3.pods[0]!.ip).toBe('10.1.0.21');
    expect(m3.pods.slice(1).every((p, i) => p === m1.pods[i + 1])).toBe(true);
    // The mesh turns permissive: early-only entries follow.
    const permissive = { ...pol, mesh: { ...pol.mesh, inbound: 'permissive' as const } };
    expect(mergeEnrolled(base, permissive, pods, []).pods[2]!.inbound).toBe('permissive');
  });

  test('the agent looks for gone sandboxes on full syncs and policy changes, not on the syncs ADDs wait for', () => {
    const svc = new CniService({ socket: join(dir, 'cni.sock'), spool: join(dir, 'spool'), stateDir: join(dir, 'state'), failurePolicy: 'auto' }, { policy: () => current, syncNow: async () => undefined, enrolled: () => false, notEnrolling: () => undefined });
    // Its netns and cgroup do not exist: a sandbox whose DEL the agent never heard.
    svc.store.add({ containerId: 'gone', namespace: 'app', name: 'gone', uid: 'uid-gone', ip: '10.1.0.8', cgroupPath: join(dir, 'no-cgroup'), netns: join(dir, 'no-netns'), at: 't' });
    const pol = current!;
    svc.merge(desiredOf(pol), pol, { full: true }); // the first sync of a policy prunes...
    expect(svc.store.list()).toEqual([]);
    svc.store.add({ containerId: 'gone2', namespace: 'app', name: 'gone2', uid: 'uid-gone2', ip: '10.1.0.9', cgroupPath: join(dir, 'no-cgroup'), netns: join(dir, 'no-netns'), at: 't' });
    // ...an ADD's sync of the same policy does not (and so enrols it, as the ADD asked)...
    expect(svc.merge(desiredOf(pol), pol, { full: false }).pods.map((p) => p.ip)).toEqual(['10.1.0.9']);
    // ...a new policy or a full sync does.
    const next = policy();
    expect(svc.merge(desiredOf(next), next, { full: false }).pods).toEqual([]);
    expect(svc.store.list()).toEqual([]);
  });

  test('an early pod whose sandbox is gone is pruned; DEL never fails', async () => {
    await handleCni(req('ADD', 'web', 'c1', '10.1.0.5'), deps);
    store.prune(current, (p: EnrolledPod) => p.containerId !== 'c1');
    expect(store.list()).toEqual([]);
    deps.syncNow = async () => {
      throw new Error('boom');
    };
    expect(await handleCni(req('DEL', 'web', 'c1'), deps)).toEqual({ exitCode: 0, stdout: '' });
    expect(await handleCni(req('DEL', 'web', ''), deps)).toEqual({ exitCode: 0, stdout: '' });
  });
});
