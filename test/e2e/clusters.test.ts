import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CheckReport } from '../../src/lab/check.js';
import type { LabStatus } from '../../src/lab/status.js';
import { cgroup2Root } from '../../src/util/cgroup.js';
import { cli, labNames, pipyLabSkipReason } from '../support/lab-e2e.js';

/**
 * The two-cluster lab end to end, through the real CLI (`npm run build:ts`
 * first): `lab up --clusters 2` with Pipy, `lab status --json` lists the
 * clusters with their imports and clusterset IPs, `lab check` passes the
 * cases inside the clusters and across them (ActiveActive, Locality,
 * FailOver, c1's uplink cut and restored; the cases that need a gateway to
 * reach an endpoint on another node are a known gap, pinned below),
 * `lab link` refuses what it cannot do, and `lab down` leaves nothing: no
 * fsmlab namespace (the router's included), cgroup or bpffs dir.
 * Skips when a user's lab exists (the lab's names are fixed).
 */


const skip = pipyLabSkipReason();
if (skip) console.warn(`e2e cluster lab tests skipped: ${skip}`);
const maybe = skip ? describe.skip : describe;

maybe('the two-cluster lab (lab up --clusters 2)', () => {
  let dir = '';

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'fsmt-e2e-clusters-'));
    const up = await cli('lab', 'up', '--clusters', '2', '--nodes', '2', '--pods-per-node', '1', '--proxy', 'pipy', '--mode', 'iptables', '--dir', join(dir, 'lab'));
    if (up.code !== 0) throw new Error(`lab up --clusters 2 failed (${up.code}): ${up.stderr}${up.stdout}`);
    expect(up.stdout).toMatch(/^CLUSTER +NODE +MODE +GATEWAY/m);
    expect(up.stdout).toMatch(/^c1: underlay 10\.78\.0\.0\/24 .*clusterset IP 241\./m);
  }, 240_000);

  afterAll(async () => {
    const down = await cli('lab', 'down');
    if (dir) rmSync(dir, { recursive: true, force: true });
    expect(down.stdout).toMatch(/verified none left/);
    expect([...labNames('/run/netns'), ...labNames(cgroup2Root()), ...labNames('/sys/fs/bpf')]).toEqual([]);
  }, 120_000);

  test('lab status --json lists clusters, nodes, pods, services and imports with clusterset IPs', async () => {
    const r = await cli('lab', 'status', '--json');
    const s = JSON.parse(r.stdout) as LabStatus;
    expect(r.code).toBe(0);
    expect(s.clusters?.map((c) => c.name)).toEqual(['c1', 'c2']);
    for (const c of s.clusters!) {
      expect(c.controller.up).toBe(true);
      expect(c.uplink).toBe('up');
      expect(c.nodes.map((n) => [n.name, n.gateway])).toEqual([
        [`${c.name}-n1`, true],
        [`${c.name}-n2`, true],
      ]);
      expect(c.pods.map((p) => p.name)).toEqual([`${c.name}-p1`, `${c.name}-p2`]);
      expect(c.services).toEqual([expect.objectContaining({ namespace: 'demo', name: 'echo', clusterIP: '10.96.0.10' })]);
      const imp = c.imports.find((i) => i.name === 'echo')!;
      expect(imp.clusters).toEqual(['c1', 'c2']);
      expect(imp.ips[0]).toMatch(/^241\.0\.\d+\.\d+$/);
      expect(c.clusterset.peers).toEqual([expect.objectContaining({ cluster: c.name === 'c1' ? 'c2' : 'c1', error: null })]);
    }
    expect(s.nodes.map((n) => n.name)).toEqual(['c1-n1', 'c1-n2', 'c2-n1', 'c2-n2']);
  }, 60_000);

  // One run of `lab check`, judged by the two tests below.
  let report: CheckReport | undefined;
  let checkExit = -1;
  /** The cases that need a gateway to forward to an endpoint on another node of its cluster (the gateway identity's hop). */
  const gatewayHop = /gateways \(|echo servers stopped|pods not ready/;

  test('lab check: inside each cluster, the clusterset, each policy, the uplink cut and restored', async () => {
    const r = await cli('lab', 'check', '--json');
    checkExit = r.code;
    report = JSON.parse(r.stdout) as CheckReport;
    const names = report.cases.map((c) => c.name).join('\n');
    for (const want of [/c1: service echo/, /c2: service echo/, /by pod IP \(across clusters\)/, /c2 imports echo\.demo from every cluster/, /ActiveActive: answers from every cluster/, /Locality: only c2/, /FailOver c2 > c1: local first/, /echo servers stopped .*failed over/, /pods not ready \(no local endpoints\): the next cluster serves/, /c1's uplink cut: failed over/, /c1's uplink restored/]) {
      expect(names).toMatch(want);
    }
    expect(report.cases.filter((c) => !gatewayHop.test(c.name) && c.result !== 'pass')).toEqual([]);
    // The check put back what it changed: the uplink is up and c2's policy is FailOver again.
    const s = JSON.parse((await cli('lab', 'status', '--json')).stdout) as LabStatus;
    expect(s.clusters!.map((c) => c.uplink)).toEqual(['up', 'up']);
    expect(s.clusters![1]!.imports.find((i) => i.name === 'echo')!.tiers).toEqual([['c2:1'], ['c1:1']]);
  }, 300_000);

  // Needs a gateway to forward to an endpoint on another node of its cluster: the gateway's own identity
  // vouches for the source across that hop (docs/multicluster.md); failed on main before that.
  test('lab check: gateways reach every endpoint of their cluster; failover when the local endpoints go', () => {
    expect(report).toBeDefined();
    expect(report!.cases.filter((c) => gatewayHop.test(c.name) && c.result !== 'pass')).toEqual([]);
    expect(checkExit).toBe(0);
  });

  test('lab link names a cluster and says clearly what it cannot do', async () => {
    const bad = await cli('lab', 'link', 'c9', '--down');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/CLUSTER.*c9.*clusters: c1, c2/);
    const none = await cli('lab', 'link', 'c1');
    expect(none.stderr).toMatch(/exactly one of --down, --up, --clear/);
    const down = await cli('lab', 'link', 'c1', '--down');
    expect(down.stdout).toMatch(/c1: uplink down/);
    expect((JSON.parse((await cli('lab', 'status', '--json')).stdout) as LabStatus).clusters![0]!.uplink).toBe('down');
    expect((await cli('lab', 'link', 'c1', '--clear')).code).toBe(0);
    expect((JSON.parse((await cli('lab', 'status', '--json')).stdout) as LabStatus).clusters![0]!.uplink).toBe('up');
  }, 60_000);
});
