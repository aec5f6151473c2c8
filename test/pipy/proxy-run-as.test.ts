import { spawnSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ProcessMesh, processMeshSkipReason, slowly } from '../support/process-mesh.js';

/**
 * The proxy as its own user (agent setting proxyUser, FSM's uid 1500) with
 * only CAP_NET_ADMIN, real processes (test/support/process-mesh.ts): its
 * workload keys are that uid's, mode 0600, so another uid on the node cannot
 * read them, and the proxy still terminates and originates mutual TLS.
 */

const skip = processMeshSkipReason();
if (skip) console.log(`${skip} (proxy runAs test)`);
const maybe = skip ? describe.skip : describe;
const PROXY_UID = 1500;
const CAP_NET_ADMIN = 12;

/** Uid and effective capabilities of a process, from /proc. */
function creds(pid: number): { uids: number[]; capEff: bigint } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return {
    uids: (/^Uid:\s+(.*)$/m.exec(status)?.[1] ?? '').split(/\s+/).map(Number),
    capEff: BigInt(`0x${/^CapEff:\s+([0-9a-f]+)$/m.exec(status)?.[1] ?? '0'}`),
  };
}

/** `cat path` as another user: the attack is a local process of any other uid on the node. */
const catAs = (uid: number, path: string) => spawnSync('setpriv', [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', 'cat', path], { encoding: 'utf8' });

maybe('the proxy runs as its own uid with CAP_NET_ADMIN only (real agents and Pipy)', () => {
  let mesh: ProcessMesh;

  beforeAll(async () => {
    mesh = await ProcessMesh.start({ proxyUser: `${PROXY_UID}:${PROXY_UID}` });
  }, 180_000);

  afterAll(async () => {
    await mesh?.destroy();
  }, 60_000);

  test('every proxy process runs as uid 1500 with exactly CAP_NET_ADMIN, and still serves mutual TLS across nodes', async () => {
    const ids = await slowly(async () => Promise.all([mesh.identity(mesh.n1, 'demo/p1'), mesh.identity(mesh.n2, 'demo/p2')]), (x) => x.every((i) => i?.state === 'valid'), 60_000);
    expect(ids.map((i) => i?.state)).toEqual(['valid', 'valid']);
    for (const n of [mesh.n1, mesh.n2]) {
      const pids = readFileSync(join(n.proxyCgroup, 'cgroup.procs'), 'utf8').trim().split('\n').filter(Boolean).map(Number);
      expect(pids.length).toBeGreaterThan(0);
      for (const pid of pids) {
        const c = creds(pid);
        expect({ pid, uids: c.uids }).toEqual({ pid, uids: [PROXY_UID, PROXY_UID, PROXY_UID, PROXY_UID] });
        expect({ pid, capEff: c.capEff.toString(16) }).toEqual({ pid, capEff: (1n << BigInt(CAP_NET_ADMIN)).toString(16) });
      }
    }
    // The tunnel needs both proxies to read their keys: p2's on n2 (client), p1's on n1 (server).
    const r = await slowly(() => mesh.get(mesh.p2), (x) => x.status === 200, 30_000);
    expect(r).toMatchObject({ status: 200, pod: 'p1' });
  });

  test('attack: another uid on the node cannot read a workload key; the proxy uid can', () => {
    for (const [n, sa] of [[mesh.n1, 'p1'], [mesh.n2, 'p2']] as const) {
      const key = join(mesh.stateDir(n), 'identities', 'demo', sa, 'key.pem');
      const st = statSync(key);
      expect({ uid: st.uid, gid: st.gid, mode: (st.mode & 0o777).toString(8) }).toEqual({ uid: PROXY_UID, gid: PROXY_UID, mode: '600' });
      const other = catAs(PROXY_UID + 1, key);
      expect(other.status).not.toBe(0);
      expect(other.stderr).toMatch(/Permission denied/);
      expect(other.stdout).not.toMatch(/PRIVATE KEY/);
      // The same command as the proxy's uid reads it: the refusal above is the file's permissions, nothing else.
      const owner = catAs(PROXY_UID, key);
      expect(owner.status).toBe(0);
      expect(owner.stdout).toMatch(/-----BEGIN PRIVATE KEY-----/);
    }
  });
});
