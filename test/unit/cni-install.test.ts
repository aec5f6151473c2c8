import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chain, chainState, unchain } from '../../src/cni/conflist.js';
import { ChainKeeper, ensureChained, installBinary, primaryConfFile, uninstall } from '../../src/cni/install.js';
import { pluginConf } from '../../src/cni/service.js';

/**
 * The installer against real files: install chains the plugin into the
 * primary conflist (also k3s's directory), a primary CNI that rewrites its
 * file gets the chain back, and uninstall leaves every file byte for byte as
 * it was (file-level diff of the whole directories).
 */

const fixtures = fileURLToPath(new URL('../fixtures/cni/', import.meta.url));
const conf = pluginConf({ socket: '/var/run/fsm-node/cni.sock', spool: '/var/run/fsm-node/cni-spool' }, 'fail-closed');

/** Every file of a directory tree with its bytes: what `diff -r` compares. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name), join(rel, e.name));
      else out[join(rel, e.name)] = readFileSync(join(d, e.name), 'latin1');
    }
  };
  if (existsSync(dir)) walk(dir, '');
  return out;
}

describe('conflist splicing (pure)', () => {
  test.each(['10-flannel.conflist', '10-calico.conflist'])('%s: chain appends our plugin last, unchain restores the exact bytes', (name) => {
    const text = readFileSync(join(fixtures, name), 'utf8');
    expect(chainState(name, text, conf)).toBe('absent');
    const chained = chain(name, text, conf);
    const parsed = JSON.parse(chained) as { plugins: Array<{ type: string }> };
    expect(parsed.plugins[parsed.plugins.length - 1]).toEqual(conf);
    expect(parsed.plugins.slice(0, -1)).toEqual((JSON.parse(text) as { plugins: unknown[] }).plugins);
    expect(chainState(name, chained, conf)).toBe('current');
    expect(chain(name, chained, conf)).toBe(chained);
    expect(unchain(name, chained)).toBe(text);
    // A new conf (the failure policy followed the mesh) replaces the entry, still restorable.
    const other = pluginConf({ socket: '/s', spool: '/p' }, 'fail-open');
    expect(chainState(name, chained, other)).toBe('stale');
    const rechained = chain(name, chained, other);
    expect(unchain(name, rechained)).toBe(text);
  });

  test('a file that is not a conflist is refused with its name and the reason', () => {
    expect(() => chain('/x/bad.conflist', '{"plugins": [', conf)).toThrow(/\/x\/bad.conflist is not a CNI conflist we can chain into/);
    expect(() => chain('/x/empty.conflist', '{"name":"x","plugins":[]}', conf)).toThrow(/has no plugins/);
  });

  test('the primary is the lexically first conf file, as libcni picks it', () => {
    expect(primaryConfFile('/d', ['20-b.conflist', '10-a.conflist', 'README', '.hidden.conflist'])).toBe('/d/10-a.conflist');
    expect(primaryConfFile('/d', ['x.txt'])).toBeUndefined();
  });
});

describe('installer on real directories', () => {
  let root: string;
  let etc: string;
  let k3s: string;
  let bin: string;
  let binary: string;
  beforeEach(() => {
    root = mkdtempSync(join(tmpdir(), 'fsmt-cni-install-'));
    etc = join(root, 'etc/cni/net.d');
    k3s = join(root, 'var/lib/rancher/k3s/agent/etc/cni/net.d');
    bin = join(root, 'opt/cni/bin');
    for (const d of [etc, k3s, bin]) mkdirSync(d, { recursive: true });
    cpSync(join(fixtures, '10-calico.conflist'), join(etc, '10-calico.conflist'));
    writeFileSync(join(etc, '99-loopback.conf'), '{"cniVersion":"0.3.1","name":"lo","type":"loopback"}\n');
    cpSync(join(fixtures, '10-flannel.conflist'), join(k3s, '10-flannel.conflist'));
    binary = join(root, 'fsm-node-cni.built');
    writeFileSync(binary, '#!/bin/sh\nexit 0\n');
  });
  afterEach(() => rmSync(root, { recursive: true, force: true }));

  test('install, repair after the primary CNI rewrites its file, uninstall: every file as it was', () => {
    const before = snapshot(root);
    const o = { confDirs: [etc, k3s], binDir: bin, conf, binary };
    expect(installBinary(o)).toBe(true);
    expect(installBinary(o)).toBe(false);
    expect(ensureChained(o).changed.sort()).toEqual([join(etc, '10-calico.conflist'), join(k3s, '10-flannel.conflist')]);
    expect(ensureChained(o).changed).toEqual([]);
    const installed = snapshot(root);
    expect(Object.keys(installed).sort()).toEqual([...Object.keys(before), 'opt/cni/bin/fsm-node-cni'].sort());
    for (const f of ['etc/cni/net.d/10-calico.conflist', 'var/lib/rancher/k3s/agent/etc/cni/net.d/10-flannel.conflist']) {
      const plugins = (JSON.parse(installed[f]!) as { plugins: Array<{ type: string }> }).plugins;
      expect(plugins[plugins.length - 1]!.type).toBe('fsm-node-cni');
    }
    expect(installed['etc/cni/net.d/99-loopback.conf']).toBe(before['etc/cni/net.d/99-loopback.conf']);

    // The primary CNI rewrites its file (flannel restarting on k3s): our entry is gone; repair puts it back.
    cpSync(join(fixtures, '10-flannel.conflist'), join(k3s, '10-flannel.conflist'));
    expect(ensureChained(o).changed).toEqual([join(k3s, '10-flannel.conflist')]);
    expect(snapshot(root)).toEqual(installed);

    // A new primary sorts first: the chain moves there and leaves the old file as it was.
    cpSync(join(fixtures, '10-flannel.conflist'), join(etc, '05-cilium.conflist'));
    expect(ensureChained(o).changed.sort()).toEqual([join(etc, '05-cilium.conflist'), join(etc, '10-calico.conflist')]);
    expect(readFileSync(join(etc, '10-calico.conflist'), 'latin1')).toBe(before['etc/cni/net.d/10-calico.conflist']);
    rmSync(join(etc, '05-cilium.conflist'));
    ensureChained(o);

    expect(uninstall(o).sort()).toEqual([`binary ${join(bin, 'fsm-node-cni')}`, `chain entry in ${join(etc, '10-calico.conflist')}`, `chain entry in ${join(k3s, '10-flannel.conflist')}`].sort());
    expect(snapshot(root)).toEqual(before);
  });

  test('a single-plugin .conf primary is refused with the file and what to do; a directory without a CNI yet waits', () => {
    rmSync(join(etc, '10-calico.conflist'));
    writeFileSync(join(etc, '05-bridge.conf'), '{"cniVersion":"0.3.1","name":"b","type":"bridge"}\n');
    expect(() => ensureChained({ confDirs: [etc], binDir: bin, conf, binary })).toThrow(/05-bridge.conf: the primary CNI configuration is a single-plugin .conf file/);
    const empty = join(root, 'empty');
    mkdirSync(empty);
    expect(ensureChained({ confDirs: [empty, join(root, 'missing')], binDir: bin, conf, binary })).toEqual({ changed: [], waiting: [empty, join(root, 'missing')] });
  });

  test('the keeper repairs the chain by itself when the primary CNI rewrites its file', async () => {
    const keeper = new ChainKeeper({ confDirs: [k3s], binDir: bin, conf, binary }, 60_000);
    keeper.start();
    try {
      const installed = readFileSync(join(k3s, '10-flannel.conflist'), 'utf8');
      expect(installed).toContain('fsm-node-cni');
      cpSync(join(fixtures, '10-flannel.conflist'), join(k3s, '10-flannel.conflist'));
      for (let i = 0; i < 100 && readFileSync(join(k3s, '10-flannel.conflist'), 'utf8') !== installed; i++) await new Promise((r) => setTimeout(r, 20));
      expect(readFileSync(join(k3s, '10-flannel.conflist'), 'utf8')).toBe(installed);
      expect(keeper.status().repairs).toBe(1);
    } finally {
      keeper.stop();
    }
  });
});
