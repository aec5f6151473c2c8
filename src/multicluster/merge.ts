import type { ImportPort, ImportType } from './api.js';

/**
 * KEP-1645's rules for turning the exports of one service in several
 * clusters into one ServiceImport, as pure functions: the same inputs give
 * the same import in every cluster, whichever peer answered first.
 *
 * - ports: the union, by port name; a name whose definition (port number,
 *   protocol, appProtocol) differs between clusters takes the oldest export's,
 *   and two names claiming the same port number and protocol keep the oldest;
 * - every other property (type, session affinity): the oldest export's;
 * - "oldest" is the export's creation time, ties broken by cluster id, so
 *   two clusters never disagree on the winner;
 * - a conflict marks every export of the service Conflict=True with the
 *   field, the cluster that won and why (the KEP asks for that much); the
 *   conflicting clusters stay members: the service is still reachable there.
 */

/** One cluster's export of one service, as shared between controllers (no pod addresses). */
export interface ClusterExport {
  cluster: string;
  namespace: string;
  name: string;
  type: ImportType;
  ports: ImportPort[];
  sessionAffinity: 'None' | 'ClientIP';
  /** ServiceExport creation time, epoch ms. */
  exportTime: number;
  /** Ready endpoints of the service in that cluster. */
  readyEndpoints: number;
  /** That cluster's gateway node proxies, "address:port". */
  gateways: string[];
  /** Bumped by the exporting controller whenever anything above changes. */
  generation: number;
}

export interface Condition {
  type: 'Conflict' | 'Valid' | 'Ready';
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
}

export interface MergedImport {
  namespace: string;
  name: string;
  type: ImportType;
  ports: ImportPort[];
  sessionAffinity: 'None' | 'ClientIP';
  /** Exporting clusters, sorted by id (ServiceImport status.clusters). */
  clusters: string[];
  /** The Conflict condition every export of this service gets; status False when none. */
  conflict: Condition;
}

/** Oldest first; equal times by cluster id. */
export function byAge(a: ClusterExport, b: ClusterExport): number {
  return a.exportTime - b.exportTime || (a.cluster < b.cluster ? -1 : a.cluster > b.cluster ? 1 : 0);
}

const portKey = (p: ImportPort) => `${p.port}/${p.protocol}`;
const samePort = (a: ImportPort, b: ImportPort) => a.port === b.port && a.protocol === b.protocol && a.appProtocol === b.appProtocol;

/** The exports of one service (any order, at least one) -> its import. */
export function mergeExports(exports: readonly ClusterExport[]): MergedImport {
  if (exports.length === 0) throw new Error('mergeExports: no exports');
  const sorted = [...exports].sort(byAge);
  const oldest = sorted[0]!;
  const conflicts: string[] = [];
  const note = (field: string, loser: ClusterExport, detail: string) =>
    conflicts.push(`${field}: cluster ${loser.cluster} ${detail}; cluster ${oldest.cluster} has the oldest export and wins`);

  for (const e of sorted.slice(1)) {
    if (e.type !== oldest.type) note('type', e, `exports ${e.type}, not ${oldest.type}`);
    if (e.sessionAffinity !== oldest.sessionAffinity) note('sessionAffinity', e, `has ${e.sessionAffinity}, not ${oldest.sessionAffinity}`);
  }

  // Ports: union by name, older definitions first.
  const byName = new Map<string, { port: ImportPort; from: ClusterExport }>();
  const byNumber = new Map<string, { name: string; from: ClusterExport }>();
  for (const e of sorted) {
    for (const p of e.ports) {
      const had = byName.get(p.name);
      if (had) {
        if (!samePort(had.port, p)) note(`ports[${JSON.stringify(p.name)}]`, e, `defines it as ${portKey(p)}${p.appProtocol ? ` (${p.appProtocol})` : ''}, cluster ${had.from.cluster} as ${portKey(had.port)}`);
        continue;
      }
      const taken = byNumber.get(portKey(p));
      if (taken) {
        note(`ports[${JSON.stringify(p.name)}]`, e, `names port ${portKey(p)} ${JSON.stringify(p.name)}, cluster ${taken.from.cluster} ${JSON.stringify(taken.name)}`);
        continue;
      }
      byName.set(p.name, { port: p, from: e });
      byNumber.set(portKey(p), { name: p.name, from: e });
    }
  }
  const ports = [...byName.values()].map((v) => v.port).sort((a, b) => a.port - b.port || a.protocol.localeCompare(b.protocol));

  const conflict: Condition = conflicts.length
    ? { type: 'Conflict', status: 'True', reason: conflictReason(conflicts), message: conflicts.join('; ') }
    : { type: 'Conflict', status: 'False', reason: 'NoConflicts', message: 'all exports agree' };
  return {
    namespace: oldest.namespace,
    name: oldest.name,
    type: oldest.type,
    ports,
    sessionAffinity: oldest.sessionAffinity,
    clusters: sorted.map((e) => e.cluster).sort(),
    conflict,
  };
}

function conflictReason(conflicts: string[]): string {
  const fields = new Set(conflicts.map((c) => c.split(':')[0]!.replace(/\[.*$/, '')));
  if (fields.size > 1) return 'MultipleConflicts';
  return { type: 'TypeConflict', sessionAffinity: 'SessionAffinityConflict', ports: 'PortConflict' }[[...fields][0]!] ?? 'Conflict';
}

/** All exports of the clusterset -> one import per service (ns/name), sorted by key. */
export function mergeAll(exports: readonly ClusterExport[]): MergedImport[] {
  const groups = new Map<string, ClusterExport[]>();
  for (const e of exports) {
    const k = `${e.namespace}/${e.name}`;
    let g = groups.get(k);
    if (!g) groups.set(k, (g = []));
    g.push(e);
  }
  return [...groups.keys()].sort().map((k) => mergeExports(groups.get(k)!));
}
