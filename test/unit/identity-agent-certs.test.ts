import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { IdentityFetchError, IdentityManager, type IdentityIssuer } from '../../src/identity/agent-certs.js';
import type { WorkloadIdentity } from '../../src/identity/spiffe.js';
import { createRoot, loadSigner, parseCertificate, signLeaf, type CaSigner } from '../../src/identity/x509.js';
import type { NodePolicy } from '../../src/policy/schema.js';
import { eventually } from '../support/eventually.js';

const TD = 'cluster.local';
let dir: string;
let ca: { certPem: string; signer: CaSigner };
let managers: IdentityManager[] = [];

/** An issuer that signs like the controller would, with a lifetime the test picks, and can be made to fail. */
function testIssuer(o: { lifetimeMs: number; fail?: () => boolean; identityOverride?: WorkloadIdentity }) {
  const calls: string[] = [];
  const issuer: IdentityIssuer = {
    async issue(identity, csrPem) {
      calls.push(`${identity.namespace}/${identity.serviceAccount}`);
      if (o.fail?.()) throw new IdentityFetchError('network', 'controller unreachable (test)');
      const r = await signLeaf(csrPem, ca.signer, { trustDomain: TD, identity: o.identityOverride ?? identity, lifetimeMs: o.lifetimeMs });
      return { certificateChain: r.chainPem, trustBundle: [ca.certPem], notAfter: r.notAfter.toISOString() };
    },
  };
  return { issuer, calls };
}

function policy(pods: { ns: string; sa: string }[]): NodePolicy {
  return {
    pods: pods.map((p, i) => ({ uid: `u${i}`, namespace: p.ns, name: `p${i}`, ip: `10.0.0.${i + 1}`, serviceAccount: p.sa, cgroup: { qosClass: null, path: null }, exclusions: { outboundPorts: [], outboundCidrs: [], outboundIncludeCidrs: [], inboundPorts: [] } })),
    trust: { trustDomain: TD, bundle: [ca.certPem] },
  } as unknown as NodePolicy;
}

function manager(o: ConstructorParameters<typeof IdentityManager>[0]) {
  const m = new IdentityManager(o);
  managers.push(m);
  return m;
}

beforeAll(async () => {
  const root = await createRoot({ commonName: 'agent test root', lifetimeMs: 24 * 3600_000 });
  ca = { certPem: root.certPem, signer: await loadSigner(root.certPem, root.keyPem) };
});
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-idagent-'));
});
afterEach(async () => {
  for (const m of managers) await m.stop();
  managers = [];
  rmSync(dir, { recursive: true, force: true });
});

const web = { ns: 'demo', sa: 'web' };
const db = { ns: 'demo', sa: 'db' };

