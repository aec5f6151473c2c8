import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import type { MulticlusterStatus } from '../../multicluster/controller.js';
import { isOurs } from '../processes.js';
import type { LabCluster, LabState } from '../state.js';
import { uplinkUp } from './net.js';

/**
 * The clusters of a cluster lab for `lab status` (key `clusters` of --json):
 * per cluster its controller, clusterset listener and peers, uplink, nodes
 * (gateways marked), pods, the Services of its manifests, and its exports
 * and imports with their clusterset IPs as its controller reports them
 * (<state-dir>/multicluster/status.json).
 */

/** The controller's multicluster status (status.json), or undefined before it wrote one. */
export function readClusterStatus(c: Pick<LabCluster, 'controller'>): MulticlusterStatus | undefined {
  try {
    return JSON.parse(readFileSync(join(c.controller.stateDir, 'multicluster', 'status.json'), 'utf8')) as MulticlusterStatus;
  } catch {
    return undefined;
  }
}

export interface ClusterView {
  name: string;
  underlayCidr: string;
  router: { netns: string; address: string };
  /** up, down (cut by `lab link`), or gone (its namespace does not exist). */
  uplink: 'up' | 'down' | 'gone';
  controller: { url: string; pid?: number; up: boolean };
  /** The controller's clusterset listener, its peers as it sees them, and the relay that carries that traffic over the uplinks. */
  clusterset: { url: string; peers: MulticlusterStatus['peers']; relay: { pid?: number; up: boolean } };
  nodes: { name: string; underlayIp: string; gateway: boolean }[];
  pods: { name: string; node: string; ip: string }[];
  services: { namespace: string; name: string; clusterIP: string | null; ports: number[] }[];
  exports: MulticlusterStatus['exports'];
  imports: MulticlusterStatus['imports'];
}

interface ServiceDoc {
  kind?: string;
  metadata?: { name?: string; namespace?: string };
  spec?: { clusterIP?: string; ports?: { port?: number }[] };
}

/** The Services of a manifests directory (what the cluster's controller reads). */
export function manifestServices(dir: string): ClusterView['services'] {
  const out: ClusterView['services'] = [];
  let files: string[];
  try {
    files = readdirSync(dir, { recursive: true, encoding: 'utf8' }).filter((f) => /\.ya?ml$/.test(f) && !f.split('/').pop()!.startsWith('.'));
  } catch {
    return out;
  }
  for (const f of files.sort()) {
    for (const d of parseAllDocuments(readFileSync(join(dir, f), 'utf8'))) {
      const o = d.errors.length ? undefined : (d.toJS() as ServiceDoc | null);
      if (o?.kind !== 'Service' || !o.metadata?.name) continue;
      out.push({ namespace: o.metadata.namespace ?? 'default', name: o.metadata.name, clusterIP: o.spec?.clusterIP ?? null, ports: (o.spec?.ports ?? []).map((p) => p.port ?? 0) });
    }
  }
  return out;
}

async function clusterView(state: LabState, c: LabCluster): Promise<ClusterView> {
  const mc = readClusterStatus(c);
  const ctl = c.controller.process;
  const up = await uplinkUp(c.uplink);
  const nodes = state.nodes.filter((n) => n.cluster === c.name);
  return {
    name: c.name,
    underlayCidr: c.underlayCidr,
    router: { netns: c.uplink.routerNetns, address: c.routerIp },
    uplink: up === undefined ? 'gone' : up ? 'up' : 'down',
    controller: { url: c.controller.url, ...(ctl ? { pid: ctl.pid } : {}), up: ctl !== undefined && isOurs(ctl) },
    clusterset: { url: c.clustersetUrl, peers: mc?.peers ?? [], relay: { ...(c.relay ? { pid: c.relay.pid } : {}), up: c.relay !== undefined && isOurs(c.relay) } },
    nodes: nodes.map((n) => ({ name: n.name, underlayIp: n.underlayIp, gateway: c.gateways.includes(n.name) })),
    pods: state.pods.filter((p) => nodes.some((n) => n.name === p.node)).map((p) => ({ name: p.name, node: p.node, ip: p.ip })),
    services: manifestServices(c.manifests),
    exports: mc?.exports ?? [],
    imports: mc?.imports ?? [],
  };
}

export function gatherClusters(state: LabState): Promise<ClusterView[]> {
  return Promise.all((state.clusters ?? []).map((c) => clusterView(state, c)));
}

/** Lines for the human `lab status` (pure). */
export function renderClusters(clusters: readonly ClusterView[]): string[] {
  const lines: string[] = [];
  for (const c of clusters) {
    const peers = c.clusterset.peers.map((p) => `${p.cluster} ${p.error ? `ERROR (${p.error})` : `ok, ${p.exports} exports`}${p.leaseExpired ? ', lease expired' : ''}`).join('; ') || 'none yet';
    lines.push(`cluster ${c.name}: controller ${c.controller.url} ${c.controller.up ? `up (pid ${c.controller.pid})` : 'DOWN'}${c.clusterset.relay.up ? '' : ', clusterset relay DOWN'}; uplink ${c.uplink === 'up' ? 'up' : c.uplink.toUpperCase()} (${c.underlayCidr} via ${c.router.netns} ${c.router.address}); peers: ${peers}`);
    lines.push(`  nodes: ${c.nodes.map((n) => `${n.name}${n.gateway ? ' (gateway)' : ''}`).join(' ')}; services: ${c.services.map((s) => `${s.name}.${s.namespace} ${s.clusterIP ?? 'headless'}`).join(', ') || 'none'}`);
    for (const e of c.exports) lines.push(`  export ${e.name}.${e.namespace}: ${e.readyEndpoints} ready; ${e.conditions.map((x) => `${x.type}=${x.status} ${x.reason}`).join(', ')}`);
    for (const i of c.imports) lines.push(`  import ${i.name}.${i.namespace}: clusterset IP ${i.ips[0] ?? '-'} (${i.type}), from ${i.clusters.join(' ')}, tiers ${i.tiers.map((t) => t.join('+')).join(' > ')}`);
  }
  return lines;
}
