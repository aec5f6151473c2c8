import type { Dataplane, DesiredState, InterceptionMode } from '../../src/dataplane/types.js';
import type { TopoNode } from '../../src/lab/topology.js';
import type { ProxyConfig } from '../../src/proxy/config.js';
import { dataplaneModes, nodeSpec } from './dataplanes.js';
import { startNodeProxy, writeCodebase, type NodeProxy } from './pipy.js';

/**
 * The nodes of a Pipy-tier mesh: on each, the project's program (the
 * codebase written to a directory of its own) behind a real dataplane of the
 * given mode; stopped together, dataplanes first, also after a failed start.
 */
export class PipyNodes {
  readonly proxies = new Map<TopoNode, NodeProxy>();
  private readonly dataplanes: Dataplane[] = [];

  constructor(private readonly pipy: string) {}

  /** Start `node`'s proxy on `config` from codebase directory `dir`, then intercept its pods with `mode`. */
  async start(node: TopoNode, dir: string, config: ProxyConfig, mode: InterceptionMode, desired: DesiredState): Promise<NodeProxy> {
    const proxy = await startNodeProxy(node, this.pipy, writeCodebase(dir, config), config);
    this.proxies.set(node, proxy);
    const dp = dataplaneModes[mode]!.create(nodeSpec(node));
    this.dataplanes.push(dp);
    await dp.apply(desired);
    return proxy;
  }

  proxy(node: TopoNode): NodeProxy {
    const p = this.proxies.get(node);
    if (!p) throw new Error(`no proxy started on ${node.name}`);
    return p;
  }

  async stop(): Promise<void> {
    for (const dp of this.dataplanes) await dp.cleanup().catch(() => undefined);
    for (const p of this.proxies.values()) await p.stop().catch(() => undefined);
  }
}
