import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent, type AgentProxy, type PolicyFeed } from '../../src/agent/agent.js';
import type { AgentConfig } from '../../src/agent/config.js';
import type { ProbeReport } from '../../src/agent/probe.js';
import type { SyncRunner } from '../../src/agent/sync-runner.js';
import { noExclusions, type Dataplane, type DesiredState } from '../../src/dataplane/types.js';
import { POLICY_API_VERSION, type NodePolicy } from '../../src/policy/schema.js';

/**
 * What a CNI ADD's sync does and skips (src/agent/agent.ts sync): with fakes
 * for the feed, proxy, renderer and dataplane, counting calls. The real
 * kernel path of an ADD is covered by test/kernel/cni-enrol.test.ts.
 */

const policyOf = (version: string, pods: string[]): NodePolicy => ({
  apiVersion: POLICY_API_VERSION,
  kind: 'NodePolicy',
  version,
  mesh: { name: 'fsm', inbound: 'strict', interceptionMode: 'auto', egress: 'allow', trafficPolicy: 'permissive', exclusions: noExclusions() },
  proxies: [],
  node: { name: 'n1', addresses: ['192.168.0.1'], interceptionMode: null, monitoredNamespaces: ['app'] },
  meshPods: [],
  pods: pods.map((name, i) => ({ uid: `uid-${name}`, namespace: 'app', name, ip: `10.1.0.${i + 1}`, serviceAccount: 'sa', cgroup: { qosClass: null, path: `/cg/${name}` }, exclusions: noExclusions() })),
  access: [],
  services: [],
  splits: [],
});

class Feed implements PolicyFeed {
  private listener: () => void = () => {};
  constructor(public policy: NodePolicy) {}
  current() {
    return { policy: this.policy, receivedAt: Date.now() };
  }
  set(p: NodePolicy): void {
    this.policy = p;
    this.listener();
  }
  onChange(fn: () => void): void {
    this.listener = fn;
  }
  start(): void {}
  async stop(): Promise<void> {}
  fetchErrors(): number {
    return 0;
  }
}

const report: ProbeReport = { platform: { arch: 'x64', kernel: '6.1', distro: 'test', release: '12', cpus: 2, memTotalBytes: 1 }, checks: [], support: {}, probedAt: 'now' };

