import { join } from 'node:path';
import { EbpfDataplane } from './ebpf/dataplane.js';
import { IptablesDataplane } from './iptables/index.js';
import type { Dataplane, InterceptionMode } from './types.js';

/** What both dataplanes need to know about the node; the agent and `cleanup` build it from their flags. */
export interface DataplaneSite {
  stateDir: string;
  bpffsDir: string;
  podsCgroup: string;
  proxyCgroup: string;
  /** Lab only: the network namespace that plays the node. */
  netns?: string;
  fastPath?: boolean;
}

export function createDataplane(mode: InterceptionMode, site: DataplaneSite): Dataplane {
  if (mode === 'ebpf') {
    return new EbpfDataplane({ pinDir: site.bpffsDir, podsCgroup: site.podsCgroup, proxyCgroup: site.proxyCgroup, fastPath: site.fastPath ?? true });
  }
  return new IptablesDataplane({ ...(site.netns ? { netns: site.netns } : {}), stateDir: join(site.stateDir) });
}

export type { Dataplane, InterceptionMode } from './types.js';
