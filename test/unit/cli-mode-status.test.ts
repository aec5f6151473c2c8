import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { setModeInManifests } from '../../src/cli/commands/mode.js';
import { renderStatus } from '../../src/cli/commands/status.js';

const dirs: string[] = [];
const tempDir = (): string => {
  const d = mkdtempSync(join(tmpdir(), 'fsmn-mode-'));
  dirs.push(d);
  return d;
};
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

describe('fsm-node mode set --manifests', () => {
  test('labels the named Node and leaves every other document as it was', () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'a.yaml'), 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n');
    writeFileSync(join(dir, 'nodes.yaml'), 'apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n2\n  labels:\n    zone: a\n');
    expect(setModeInManifests(dir, 'n2', 'iptables')).toBe(join(dir, 'nodes.yaml'));
    const docs = parseAllDocuments(readFileSync(join(dir, 'nodes.yaml'), 'utf8')).map((d) => d.toJS());
    expect(docs[0].metadata.labels).toBeUndefined();
    expect(docs[1].metadata.labels).toEqual({ zone: 'a', 'flomesh.io/interception-mode': 'iptables' });
  });

  test('an unknown node is an error naming it', () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'nodes.yaml'), 'apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n');
    expect(() => setModeInManifests(dir, 'n9', 'ebpf')).toThrow(/--node "n9": no Node manifest/);
  });
});

describe('fsm-node status rendering', () => {
  test('shows mode, fallback reason, proxy and failed probe checks', () => {
    const text = renderStatus({
      node: 'n1',
      ready: true,
      mode: { ready: true, desired: 'ebpf', desiredSource: 'node-label', effective: 'iptables', fallbackReason: 'ebpf unavailable: bpffs: no bpffs mount' },
      proxy: { kind: 'passthrough', pid: 42, up: true, listening: true, restarts: 1, adopted: true },
      probe: { platform: {}, checks: [{ name: 'bpffs', ok: false, detail: 'no bpffs mount' }] },
    });
    expect(text).toMatch(/mode\s+iptables \(desired ebpf from node-label\)/);
    expect(text).toMatch(/fallback\s+ebpf unavailable: bpffs/);
    expect(text).toMatch(/proxy\s+passthrough pid 42, listening, 1 restarts, adopted/);
    expect(text).toMatch(/probe bpffs\s+FAILED: no bpffs mount/);
  });

  test('shows each local identity: valid until when, pending, or expired and failing closed with the reason', () => {
    const text = renderStatus({
      node: 'n1',
      ready: true,
      identities: [
        { identity: 'demo/web', state: 'valid', notAfter: '2026-12-05T08:00:00.000Z' },
        { identity: 'demo/db', state: 'expired', reason: 'certificate expired at 2026-12-04T08:00:00.000Z without renewal: controller unreachable' },
        { identity: 'demo/api', state: 'pending', lastError: 'controller answered 503' },
      ],
    });
    expect(text).toMatch(/identity demo\/web\s+valid until 2026-12-05T08:00:00.000Z\n/);
    expect(text).toMatch(/identity demo\/db\s+EXPIRED, failing closed: certificate expired at .* controller unreachable/);
    expect(text).toMatch(/identity demo\/api\s+pending: controller answered 503/);
  });

  test('not ready shows the reason', () => {
    expect(renderStatus({ node: 'n1', ready: false, notReadyReason: 'proxy not ready' })).toMatch(/ready\s+no — proxy not ready/);
  });
});
