import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { InvalidInputError } from '../../errors.js';
import { run } from '../../util/exec.js';
import { underlayAddress, underlayNetnsName } from '../topology.js';

/**
 * The network of a cluster lab: every cluster is a topology of its own
 * (src/lab/topology.ts, prefix `fsmlab-c<k>`) with its own pod subnets and its
 * own underlay subnet, and one router namespace joins the underlays:
 *
 *   [c1 nodes] ul0 10.78.0.i --br0 [fsmlab-c1-ul]-- up0 <-veth-> c1 10.78.0.253 [fsmlab-rt]
 *   [c2 nodes] ul0 10.80.0.i --br0 [fsmlab-c2-ul]-- up0 <-veth-> c2 10.80.0.253 [fsmlab-rt]
 *
 * A cluster's uplink is that veth: `lab link c1 --down` takes its bridge end
 * down, and c1 is cut from every other cluster while its own nodes still
 * reach each other. Each node routes the other clusters' underlays via the
 * router's address on its own underlay. Pod subnets are not routed between
 * clusters: no pod address crosses (the MCS design, docs/multicluster.md);
 * traffic between clusters goes node proxy -> gateway node proxy.
 *
 * Pure functions for names and addresses; the two that touch the kernel
 * only act inside the lab's own namespaces.
 */

export const MAX_CLUSTERS = 4;
/** Cluster k uses pod subnets 10.(75+2k).<node>.0/24 and the underlay 10.(76+2k).0.0/24: c1 is the usual lab's 10.77/10.78. */
export const clusterSubnetBase = (k: number): number => 75 + 2 * k;
export const clusterName = (k: number): string => `c${k}`;
export const clusterPrefix = (labPrefix: string, k: number): string => `${labPrefix}-${clusterName(k)}`;
export const routerNetnsName = (labPrefix: string): string => `${labPrefix}-rt`;
export const underlayCidr = (subnetBase: number): string => `10.${subnetBase + 1}.0.0/24`;
/** The router's leg on a cluster's underlay bridge (.254 is the bridge's own services address). */
export const routerAddress = (subnetBase: number): string => underlayAddress(subnetBase, 253);
/** The uplink veth: `up0` on the cluster's underlay bridge, `c<k>` in the router. */
export const UPLINK_DEV = 'up0';

export function validateClusterCount(n: unknown): number {
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 2 || n > MAX_CLUSTERS) {
    throw new InvalidInputError('--clusters', n, `must be an integer from 2 to ${MAX_CLUSTERS} (a clusterset needs at least two clusters)`);
  }
  return n;
}

/** Lines for the router's `ip -batch` once its legs exist: addresses and links up. */
export function renderRouterIpBatch(clusters: number): string[] {
  const lines = ['link set lo up'];
  for (let k = 1; k <= clusters; k++) lines.push(`addr add ${routerAddress(clusterSubnetBase(k))}/24 dev ${clusterName(k)}`, `link set ${clusterName(k)} up`);
  return lines;
}

/**
 * Routes of cluster k's nodes (dev ul0) and of its underlay namespace itself
 * (dev br0, where the clusterset relay listens): every other cluster's
 * underlay via the router's leg on k's underlay.
 */
export function renderNodeClusterRoutes(k: number, clusters: number, dev = 'ul0'): string[] {
  const lines: string[] = [];
  for (let j = 1; j <= clusters; j++) {
    if (j !== k) lines.push(`route add ${underlayCidr(clusterSubnetBase(j))} via ${routerAddress(clusterSubnetBase(k))} dev ${dev}`);
  }
  return lines;
}

async function ipBatch(netns: string, lines: string[]): Promise<void> {
  await run('ip', ['-n', netns, '-batch', '-'], { input: `${lines.join('\n')}\n` });
}

/**
 * The router namespace and one uplink per cluster (each cluster's topology
 * exists already), then each node's routes to the other clusters. Everything
 * is named under the lab prefix, so `lab down`'s sweep removes it, also after
 * a failure half-way.
 */
export async function createRouter(labPrefix: string, clusters: { index: number; nodeNetns: string[] }[]): Promise<{ netns: string }> {
  const rt = routerNetnsName(labPrefix);
  await run('ip', ['netns', 'add', rt]);
  await run('nsenter', [`--net=${join('/run/netns', rt)}`, '--', 'sysctl', '-q', '-w', 'net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=0', 'net.ipv4.conf.default.rp_filter=0']);
  for (const c of clusters) {
    const ul = underlayNetnsName(clusterPrefix(labPrefix, c.index));
    await run('ip', ['-n', ul, 'link', 'add', UPLINK_DEV, 'type', 'veth', 'peer', 'name', clusterName(c.index), 'netns', rt]);
    await ipBatch(ul, [`link set ${UPLINK_DEV} master br0`, `link set ${UPLINK_DEV} up`]);
  }
  await ipBatch(rt, renderRouterIpBatch(clusters.length));
  for (const c of clusters) {
    for (const ns of c.nodeNetns) await ipBatch(ns, renderNodeClusterRoutes(c.index, clusters.length));
    await ipBatch(underlayNetnsName(clusterPrefix(labPrefix, c.index)), renderNodeClusterRoutes(c.index, clusters.length, 'br0'));
  }
  return { netns: rt };
}

/** Is the uplink's bridge end administratively up? undefined when its namespace is gone. */
export async function uplinkUp(uplink: { netns: string; dev: string }): Promise<boolean | undefined> {
  if (!existsSync(join('/run/netns', uplink.netns))) return undefined;
  const r = await run('ip', ['-n', uplink.netns, '-o', 'link', 'show', uplink.dev], { allowFail: true });
  if (r.code !== 0) return undefined;
  return /<[^>]*\bUP\b[^>]*>/.test(r.stdout);
}
