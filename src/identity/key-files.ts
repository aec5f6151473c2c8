import { chown, lstat } from 'node:fs/promises';
import { statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';

/**
 * Who may read a node's workload keys (docs/security.md "Keys on the node").
 * When the proxy runs as its own user (agent setting proxyUser, FSM: 1500),
 * the key files are that user's, mode 0600, in directories only it can list;
 * the agent (root) writes them and hands them over with chown.
 */

export interface FileOwner {
  uid: number;
  gid: number;
}

/**
 * Give `paths` (files and directories the agent created) to `owner`. Files
 * found with another owner are re-owned too: a node whose proxy user changed
 * keeps its stored certificates usable. Symbolic links are refused, so a
 * planted link cannot make the agent chown a file elsewhere.
 */
export async function ownKeyFiles(paths: string[], owner: FileOwner): Promise<void> {
  for (const p of paths) {
    const st = await lstat(p);
    if (st.isSymbolicLink()) throw new Error(`${p} is a symbolic link: refusing to hand it to uid ${owner.uid}`);
    if (st.uid !== owner.uid || st.gid !== owner.gid) await chown(p, owner.uid, owner.gid);
  }
}

/**
 * The first directory on the way to `path` (inclusive) that `user` cannot
 * traverse, or undefined when it can reach it. Pure but for stat: the
 * proxy must read its codebase, config and keys under the state directory,
 * and a 0700 parent (a mkdtemp directory, a hardened /var/lib) would make it
 * crash-loop with a bare EACCES.
 */
export function unreachableFor(path: string, user: FileOwner): { dir: string; mode: string } | undefined {
  const dirs: string[] = [];
  for (let d = resolve(path); ; d = dirname(d)) {
    dirs.unshift(d);
    if (dirname(d) === d) break;
  }
  for (const dir of dirs) {
    let st;
    try {
      st = statSync(dir);
    } catch {
      return undefined; // created later by the agent, with a traversable mode
    }
    const bit = st.uid === user.uid ? 0o100 : st.gid === user.gid ? 0o010 : 0o001;
    if ((st.mode & bit) === 0) return { dir, mode: (st.mode & 0o777).toString(8).padStart(4, '0') };
  }
  return undefined;
}
