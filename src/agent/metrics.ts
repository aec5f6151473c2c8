import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

/** Values read when Prometheus scrapes, so readiness and proxy health are never stale. */
export interface LiveValues {
  ready(): boolean;
  proxy(): { listening: boolean; restarts: number };
  policyReceivedAt(): number | undefined;
  policyFetchErrors(): number;
}

/** Every agent metric, in one registry, named fsm_node_*; the agent sets them, /metrics reads them. */
export function agentMetrics(live: LiveValues) {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'fsm_node_process_' });
  const r = [registry];
  return {
    registry,
    mode: new Gauge({ name: 'fsm_node_mode_info', help: 'Interception mode: 1 for the current desired/effective pair, with the fallback reason.', labelNames: ['desired', 'effective', 'fallback_reason'], registers: r }),
    ready: new Gauge({ name: 'fsm_node_ready', help: '1 when policy, dataplane and proxy are all in force.', registers: r, collect() { this.set(live.ready() ? 1 : 0); } }),
    probe: new Gauge({ name: 'fsm_node_probe_check', help: 'Capability probe results: 1 passed, 0 failed.', labelNames: ['check'], registers: r }),
    enrolledPods: new Gauge({ name: 'fsm_node_enrolled_pods', help: 'Pods whose interception is installed.', registers: r }),
    reconcile: new Histogram({ name: 'fsm_node_reconcile_duration_seconds', help: 'Duration of reconcile runs.', labelNames: ['full'], buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5], registers: r }),
    applyFailures: new Counter({ name: 'fsm_node_apply_failures_total', help: 'Dataplane applies that failed (previous state kept).', labelNames: ['dataplane'], registers: r }),
    modeSwitches: new Counter({ name: 'fsm_node_mode_switches_total', help: 'Live switches between interception modes.', labelNames: ['from', 'to'], registers: r }),
    policyVersion: new Gauge({ name: 'fsm_node_policy_info', help: 'The policy version in force.', labelNames: ['version'], registers: r }),
    policyAge: new Gauge({
      name: 'fsm_node_policy_age_seconds',
      help: 'Seconds since the policy in force was received from the controller.',
      registers: r,
      collect() {
        const at = live.policyReceivedAt();
        if (at !== undefined) this.set((Date.now() - at) / 1000);
      },
    }),
    policyFetchErrors: new Counter({
      name: 'fsm_node_policy_fetch_errors_total',
      help: 'Failed policy fetches from the controller since the agent started.',
      registers: r,
      collect() {
        this.reset();
        this.inc(live.policyFetchErrors());
      },
    }),
    proxyUp: new Gauge({ name: 'fsm_node_proxy_up', help: '1 when the node proxy runs and listens.', registers: r, collect() { this.set(live.proxy().listening ? 1 : 0); } }),
    proxyRestarts: new Gauge({ name: 'fsm_node_proxy_restarts', help: 'Proxy restarts by this agent.', registers: r, collect() { this.set(live.proxy().restarts); } }),
  };
}
export type AgentMetrics = ReturnType<typeof agentMetrics>;
