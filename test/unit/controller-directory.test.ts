import { jest } from '@jest/globals';
import { mkdirSync, mkdtempSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { DirectorySource } from '../../src/controller/sources/directory.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { baseMesh, pod, service, split, type Obj } from './policy-fixtures.js';

let dir: string;
let compiler: PolicyCompiler;
let source: DirectorySource;
let loads: number;
let loaded: (() => void) | undefined;

const yaml = (...objs: unknown[]) => objs.map((o) => stringify(o)).join('---\n');
const write = (file: string, text: string) => writeFileSync(join(dir, file), text);
const pods = (node = 'node-a') => compiler.get(node)?.policy.pods.map((p) => p.name).sort();
/** Resolves after the next reload that fed the compiler (triggered by the file watch). */
const nextLoad = () => new Promise<void>((resolve) => (loaded = resolve));

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'fsmt-manifests-'));
  mkdirSync(join(dir, 'apps'));
  const objs = baseMesh();
  write('cluster.yaml', yaml(...objs.filter((o) => o.kind !== 'Pod')));
  write('apps/pods.yml', yaml(...objs.filter((o) => o.kind === 'Pod')));
  write('README.md', 'not a manifest');
  compiler = new PolicyCompiler();
  loads = 0;
  source = new DirectorySource({
    dir,
    compiler,
    debounceMs: 20,
    onChange: () => {
      loads++;
      compiler.compile();
      loaded?.();
    },
  });
  await source.start();
});