describe('agent identity certificates', () => {
  test('a certificate per local identity: fetched when a pod appears, key 0600 on disk, dropped with the last pod', async () => {
    const { issuer, calls } = testIssuer({ lifetimeMs: 3600_000 });
    let changes = 0;
    const m = manager({ stateDir: dir, issuer, onChange: () => changes++ });
    m.update(policy([web, web, db]));
    const snap = await eventually(async () => m.snapshot(), (s) => [...s.values()].every((c) => c.state === 'valid'));
    expect([...snap.keys()].sort()).toEqual(['demo/db', 'demo/web']);
    expect(calls.sort()).toEqual(['demo/db', 'demo/web']);
    const w = snap.get('demo/web')!;
    expect(w.keyPath).toBe(join(dir, 'identities', 'demo', 'web', 'key.pem'));
    expect(w.certPath).toBe(join(dir, 'identities', 'demo', 'web', 'cert.pem'));
    expect(statSync(w.keyPath).mode & 0o777).toBe(0o600);
    expect(parseCertificate(readFileSync(w.certPath, 'utf8')).identity).toEqual({ namespace: 'demo', serviceAccount: 'web' });
    expect(w.certChainPem[0]).toBe(readFileSync(w.certPath, 'utf8'));
    expect(changes).toBe(2);
    // Another pod of web leaves: nothing happens; the last pod of db leaves: db is dropped.
    m.update(policy([web]));
    expect([...m.snapshot().keys()]).toEqual(['demo/web']);
    await eventually(async () => existsSync(join(dir, 'identities', 'demo', 'db')), (v) => !v);
    expect(existsSync(join(dir, 'identities', 'demo', 'db'))).toBe(false);
    expect(existsSync(w.keyPath)).toBe(true);
  });

  test('an agent restart reuses the stored key and certificate without asking the controller', async () => {
    const first = testIssuer({ lifetimeMs: 3600_000 });
    const a = manager({ stateDir: dir, issuer: first.issuer });
    a.update(policy([web]));
    const before = await eventually(async () => a.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    await a.stop();
    const second = testIssuer({ lifetimeMs: 3600_000, fail: () => true }); // and the controller is gone
    const b = manager({ stateDir: dir, issuer: second.issuer });
    b.update(policy([web]));
    const after = await eventually(async () => b.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    expect(after!.certChainPem).toEqual(before!.certChainPem);
    expect(second.calls).toEqual([]);
  });

  test('renewal at half life with jitter: a new key and certificate before expiry', async () => {
    const { issuer, calls } = testIssuer({ lifetimeMs: 5000 });
    let answered = 0;
    const timed: IdentityIssuer = { issue: async (id, csr) => { const r = await issuer.issue(id, csr); answered = Date.now(); return r; } };
    const m = manager({ stateDir: dir, issuer: timed, random: () => 1 }); // +10 %: at 55 % of the remaining lifetime
    m.update(policy([web]));
    const first = await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    const seen = Date.now();
    const key1 = readFileSync(first!.keyPath, 'utf8');
    // The manager took the certificate at r and armed the renewal at s, both
    // between the answer and the moment the test saw it (a loaded machine
    // stretches that): due = s + 0.55 * (notAfter - r). Solved as if s = r,
    // x = (due - 0.55 * notAfter) / 0.45 = r + (s - r) / 0.45 lies in
    // [answered, seen + (0.55 / 0.45) * (seen - answered)]. Without the jitter
    // (0.5) x comes out 0.11 * lifetime (~500 ms: notAfter has whole seconds,
    // so 4-5 s remain) before the answer.
    const notAfter = first!.notAfter!.getTime();
    const x = (first!.nextAttempt!.getTime() - 0.55 * notAfter) / 0.45;
    expect(x).toBeGreaterThanOrEqual(answered - 5);
    expect(x).toBeLessThanOrEqual(seen + (0.55 / 0.45) * (seen - answered) + 5);
    const second = await eventually(async () => m.snapshot().get('demo/web'), (c) => c!.notAfter!.getTime() > notAfter, 5000);
    expect(calls).toEqual(['demo/web', 'demo/web']);
    expect(second!.state).toBe('valid');
    expect(readFileSync(first!.keyPath, 'utf8')).not.toBe(key1);
  });

  test('failures back off per identity (doubling) and keep the valid certificate; counted by reason', async () => {
    let failing = false;
    const { issuer, calls } = testIssuer({ lifetimeMs: 6000, fail: () => failing });
    const registry = new Registry();
    const m = manager({ stateDir: dir, issuer, registry, backoff: { initialMs: 40, maxMs: 1000 }, renewAt: 0.1, jitter: 0 });
    m.update(policy([web]));
    const held = await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    failing = true;
    const times: number[] = [];
    const n0 = calls.length;
    await eventually(async () => {
      while (times.length < calls.length - n0) times.push(Date.now());
      return calls.length - n0;
    }, (n) => n >= 5, 3000);
    const snap = m.snapshot().get('demo/web')!;
    expect(snap.state).toBe('valid');
    expect(snap.certChainPem).toEqual(held!.certChainPem);
    expect(snap.lastError).toBe('controller unreachable (test)');
    // Gaps grow: 40, 80, 160, 320 ms (polling adds up to 50 ms of noise).
    const gaps = times.slice(1).map((t, i) => t - times[i]!);
    expect(gaps[gaps.length - 1]!).toBeGreaterThan(gaps[0]! + 100);
    expect(await registry.metrics()).toMatch(/fsm_node_identity_certificate_failures_total\{kind="renew",reason="network"\} [4-9]/);
  });

  test('a certificate that expires without renewal fails closed with a reason, metric and event; it recovers when the controller is back', async () => {
    let failing = false;
    const { issuer } = testIssuer({ lifetimeMs: 1200, fail: () => failing });
    const registry = new Registry();
    const events: [string, string | undefined][] = [];
    const order: string[] = [];
    const traced: IdentityIssuer = { issue: (id, csr) => (order.push(`issue ${m.snapshot().get('demo/web')?.state}`), issuer.issue(id, csr)) };
    const m = manager({
      stateDir: dir,
      issuer: traced,
      registry,
      backoff: { initialMs: 100, maxMs: 200 },
      onExpired: (id, reason) => events.push([`${id.namespace}/${id.serviceAccount}`, reason]),
      // The agent reports the expiry to the controller here; it may fail (controller down), the request still goes.
      beforeRecover: async () => {
        order.push('report');
        if (failing) throw new Error('controller unreachable (test)');
      },
    });
    m.update(policy([web]));
    await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    failing = true;
    const expired = await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'expired', 3000);
    expect(expired!.state).toBe('expired');
    expect(expired!.reason).toMatch(/^certificate expired at .* without renewal: controller unreachable \(test\)$/);
    expect(m.expired()).toEqual([{ namespace: 'demo', serviceAccount: 'web', reason: expired!.reason }]);
    expect(events).toEqual([['demo/web', expired!.reason]]);
    expect(await registry.metrics()).toMatch(/fsm_node_identities\{state="expired"\} 1/);
    failing = false;
    const back = await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid', 3000);
    expect(back!.state).toBe('valid');
    expect(events[1]).toEqual(['demo/web', undefined]);
    // Every attempt of an expired identity is preceded by a report (so the controller hears of it before it ends).
    const afterExpiry = order.slice(order.indexOf('issue expired') - 1);
    expect(afterExpiry[0]).toBe('report');
    for (let i = 0; i < afterExpiry.length; i += 2) expect(afterExpiry.slice(i, i + 2)).toEqual(['report', 'issue expired']);
    expect(await registry.metrics()).toMatch(/fsm_node_identity_certificate_expiry_timestamp_seconds\{identity="demo\/web"\} \d+/);
  });

  test('with a proxy user: key 0600 and its directories belong to that uid; stored files of another owner are handed over at start', async () => {
    const { issuer } = testIssuer({ lifetimeMs: 3600_000 });
    const plain = manager({ stateDir: dir, issuer });
    plain.update(policy([web]));
    const c = (await eventually(async () => plain.snapshot().get('demo/web'), (x) => x?.state === 'valid'))!;
    expect(statSync(c.keyPath).uid).toBe(process.getuid!());
    await plain.stop();
    // The agent restarts with proxyUser set: the stored certificate is kept and re-owned.
    const again = testIssuer({ lifetimeMs: 3600_000 });
    const owned = manager({ stateDir: dir, issuer: again.issuer, owner: { uid: 1500, gid: 1500 } });
    owned.update(policy([web]));
    await eventually(async () => owned.snapshot().get('demo/web'), (x) => x?.state === 'valid');
    expect(again.calls).toEqual([]);
    for (const p of [c.keyPath, c.certPath, join(c.keyPath, '..'), join(c.keyPath, '../..')]) expect(statSync(p)).toMatchObject({ uid: 1500, gid: 1500 });
    expect(statSync(c.keyPath).mode & 0o777).toBe(0o600);
    expect(statSync(join(c.keyPath, '..')).mode & 0o777).toBe(0o700);
    // A new identity is written owned from the start.
    owned.update(policy([web, db]));
    const d = (await eventually(async () => owned.snapshot().get('demo/db'), (x) => x?.state === 'valid'))!;
    expect(statSync(d.keyPath)).toMatchObject({ uid: 1500, gid: 1500 });
    expect(statSync(d.keyPath).mode & 0o777).toBe(0o600);
  });

  test('an expiry timer that fires before the clock reaches notAfter waits again instead of never failing closed', async () => {
    let failing = false;
    let skewMs = 0; // the wall clock the manager reads, against the timers
    const { issuer } = testIssuer({ lifetimeMs: 1200, fail: () => failing });
    const m = manager({ stateDir: dir, issuer, now: () => Date.now() - skewMs, backoff: { initialMs: 60_000, maxMs: 60_000 } });
    m.update(policy([web]));
    await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    failing = true;
    skewMs = 300; // the clock went back after the timer was armed: the timer fires 300 ms "early"
    const expired = await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'expired', 4000);
    expect(expired!.state).toBe('expired');
  });

  test('an expired identity retries within 10 s, however long its backoff had grown', async () => {
    let failing = false;
    // notAfter has whole seconds: 6 s leaves 5-6 s, so the failed renewal at half
    // life is seen well before the expiry even on a slow (emulated arm64) machine.
    const { issuer, calls } = testIssuer({ lifetimeMs: 6000, fail: () => failing });
    const m = manager({ stateDir: dir, issuer, backoff: { initialMs: 30_000, maxMs: 150_000 } });
    m.update(policy([web]));
    await eventually(async () => m.snapshot().get('demo/web'), (c) => c?.state === 'valid');
    failing = true;
    // The renewal at half life fails: the next try is 30 s away, past the expiry.
    const waiting = await eventually(async () => m.snapshot().get('demo/web'), (c) => (c?.lastError ?? '') !== '', 6000);
    expect(waiting!.state).toBe('valid');
    expect(waiting!.nextAttempt!.getTime() - Date.now()).toBeGreaterThan(25_000);
    // At expiry it tries at once, then backs off no more than 10 s (30 s and 60 s otherwise).
    await eventually(async () => calls.length, (n) => n >= 3, 6000);
    await m.settled();
    const c = m.snapshot().get('demo/web')!;
    expect(c.state).toBe('expired');
    expect(calls).toHaveLength(3);
    const wait = c.nextAttempt!.getTime() - Date.now();
    expect(wait).toBeLessThanOrEqual(10_000);
    expect(wait).toBeGreaterThan(5_000);
  });

  test('retryNow: when the controller is back, a failing identity tries at once instead of after its long backoff', async () => {
    let failing = true;
    const { issuer, calls } = testIssuer({ lifetimeMs: 3600_000, fail: () => failing });
    const m = manager({ stateDir: dir, issuer, backoff: { initialMs: 60_000, maxMs: 60_000 } });
    m.update(policy([web, db]));
    await eventually(async () => calls.length, (n) => n === 2);
    await m.settled();
    expect(m.snapshot().get('demo/web')!.nextAttempt!.getTime()).toBeGreaterThan(Date.now() + 50_000);
    failing = false;
    expect(m.retryNow('test')).toBe(2);
    const states = await eventually(async () => [...m.snapshot().values()].map((c) => c.state), (s) => s.every((x) => x === 'valid'), 3000);
    expect(states).toEqual(['valid', 'valid']);
    // Nothing failing: nothing to retry (a valid certificate waits for its renewal point).
    expect(m.retryNow('test')).toBe(0);
    expect(calls).toHaveLength(4);
  });

  test('an answer for another identity is refused and retried; nothing is stored', async () => {
    const { issuer, calls } = testIssuer({ lifetimeMs: 3600_000, identityOverride: { namespace: 'demo', serviceAccount: 'admin' } });
    const m = manager({ stateDir: dir, issuer, backoff: { initialMs: 30, maxMs: 60 } });
    m.update(policy([web]));
    const c = await eventually(async () => m.snapshot().get('demo/web'), (x) => (x?.lastError ?? '') !== '' && calls.length >= 2);
    expect(c!.state).toBe('pending');
    expect(c!.lastError).toBe('the controller returned a certificate for spiffe://cluster.local/ns/demo/sa/admin, not demo/web in cluster.local');
    expect(existsSync(c!.keyPath)).toBe(false);
  });

  test('a stored certificate that does not match its key (a torn write) is replaced', async () => {
    const { issuer } = testIssuer({ lifetimeMs: 3600_000 });
    const a = manager({ stateDir: dir, issuer });
    a.update(policy([web, db]));
    await eventually(async () => [...a.snapshot().values()].map((c) => c.state), (s) => s.every((x) => x === 'valid'));
    await a.stop();
    // Swap web's key for db's: a torn write would look like this.
    const { copyFileSync } = await import('node:fs');
    copyFileSync(join(dir, 'identities/demo/db/key.pem'), join(dir, 'identities/demo/web/key.pem'));
    const again = testIssuer({ lifetimeMs: 3600_000 });
    const b = manager({ stateDir: dir, issuer: again.issuer });
    b.update(policy([web, db]));
    await eventually(async () => [...b.snapshot().values()].map((c) => c.state), (s) => s.length === 2 && s.every((x) => x === 'valid'));
    expect(again.calls).toEqual(['demo/web']);
  });
});
