import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { PolicyCompiler } from '../policy/compiler.js';
import type { PolicyHub } from './hub.js';

export interface ControllerMetrics {
  registry: Registry;
  compileSeconds: Histogram;
  publishes: Counter;
}

/** The controller's /metrics: compile time, nodes, parked long-polls, bad objects by kind. */
export function controllerMetrics(compiler: PolicyCompiler, hub: PolicyHub): ControllerMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'fsm_node_controller_' });
  const reporter = compiler.reporter;
  new Counter({
    name: 'fsm_node_controller_invalid_objects_total',
    help: 'Bad objects reported (each distinct problem once), by kind.',
    labelNames: ['kind'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [kind, n] of reporter.reported) this.inc({ kind }, n);
    },
  });
  new Gauge({
    name: 'fsm_node_controller_invalid_objects',
    help: 'Bad objects not fixed yet.',
    registers: [registry],
    collect() {
      this.set(reporter.active().length);
    },
  });
  new Gauge({
    name: 'fsm_node_controller_nodes',
    help: 'Nodes with a compiled policy.',
    registers: [registry],
    collect() {
      this.set(compiler.nodes().length);
    },
  });
  new Gauge({
    name: 'fsm_node_controller_long_polls',
    help: 'Agent long-polls parked waiting for a change.',
    registers: [registry],
    collect() {
      this.set(hub.waiting());
    },
  });
  return {
    registry,
    compileSeconds: new Histogram({
      name: 'fsm_node_controller_compile_seconds',
      help: 'Duration of one (incremental) compile.',
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [registry],
    }),
    publishes: new Counter({ name: 'fsm_node_controller_policy_versions_total', help: 'New node policy versions published.', registers: [registry] }),
  };
}