afterEach(async () => {
  await source.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe('DirectorySource', () => {
  test('loads every YAML document under the directory', () => {
    expect(loads).toBe(1);
    expect(pods()).toEqual(['db-1', 'web-1']);
    expect(pods('node-b')).toEqual(['api-1']);
    expect(compiler.reporter.active()).toEqual([]);
  });

  test('an edited file is reloaded through the watch', async () => {
    const done = nextLoad();
    write('apps/more.yaml', yaml(pod('web-2', { ip: '10.0.0.12', sa: 'web' })));
    await done;
    expect(pods()).toEqual(['db-1', 'web-1', 'web-2']);
  });

  test('a removed file removes its objects', async () => {
    const done = nextLoad();
    unlinkSync(join(dir, 'apps/pods.yml'));
    await done;
    expect(pods()).toEqual([]);
  });

  test('files created later, replaced by rename, in new subdirectories and deleted are all followed', async () => {
    let done = nextLoad();
    write('late.yaml', yaml(pod('web-2', { ip: '10.0.0.12' })));
    await done;
    done = nextLoad();
    write('.tmp-edit', yaml(pod('web-2', { ip: '10.0.0.12', annotations: { 'flomesh.io/sidecar-injection': 'disabled' } })));
    renameSync(join(dir, '.tmp-edit'), join(dir, 'late.yaml'));
    await done;
    expect(pods()).toEqual(['db-1', 'web-1']);
    done = nextLoad();
    mkdirSync(join(dir, 'new/deeper'), { recursive: true });
    write('new/deeper/p.yaml', yaml(pod('web-3', { ip: '10.0.0.13' })));
    await done;
    expect(pods()).toEqual(['db-1', 'web-1', 'web-3']);
    done = nextLoad();
    unlinkSync(join(dir, 'late.yaml'));
    unlinkSync(join(dir, 'new/deeper/p.yaml'));
    await done;
    expect(pods()).toEqual(['db-1', 'web-1']);
  });

  test('a broken document is reported by file and index; what it held stays', async () => {
    const objs = baseMesh().filter((o) => o.kind === 'Pod');
    const done = nextLoad();
    // Document 1 (db-1) becomes invalid YAML; web-2 is added after it.
    write('apps/pods.yml', `${yaml(objs[0])}---\nkind: Pod\nmetadata: {name: db-1\n---\n${yaml(...objs.slice(2), pod('web-2', { ip: '10.0.0.12' }))}`);
    await done;
    expect(pods()).toEqual(['db-1', 'web-1', 'web-2']);
    expect(compiler.reporter.active()).toEqual([
      expect.objectContaining({ ref: { kind: 'Document', namespace: '', name: 'apps/pods.yml#1' }, stage: 'source', keptLastGood: true }),
    ]);
    // Fixing the file clears the report (same objects as held, so only the report changes).
    write('apps/pods.yml', yaml(...objs, pod('web-2', { ip: '10.0.0.12' })));
    await source.reload();
    expect(compiler.reporter.active()).toEqual([]);
  });

  test('unknown kinds, unsupported apiVersions and duplicates are reported and skipped', async () => {
    const done = nextLoad();
    write(
      'extra.yaml',
      yaml(
        { apiVersion: 'v1', kind: 'Podd', metadata: { name: 'x' } },
        { ...split('s', 'web', [{ service: 'db', weight: 1 }]), apiVersion: 'split.smi-spec.io/v1alpha9' },
        { ...service('web'), spec: { clusterIP: '172.16.0.99', selector: { app: 'web' } } },
        service('new', { clusterIP: '172.16.0.50' }),
      ),
    );
    await done;
    const issues = compiler.reporter.active().map((i) => `${i.ref.kind} ${i.ref.name} ${i.field}: ${i.message}`);
    expect(issues).toEqual([
      expect.stringMatching(/^Document extra.yaml#0 kind: unknown kind "Podd"/),
      expect.stringMatching(/^Document extra.yaml#1 apiVersion: "split.smi-spec.io\/v1alpha9" is not supported/),
      'Service web metadata.name: duplicate of cluster.yaml#4; extra.yaml#2 ignored',
    ]);
    const names = compiler.get('node-a')!.policy.services.map((s) => s.name);
    expect(names).toEqual(['api', 'db', 'new', 'web']);
    expect(compiler.get('node-a')!.policy.services.find((s) => s.name === 'web')!.clusterIPs).toEqual(['172.16.0.1']);
  });

  test('reloading only the changed files agrees with a fresh load of the whole directory, edit after edit', async () => {
    const fast = jest.spyOn(DirectorySource.prototype as unknown as { loadChanged(p: unknown): boolean }, 'loadChanged');
    /** Versions of every node and the active reports: what a fresh source over the same directory must also give. */
    const state = (c: PolicyCompiler) => ({
      versions: Object.fromEntries(c.nodes().map((n) => [n, c.get(n)!.version])),
      issues: c.reporter.active().map((i) => `${i.origin} ${i.field}`).sort(),
    });
    const fresh = async () => {
      const c = new PolicyCompiler();
      const s = new DirectorySource({ dir, compiler: c, onChange: () => c.compile() });
      await s.start();
      await s.stop();
      return state(c);
    };
    const agreed = async (what: string) => {
      const want = await fresh();
      for (let i = 0; i < 200 && JSON.stringify(state(compiler)) !== JSON.stringify(want); i++) await new Promise((r) => setTimeout(r, 25));
      expect({ what, ...state(compiler) }).toEqual({ what, ...want });
    };
    const podsYml = baseMesh().filter((o) => o.kind === 'Pod');
    const web2 = (ip: string) => pod('web-2', { ip, sa: 'web' });

    write('apps/more.yaml', yaml(web2('10.0.0.12')));
    await agreed('a file added');
    write('apps/more.yaml', yaml(web2('10.0.0.22')));
    await agreed('an object changed');
    write('apps/pods.yml', yaml(...podsYml, web2('10.0.0.22')));
    write('apps/more.yaml', yaml(service('cache', { clusterIP: '172.16.0.9' })));
    await agreed('an object moved to another file');
    write('extra.yaml', yaml(pod('db-1', { ip: '10.0.0.99', sa: 'db' })));
    await agreed('a duplicate added (reported; the first in path order wins)');
    unlinkSync(join(dir, 'extra.yaml'));
    await agreed('the duplicate removed');
    write('cluster.yaml', yaml(...baseMesh().filter((o) => o.kind !== 'Pod' && o.metadata.name !== 'db')));
    await agreed('a document dropped from a multi-document file');
    // A broken file keeps what it held (a fresh load cannot know that): same versions, one report.
    const held = state(compiler).versions;
    write('apps/more.yaml', 'kind: [');
    for (let i = 0; i < 200 && state(compiler).issues.length === 0; i++) await new Promise((r) => setTimeout(r, 25));
    expect(state(compiler)).toEqual({ versions: held, issues: ['apps/more.yaml#0 (document)'] });
    write('apps/more.yaml', yaml(service('cache', { clusterIP: '172.16.0.10' })));
    await agreed('the file fixed');
    unlinkSync(join(dir, 'apps/more.yaml'));
    await agreed('a file deleted');
    expect(fast.mock.results.filter((r) => r.value === true).length).toBeGreaterThanOrEqual(4);
    fast.mockRestore();
  });

  test('an object failing its own checks keeps its last good version (compiler side)', async () => {
    const done = nextLoad();
    const bad: Obj = pod('web-1', { ip: '10.0.0.1', sa: 'web', annotations: { 'flomesh.io/outbound-port-exclusion-list': 'x' } });
    const objs = baseMesh().filter((o) => o.kind === 'Pod' && o.metadata.name !== 'web-1');
    write('apps/pods.yml', yaml(bad, ...objs));
    await done;
    expect(pods()).toEqual(['db-1', 'web-1']);
    expect(compiler.reporter.active()).toEqual([
      expect.objectContaining({ ref: { kind: 'Pod', namespace: 'app', name: 'web-1' }, origin: 'apps/pods.yml#0', keptLastGood: true }),
    ]);
  });
});
