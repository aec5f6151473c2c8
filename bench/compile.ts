import { gzipSync } from 'node:zlib';
import { PolicyCompiler } from '../src/policy/compiler.js';
import type { Kind } from '../src/policy/objects.js';
import { shapeFlags, syntheticChanges, syntheticCluster, type ClusterShape } from './synthetic-cluster.js';
import { intFlag, quantile, round } from './util.js';

/**
 * compile: a synthetic cluster (default 10k pods, 2k services, 100 nodes,
 * a split per 10 services, a target per 4) compiled from scratch, then one
 * change at a time. Prints per traffic policy mode:
 *   full:        ingest (per-object checks) + compile of every node, RSS after;
 *   incremental: one change (endpoint port, split weight, pod added, pod
 *                deleted) from upsert to new versions, p50/p99 over samples.
 * Targets: full < 1000 ms, incremental < 10 ms, RSS < 256 MiB.
 */




export async function run(flags: Record<string, string | boolean>): Promise<object[]> {
  const base = shapeFlags(flags);
  const samples = intFlag(flags, 'samples', 50);
  const modes = typeof flags.mode === 'string' ? [flags.mode as ClusterShape['trafficPolicy']] : (['permissive', 'smi'] as const);
  const out: object[] = [];
  for (const trafficPolicy of modes) {
    const shape: ClusterShape = { ...base, trafficPolicy };
    let objects = syntheticCluster(shape);
    global.gc?.();
    const compiler = new PolicyCompiler();
    const t0 = performance.now();
    for (const o of objects) compiler.upsert(o.kind as Kind, o);
    const t1 = performance.now();
    const first = compiler.compile();
    const t2 = performance.now();
    objects = [];
    global.gc?.();
    const sample = compiler.get('node-1')!;
    const json = sample.json();
    out.push({
      bench: 'compile',
      phase: 'full',
      traffic_policy: trafficPolicy,
      nodes: shape.nodes,
      pods: shape.pods,
      services: shape.services,
      ingest_ms: round(t1 - t0),
      compile_ms: round(t2 - t1),
      full_ms: round(t2 - t0),
      nodes_compiled: first.changed.length,
      issues: compiler.reporter.active().length,
      rss_mib: Math.round(process.memoryUsage().rss / 2 ** 20),
      heap_used_mib: Math.round(process.memoryUsage().heapUsed / 2 ** 20),
      gc_exposed: typeof global.gc === 'function',
      node_policy_services: sample.policy.services.length,
      node_policy_json_bytes: Buffer.byteLength(json),
      node_policy_gzip_bytes: gzipSync(json).length,
    });

    const change = syntheticChanges(shape);
    const changes: Record<string, (i: number) => void> = {
      endpoint_port: (i) => compiler.upsert('EndpointSlice', change.endpointPort(i).slice),
      split_weight: (i) => compiler.upsert('TrafficSplit', change.splitWeight(i)),
      pod_added: (i) => compiler.upsert('Pod', change.pod(shape.pods + i)),
      pod_deleted: (i) => {
        const { metadata } = change.pod(shape.pods + i);
        compiler.remove({ kind: 'Pod', namespace: String(metadata.namespace), name: String(metadata.name) });
      },
    };
    for (const [change, apply] of Object.entries(changes)) {
      const times: number[] = [];
      let changed = 0;
      for (let i = 0; i < samples; i++) {
        const s = performance.now();
        apply(i);
        const r = compiler.compile();
        times.push(performance.now() - s);
        changed += r.changed.length;
      }
      out.push({
        bench: 'compile',
        phase: 'incremental',
        traffic_policy: trafficPolicy,
        change,
        samples,
        p50_ms: round(quantile(times, 0.5)),
        p99_ms: round(quantile(times, 0.99)),
        max_ms: round(Math.max(...times)),
        nodes_changed_per_change: changed / samples,
      });
    }
    out.push({ bench: 'compile', phase: 'after', traffic_policy: trafficPolicy, rss_mib: Math.round(process.memoryUsage().rss / 2 ** 20) });
  }
  return out;
}
