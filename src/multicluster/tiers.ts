import type { GlobalTrafficPolicySpec } from './api.js';

/**
 * Where traffic to an imported service may go, in order: a list of tiers,
 * each a set of clusters with weights. The proxy uses the first tier that has
 * something usable (a ready local endpoint; a live tunnel to a cluster's
 * gateway) and moves to the next at once when it has not; within a tier it
 * balances by weight.
 *
 * - no GlobalTrafficPolicy: the MCS default, one tier with every exporting
 *   cluster at weight 1 (the KEP's ServiceImport reaches all of them);
 * - Locality: this cluster only (nothing when it does not export the service);
 * - ActiveActive: one tier, every exporting cluster at its weight (default 1,
 *   0 leaves it out);
 * - FailOver: this cluster first, then the clusters of `failOver` in that
 *   order, then the other exporters by id, one tier each.
 *
 * Pure: used by the controller to compile imports, and by tests.
 */
export interface TierMember {
  cluster: string;
  weight: number;
}
export type Tier = TierMember[];

export function tiersFor(spec: GlobalTrafficPolicySpec | undefined, localCluster: string, exporters: readonly string[]): Tier[] {
  const members = [...new Set(exporters)].sort();
  if (!spec) return members.length ? [members.map((cluster) => ({ cluster, weight: 1 }))] : [];
  switch (spec.mode) {
    case 'Locality':
      return members.includes(localCluster) ? [[{ cluster: localCluster, weight: 1 }]] : [];
    case 'ActiveActive': {
      const tier = members.map((cluster) => ({ cluster, weight: spec.weights[cluster] ?? 1 })).filter((m) => m.weight > 0);
      return tier.length ? [tier] : [];
    }
    case 'FailOver': {
      const order = [localCluster, ...spec.failOver, ...members];
      const seen = new Set<string>();
      const tiers: Tier[] = [];
      for (const c of order) {
        if (seen.has(c) || !members.includes(c)) continue;
        seen.add(c);
        tiers.push([{ cluster: c, weight: 1 }]);
      }
      return tiers;
    }
  }
}
