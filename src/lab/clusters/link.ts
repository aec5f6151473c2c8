import { CommandError, InvalidInputError } from '../../errors.js';
import { run } from '../../util/exec.js';
import type { LinkAction } from '../faults.js';
import { LabError, type LabCluster, type LabState } from '../state.js';

/**
 * `lab link CLUSTER ...`: shape or cut a cluster's uplink, the veth from its
 * underlay bridge to the lab's router (net.ts). The flags are those of
 * `lab link NODE` (src/lab/faults.ts parses them for both) so one command takes
 * either a node or a cluster: --down cuts the cable at the bridge end (both
 * ends keep their addresses and routes, as a pulled cable does), --up puts it
 * back, --clear removes shaping and sets it up, --delay MS / --loss PCT put
 * netem on both ends (each way). Only the lab's namespaces are touched.
 */

/** The action of `lab link`, parsed once for nodes and clusters (src/lab/faults.ts). */
export type ClusterLinkAction = LinkAction;

/** The commands for an action on a cluster's uplink (pure). */
export function renderClusterLinkCommands(c: Pick<LabCluster, 'uplink'>, a: ClusterLinkAction): { cmd: string; args: string[]; allowFail?: boolean }[] {
  const ends = [
    { netns: c.uplink.netns, dev: c.uplink.dev },
    { netns: c.uplink.routerNetns, dev: c.uplink.routerDev },
  ];
  const bridgeEnd = ends[0]!;
  switch (a.kind) {
    case 'down':
      return [{ cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'down'] }];
    case 'up':
      return [{ cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'up'] }];
    case 'clear':
      return [...ends.map((e) => ({ cmd: 'tc', args: ['-n', e.netns, 'qdisc', 'del', 'dev', e.dev, 'root'], allowFail: true })), { cmd: 'ip', args: ['-n', bridgeEnd.netns, 'link', 'set', bridgeEnd.dev, 'up'] }];
    case 'shape': {
      const { delayMs, lossPct } = a.shape;
      const netem = ['netem', ...(delayMs !== undefined ? ['delay', `${delayMs}ms`] : []), ...(lossPct !== undefined ? ['loss', `${lossPct}%`] : [])];
      return ends.map((e) => ({ cmd: 'tc', args: ['-n', e.netns, 'qdisc', 'replace', 'dev', e.dev, 'root', ...netem] }));
    }
  }
}

export function describeClusterLink(cluster: string, a: ClusterLinkAction): string {
  switch (a.kind) {
    case 'down':
      return `${cluster}: uplink down (cut from the other clusters; its nodes still reach each other)`;
    case 'up':
      return `${cluster}: uplink up`;
    case 'clear':
      return `${cluster}: uplink up, no delay or loss`;
    case 'shape':
      return `${cluster}: uplink ${[a.shape.delayMs !== undefined && `delay ${a.shape.delayMs} ms`, a.shape.lossPct !== undefined && `loss ${a.shape.lossPct} %`].filter(Boolean).join(', ')} each way`;
  }
}

/** The cluster of that name in a cluster lab; a clear error otherwise. */
export function findCluster(state: LabState, name: string | undefined): LabCluster {
  if (!state.clusters?.length) throw new InvalidInputError('CLUSTER', name, 'this lab has no clusters (lab up --clusters 2 makes them)');
  const c = state.clusters.find((x) => x.name === name);
  if (!c) throw new InvalidInputError('CLUSTER', name, `no such cluster; clusters: ${state.clusters.map((x) => x.name).join(', ')}`);
  return c;
}

const NO_NETEM = /Specified qdisc kind is unknown/;

export async function applyClusterLink(state: LabState, name: string | undefined, a: ClusterLinkAction): Promise<string> {
  const c = findCluster(state, name);
  for (const step of renderClusterLinkCommands(c, a)) {
    const r = await run(step.cmd, step.args, { allowFail: true });
    if (r.code === 0 || step.allowFail) continue;
    if (step.cmd === 'tc' && NO_NETEM.test(r.stderr)) {
      // Nothing half-applied: take shaping off both ends again.
      for (const e of [c.uplink.netns, c.uplink.routerNetns]) await run('tc', ['-n', e, 'qdisc', 'del', 'dev', e === c.uplink.netns ? c.uplink.dev : c.uplink.routerDev, 'root'], { allowFail: true });
      throw new LabError("lab link --delay/--loss needs the kernel's netem qdisc (CONFIG_NET_SCH_NETEM, module sch_netem), which this kernel does not have; --down, --up and --clear work without it");
    }
    throw new CommandError(step.cmd, step.args, r.code, r.stderr);
  }
  return describeClusterLink(c.name, a);
}
