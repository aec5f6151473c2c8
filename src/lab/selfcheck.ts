import { readFileSync } from 'node:fs';
import { errorMessage } from '../errors.js';
import { ensureBpffs, BPFFS_ROOT } from './bpffs.js';
import { hostNetworkSnapshot, startEchoServer, tcpProbe, type EchoServer } from './net-probe.js';
import { Topology, sweep, topologyObjects } from './topology.js';

export const SELFCHECK_PREFIX = 'fsmlab-selfcheck';
const ECHO_PORT = 8080;

/** The cgroup v2 path of a process ("0::/a/b" line of /proc/<pid>/cgroup). */
function cgroup2PathOf(pid: number): string | undefined {
  const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'));
  return line?.slice(3);
}

/**
 * Build 2 nodes x 2 pods, send real TCP between every ordered pair of pods
 * (same node and across nodes), check each server runs in its pod's cgroup,
 * tear everything down and verify nothing is left and the host network
 * namespace is unchanged. `fsm-node lab selfcheck` prints the lines.
 */
export async function topologySelfCheck(): Promise<{ ok: boolean; lines: string[] }> {
  const lines: string[] = [];
  let ok = true;
  const check = (pass: boolean, what: string): void => {
    if (!pass) ok = false;
    lines.push(`${pass ? 'ok  ' : 'FAIL'}  ${what}`);
  };

  if (await ensureBpffs()) lines.push(`note  mounted bpffs at ${BPFFS_ROOT} (it was not mounted)`);
  const swept = await sweep(SELFCHECK_PREFIX);
  if (swept.length > 0) lines.push(`note  removed ${swept.length} leftovers of an earlier self-check`);

  const hostBefore = await hostNetworkSnapshot();
  let topo: Topology | undefined;
  const servers: EchoServer[] = [];
  try {
    topo = await Topology.create({ prefix: SELFCHECK_PREFIX, nodes: 2, podsPerNode: 2 });
    const pods = topo.nodes.flatMap((n) => n.pods);
    check(true, `created ${topo.nodes.length} nodes x 2 pods: ${pods.map((p) => `${p.name}@${p.node.name}=${p.ip}`).join(' ')}`);
    for (const pod of pods) {
      const server = await startEchoServer(pod, pod.name, ECHO_PORT);
      servers.push(server);
      const cgPath = cgroup2PathOf(server.pid);
      check(cgPath !== undefined && pod.cgroupPath.endsWith(cgPath), `${pod.name}: server pid ${server.pid} runs in cgroup ${cgPath}`);
    }
    for (const from of pods) {
      for (const to of pods) {
        if (from === to) continue;
        const where = from.node === to.node ? 'same node' : 'cross node';
        const what = `${from.name} -> ${to.name} (${to.ip}:${ECHO_PORT}, ${where})`;
        try {
          const answer = await tcpProbe(from, to.ip, ECHO_PORT, 'ping');
          check(answer === `${to.name} ${from.ip} ping`, `${what}: "${answer}"`);
        } catch (err) {
          check(false, `${what}: ${errorMessage(err)}`);
        }
      }
    }
  } catch (err) {
    check(false, `self-check aborted: ${errorMessage(err)}`);
  } finally {
    for (const s of servers) await s.stop().catch(() => undefined);
    await topo?.destroy().catch((err: unknown) => check(false, `destroy failed: ${errorMessage(err)}`));
  }

  const left = await topologyObjects(SELFCHECK_PREFIX);
  check(left.length === 0, left.length === 0 ? 'destroy left nothing (netns, cgroups, bpffs)' : `left behind: ${left.join(', ')}`);
  check(hostBefore === (await hostNetworkSnapshot()), 'host network namespace unchanged (links, addresses, routes, iptables)');
  lines.push(ok ? 'self-check passed' : 'self-check FAILED');
  return { ok, lines };
}
