import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { kubepodsCandidates } from '../policy/desired.js';

/**
 * Where a new pod's cgroup is, at CNI ADD time (before any of its containers
 * runs). Two ways, cheapest first:
 * 1. kubelet's layout from the pod uid (K8S_POD_UID): kubelet creates the pod
 *    cgroup before it asks the runtime for the sandbox;
 * 2. the sandbox itself: the runtime's pause process already sits in the
 *    pod's network namespace, in a cgroup named after the sandbox (container)
 *    id below the pod cgroup (cgroupfs: <pod>/<id>, systemd:
 *    <pod>.slice/cri-containerd-<id>.scope). Found by the netns inode.
 * The lab creates pods the second way too (src/lab/pods.ts).
 */

export interface SandboxFacts {
  cgroupRoot: string;
  exists(path: string): boolean;
  /** Inode of a network namespace file (CNI_NETNS); undefined when it cannot be read. */
  netnsInode(path: string): number | undefined;
  /** Pids and their "net:[inode]" namespace and cgroup v2 path (relative to the mount). */
  processes(): Iterable<{ pid: number; netInode: () => number | undefined; cgroup: () => string | undefined }>;
}

export function findPodCgroup(o: { uid: string; netns: string; containerId: string }, facts: SandboxFacts): { path: string; how: string } | undefined {
  if (o.uid) {
    for (const rel of kubepodsCandidates(o.uid, null)) {
      const path = join(facts.cgroupRoot, rel);
      if (facts.exists(path)) return { path, how: 'kubelet layout from K8S_POD_UID' };
    }
  }
  const inode = o.netns ? facts.netnsInode(o.netns) : undefined;
  if (inode === undefined) return undefined;
  for (const p of facts.processes()) {
    if (p.netInode() !== inode) continue;
    const cg = p.cgroup();
    if (cg === undefined) continue;
    const abs = join(facts.cgroupRoot, cg);
    // The sandbox's own cgroup is named after its id; the pod cgroup is its parent.
    return basename(abs).includes(o.containerId) && o.containerId.length >= 8 ? { path: dirname(abs), how: `parent of sandbox process ${p.pid}'s cgroup` } : { path: abs, how: `cgroup of process ${p.pid} in the netns` };
  }
  return undefined;
}

const nsInode = (link: string): number | undefined => {
  const m = /^net:\[(\d+)\]$/.exec(link);
  return m ? Number(m[1]) : undefined;
};

export function hostSandboxFacts(cgroupRoot: string): SandboxFacts {
  return {
    cgroupRoot,
    exists: (p) => {
      try {
        return statSync(p).isDirectory();
      } catch {
        return false;
      }
    },
    netnsInode: (p) => {
      try {
        return statSync(p).ino;
      } catch {
        return undefined;
      }
    },
    *processes() {
      let entries: string[];
      try {
        entries = readdirSync('/proc');
      } catch {
        return;
      }
      // Newest pids first: the sandbox was started moments ago.
      const pids = entries.filter((e) => /^\d+$/.test(e)).map(Number).sort((a, b) => b - a);
      for (const pid of pids) {
        yield {
          pid,
          netInode: () => {
            try {
              return nsInode(readlinkSync(`/proc/${pid}/ns/net`));
            } catch {
              return undefined;
            }
          },
          cgroup: () => {
            try {
              const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'));
              return line?.slice(3);
            } catch {
              return undefined;
            }
          },
        };
      }
    },
  };
}
