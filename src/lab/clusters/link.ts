import { CommandError, InvalidInputError } from '../../errors.js';
import { run } from '../../util/exec.js';
import { LabError, type LabCluster, type LabState } from '../state.js';

/**
 * `lab link CLUSTER ...`: shape or cut a cluster's uplink, the veth from its
 * underlay bridge to the lab's router (net.ts). The flags are those of
 * `lab link NODE` (branch resilience, src/lab/faults.ts) so one command takes
 * either a node or a cluster: --down cuts the cable at the bridge end (both
 * ends keep their addresses and routes, as a pulled cable does), --up puts it
 * back, --clear removes shaping and sets it up, --delay MS / --loss PCT put
 * netem on both ends (each way). Only the lab's namespaces are touched.
 */

export type ClusterLinkAction = { kind: 'shape'; delayMs?: number; lossPct?: number } | { kind: 'down' } | { kind: 'up' } | { kind: 'clear' };

export function clusterLinkAction(flags: { delay?: string | undefined; loss?: string | undefined; down?: boolean | undefined; up?: boolean | undefined; clear?: boolean | undefined }): ClusterLinkAction {
  const shaping = flags.delay !== undefined || flags.loss !== undefined;
  const given = [shaping && '--delay/--loss', flags.down && '--down', flags.up && '--up', flags.clear && '--clear'].filter(Boolean);
  if (given.length !== 1) throw new InvalidInputError('lab link flags', given.join(' ') || '(none)', 'give --delay MS and/or --loss PCT, or exactly one of --down, --up, --clear');
  if (flags.down) return { kind: 'down' };
  if (flags.up) return { kind: 'up' };
  if (flags.clear) return { kind: 'clear' };
  const a: ClusterLinkAction = { kind: 'shape' };
  if (flags.delay !== undefined) {
    if (!/^\d+$/.test(flags.delay) || Number(flags.delay) > 60_000) throw new InvalidInputError('--delay', flags.delay, 'must be whole milliseconds from 0 to 60000');
    a.delayMs = Number(flags.delay);
  }
  if (flags.loss !== undefined) {
    if (!/^\d+(\.\d+)?$/.test(flags.loss) || Number(flags.loss) > 100) throw new InvalidInputError('--loss', flags.loss, 'must be a percentage from 0 to 100');
    a.lossPct = Number(flags.loss);
  }
  return a;
}

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
      const netem = ['netem', ...(a.delayMs !== undefined ? ['delay', `${a.delayMs}ms`] : []), ...(a.lossPct !== undefined ? ['loss', `${a.lossPct}%`] : [])];
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
      return `${cluster}: uplink ${[a.delayMs !== undefined && `delay ${a.delayMs} ms`, a.lossPct !== undefined && `loss ${a.lossPct} %`].filter(Boolean).join(', ')} each way`;
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