describe('agent: pods-only syncs (CNI ADD/DEL)', () => {
  let dir: string;
  let agent: Agent | undefined;
  afterEach(async () => {
    await agent?.stop();
    agent = undefined;
    rmSync(dir, { recursive: true, force: true });
  });

  function setup() {
    dir = mkdtempSync(join(tmpdir(), 'fsmt-agent-podsonly-'));
    const feed = new Feed(policyOf('00000000000000a1', ['web']));
    const calls = { render: 0, proxyConfig: 0, deliver: 0, identities: 0 };
    const applied: Array<{ desired: DesiredState; full: boolean }> = [];
    const dataplane: Dataplane = {
      mode: 'iptables',
      apply: async (desired, o) => {
        applied.push({ desired, full: o?.full === true });
        return { full: o?.full === true, changes: 0, durationMs: 0 };
      },
      installed: async () => ({ mode: 'iptables', pods: [], detail: {} }),
      cleanup: async () => ({ removed: [] }),
      close: async () => {},
    };
    const proxy: AgentProxy = {
      start() {},
      detach() {},
      status: () => ({ kind: 'fake', up: true, listening: true, restarts: 0 }),
      ready: () => true,
      deliver: async () => {
        calls.deliver++;
        return { changed: false, applied: false, ms: 0 };
      },
    };
    const config = {
      node: 'n1',
      mode: 'iptables',
      stateDir: join(dir, 'state'),
      listen: '127.0.0.1:0',
      cniSocket: join(dir, 'cni.sock'),
      cniSpool: join(dir, 'spool'),
      cniFailurePolicy: 'auto',
      cniConfDirs: [],
      cniBinDir: join(dir, 'bin'),
    } as unknown as AgentConfig;
    agent = new Agent(config, {
      policy: feed,
      probe: async () => report,
      dataplane: () => dataplane,
      render: (p) => {
        calls.render++;
        return {
          proxy: { address: '192.168.0.1', outboundPort: 15001, inboundPort: 15003, cgroupPath: '/cg/proxy' },
          nodeAddresses: [],
          proxySources: [],
          mesh: noExclusions(),
          pods: p.pods.map((x) => ({ uid: x.uid, namespace: x.namespace, name: x.name, ip: x.ip, cgroupPath: x.cgroup.path!, inbound: p.mesh.inbound, exclusions: x.exclusions })),
        };
      },
      proxy,
      proxyConfig: () => {
        calls.proxyConfig++;
        return {};
      },
      identities: () =>
        ({
          update: async () => {
            calls.identities++;
          },
          stop: async () => {},
          expired: () => [],
          status: () => ({}),
          snapshot: () => new Map(),
          retryNow: () => 0,
        }) as never,
    });
    // What the CNI handler does after recording an early pod (CniHooks.syncNow), without a pod cgroup to find.
    const runner = (agent as unknown as { runner: SyncRunner }).runner;
    const cniSync = (reason: string) => runner.requestAndWait(reason, { podsOnly: true });
    return { agent, feed, calls, applied, cniSync, runner };
  }

  const early = (name: string, ip: string) => ({ containerId: `c-${name}`, namespace: 'app', name, uid: `uid-${name}`, ip, cgroupPath: `/cg/${name}`, netns: '/proc/self/ns/net', at: 't' });

  test('an ADD applies the early pod but neither renders the policy again nor touches identities or the proxy; a policy change does all of it again', async () => {
    const { agent, feed, calls, applied, cniSync } = setup();
    await agent.start();
    await cniSync('settle'); // after the first (full) sync
    const before = { ...calls };
    expect(before).toEqual({ render: 1, proxyConfig: 1, deliver: 1, identities: 1 });

    agent.cni!.store.add(early('new', '10.1.0.9'));
    await cniSync('cni add app/new');
    expect(calls).toEqual(before);
    const last = applied.at(-1)!;
    expect(last.full).toBe(false);
    expect(last.desired.pods.map((p) => p.ip)).toEqual(['10.1.0.1', '10.1.0.9']);
    expect((agent.state() as { sync: { last: { ms: Record<string, number> } } }).sync.last.ms).not.toHaveProperty('proxy');

    // The policy moves on (it names the new pod): rendered afresh, identities and proxy follow.
    const p2 = policyOf('00000000000000a2', ['web', 'new']);
    const settled = new Promise<void>((resolve) => {
      const t = setInterval(() => {
        if ((agent.state() as { applied?: { version: string } }).applied?.version === p2.version) {
          clearInterval(t);
          resolve();
        }
      }, 5);
    });
    feed.set(p2);
    await settled;
    expect(calls).toEqual({ render: 2, proxyConfig: 2, deliver: 2, identities: 2 });
    // The policy's pod took the early entry's address and cgroup: no duplicate.
    expect(applied.at(-1)!.desired.pods.map((p) => p.uid)).toEqual(['uid-web', 'uid-new']);

    // A DEL (pods only again): no rendering, no proxy.
    agent.cni!.store.remove('c-new', { namespace: 'app', name: 'new', uid: 'uid-new' }, '10.1.0.2');
    await cniSync('cni del app/new');
    expect(calls).toEqual({ render: 2, proxyConfig: 2, deliver: 2, identities: 2 });
    expect(applied.at(-1)!.desired.pods.map((p) => p.uid)).toEqual(['uid-web']);
  });

  test('a full sync renders afresh and offers the proxy its configuration, pods-only or not', async () => {
    const { agent, calls, cniSync, runner } = setup();
    await agent.start();
    await cniSync('settle');
    runner.request('periodic repair', { full: true, podsOnly: true });
    await new Promise((r) => setTimeout(r, 50));
    await cniSync('after');
    expect(calls.render).toBe(2);
    expect(calls.deliver).toBe(2);
  });

  test('a request that is not pods-only merged into an ADD\'s run (identity change) makes the run do the proxy again, from the memoised rendering', async () => {
    const { agent, calls, cniSync, runner } = setup();
    await agent.start();
    await cniSync('settle');
    runner.request('identity certificates changed');
    agent.cni!.store.add(early('x', '10.1.0.7'));
    await cniSync('cni add app/x');
    expect(calls).toEqual({ render: 1, proxyConfig: 2, deliver: 2, identities: 2 });
  });
});
