import { gzipSync } from 'node:zlib';
import { PolicyCompiler } from '../src/policy/compiler.js';
import type { Kind } from '../src/policy/objects.js';
import { endpointSlice, pod, syntheticCluster, type ClusterShape } from './synthetic-cluster.js';
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
  const base = {
    nodes: intFlag(flags, 'nodes', 100),
    pods: intFlag(flags, 'pods', 10_000),
    services: intFlag(flags, 'services', 2000),
    namespaces: intFlag(flags, 'namespaces', 20),
  };
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

    const perNs = Math.ceil(shape.services / shape.namespaces);
    const nsOf = (svc: number) => `ns-${Math.floor(svc / perNs)}`;
    const podsOf = (svc: number) => Array.from({ length: Math.ceil(shape.pods / shape.services) }, (_, k) => svc + k * shape.services).filter((p) => p < shape.pods);
    const changes: Record<string, (i: number) => void> = {
      endpoint_port: (i) => {
        const svc = (i * 37) % shape.services;
        compiler.upsert('EndpointSlice', endpointSlice(svc, nsOf(svc), podsOf(svc), shape.nodes, 9000 + i));
      },
      split_weight: (i) => {
        const s = ((i * 7) % Math.floor(shape.services / 10)) * 10;
        compiler.upsert('TrafficSplit', {
          apiVersion: 'split.smi-spec.io/v1alpha2',
          kind: 'TrafficSplit',
          metadata: { name: `split-${s}`, namespace: nsOf(s) },
          spec: { service: `svc-${s}`, backends: [{ service: `svc-${s + 1}`, weight: 50 + i }, { service: `svc-${s + 2}`, weight: 50 }] },
        });
      },
      pod_added: (i) => {
        const p = shape.pods + i;
        const svc = p % shape.services;
        compiler.upsert('Pod', pod(p, svc, nsOf(svc), `sa-${svc}`, shape.nodes));
      },
      pod_deleted: (i) => {
        const p = shape.pods + i;
        const svc = p % shape.services;
        compiler.remove({ kind: 'Pod', namespace: nsOf(svc), name: `pod-${p}` });
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
