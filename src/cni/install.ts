import { chmodSync, existsSync, readdirSync, readFileSync, renameSync, rmSync, statSync, watch, writeFileSync, type FSWatcher } from 'node:fs';
import { join } from 'node:path';
import { errorMessage, FsmNodeError } from '../errors.js';
import { logger } from '../util/log.js';
import { packageRoot } from '../util/paths.js';
import { chain, chainState, unchain } from './conflist.js';
import { PLUGIN_TYPE, type PluginConf } from './protocol.js';

const log = logger('cni.install');

/**
 * The agent's CNI installer: copies the plugin binary into the node's CNI bin
 * directory and chains the plugin's conf into the primary CNI's conflist in
 * every configured conf directory (/etc/cni/net.d, k3s's
 * /var/lib/rancher/k3s/agent/etc/cni/net.d). The primary is the file the
 * runtime uses: the lexically first *.conflist / *.conf / *.json. It keeps the
 * chain when the primary CNI rewrites its file (watch + periodic check) and
 * moves with the primary when another file takes its place; uninstall leaves
 * every file as it was before install (src/cni/conflist.ts splices text).
 */

export const PLUGIN_BINARY = 'fsm-node-cni';
export const pluginBuildPath = (): string => join(packageRoot(), 'cni', 'build', PLUGIN_BINARY);

export interface InstallOptions {
  confDirs: string[];
  binDir: string;
  /** The plugin's entry in the chain (without name/cniVersion, which the runtime adds). */
  conf: PluginConf;
  /** The built plugin (default: cni/build/fsm-node-cni of this package). */
  binary?: string;
}

export class CniInstallError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('FSMN_ERR_CNI_INSTALL', message, options);
  }
}

/** The conf file the runtime loads from a directory (libcni: sorted by name, the first that parses). */
export function primaryConfFile(dir: string, names: string[] = existsSync(dir) ? readdirSync(dir) : []): string | undefined {
  const confs = names.filter((n) => /\.(conflist|conf|json)$/.test(n) && !n.startsWith('.')).sort();
  return confs[0] === undefined ? undefined : join(dir, confs[0]);
}

function writeAtomic(path: string, text: string): void {
  const mode = existsSync(path) ? statSync(path).mode & 0o777 : 0o644;
  // The temporary name has no .conf* suffix: a runtime listing the directory meanwhile ignores it.
  const tmp = join(path, '..', `.${PLUGIN_TYPE}.tmp`);
  writeFileSync(tmp, text, { mode });
  chmodSync(tmp, mode);
  renameSync(tmp, path);
}

export interface EnsureReport {
  changed: string[];
  /** Directories without a primary CNI conf yet (the chain is added when one appears). */
  waiting: string[];
}

/** Make every conf dir chain our plugin into its primary conflist, and only there. Idempotent. */
export function ensureChained(o: InstallOptions): EnsureReport {
  const report: EnsureReport = { changed: [], waiting: [] };
  for (const dir of o.confDirs) {
    if (!existsSync(dir)) {
      report.waiting.push(dir);
      continue;
    }
    const names = readdirSync(dir);
    const primary = primaryConfFile(dir, names);
    if (!primary) {
      report.waiting.push(dir);
      continue;
    }
    if (!primary.endsWith('.conflist')) {
      throw new CniInstallError(`${primary}: the primary CNI configuration is a single-plugin .conf file; fsm-node chains only into a .conflist (convert it, or configure the primary CNI to write a conflist)`);
    }
    const text = readFileSync(primary, 'utf8');
    if (chainState(primary, text, o.conf) !== 'current') {
      writeAtomic(primary, chain(primary, text, o.conf));
      report.changed.push(primary);
    }
    // The primary moved (a new file sorts first): leave no entry of ours elsewhere.
    for (const n of names) {
      const f = join(dir, n);
      if (f === primary || !n.endsWith('.conflist')) continue;
      const t = readFileSync(f, 'utf8');
      if (!t.includes(PLUGIN_TYPE)) continue;
      const u = unchain(f, t);
      if (u !== t) {
        writeAtomic(f, u);
        report.changed.push(f);
      }
    }
  }
  return report;
}

/** Copy the plugin into the CNI bin dir when it differs (atomically: a runtime may exec it right now). */
export function installBinary(o: InstallOptions): boolean {
  const src = o.binary ?? pluginBuildPath();
  if (!existsSync(src)) throw new CniInstallError(`the CNI plugin binary ${src} does not exist: build it with npm run build:cni`);
  const dst = join(o.binDir, PLUGIN_BINARY);
  const bytes = readFileSync(src);
  if (existsSync(dst) && readFileSync(dst).equals(bytes)) return false;
  const tmp = join(o.binDir, `.${PLUGIN_BINARY}.tmp`);
  writeFileSync(tmp, bytes, { mode: 0o755 });
  renameSync(tmp, dst);
  return true;
}

/** Remove our entry from every conflist of the conf dirs and the binary: the node's CNI config as before install. */
export function uninstall(o: Pick<InstallOptions, 'confDirs' | 'binDir'>): string[] {
  const removed: string[] = [];
  for (const dir of o.confDirs) {
    if (!existsSync(dir)) continue;
    for (const n of readdirSync(dir)) {
      if (!n.endsWith('.conflist')) continue;
      const f = join(dir, n);
      const t = readFileSync(f, 'utf8');
      if (!t.includes(PLUGIN_TYPE)) continue;
      const u = unchain(f, t);
      if (u !== t) {
        writeAtomic(f, u);
        removed.push(`chain entry in ${f}`);
      }
    }
  }
  const bin = join(o.binDir, PLUGIN_BINARY);
  if (existsSync(bin)) {
    rmSync(bin);
    removed.push(`binary ${bin}`);
  }
  return removed;
}

/**
 * Keeps the chain: re-checks on every change in the conf dirs (the primary
 * CNI rewrote its file, a new primary appeared) and every `periodMs`.
 */
export class ChainKeeper {
  private watchers: FSWatcher[] = [];
  private timer: NodeJS.Timeout | undefined;
  private debounce: NodeJS.Timeout | undefined;
  private lastError: string | undefined;
  repairs = 0;

  constructor(
    private opts: InstallOptions,
    private readonly periodMs = 5000,
  ) {}

  start(): void {
    installBinary(this.opts);
    this.check('start');
    for (const dir of this.opts.confDirs) {
      try {
        this.watchers.push(watch(dir, () => this.soon()));
      } catch {
        // Not there yet (k3s creates its directory with its agent): the periodic check finds it.
      }
    }
    this.timer = setInterval(() => this.check('periodic'), this.periodMs);
    this.timer.unref();
  }

  /** A new conf (the failure policy follows the mesh): rewrite the entry. */
  update(conf: PluginConf): void {
    if (JSON.stringify(conf) === JSON.stringify(this.opts.conf)) return;
    this.opts = { ...this.opts, conf };
    this.check('plugin conf changed');
  }

  stop(): void {
    for (const w of this.watchers) w.close();
    this.watchers = [];
    clearInterval(this.timer);
    clearTimeout(this.debounce);
  }

  private soon(): void {
    clearTimeout(this.debounce);
    this.debounce = setTimeout(() => this.check('conf dir changed'), 50);
    this.debounce.unref();
  }

  check(reason: string): void {
    try {
      const r = ensureChained(this.opts);
      if (r.changed.length) {
        if (reason !== 'start') this.repairs++;
        log.info({ reason, changed: r.changed }, 'CNI chain written');
      }
      this.lastError = undefined;
    } catch (err) {
      const msg = errorMessage(err);
      if (msg !== this.lastError) log.error({ reason, err: msg }, 'cannot keep fsm-node-cni in the CNI chain; retried');
      this.lastError = msg;
    }
  }

  status(): { confDirs: string[]; binDir: string; repairs: number; error?: string } {
    return { confDirs: this.opts.confDirs, binDir: this.opts.binDir, repairs: this.repairs, ...(this.lastError ? { error: this.lastError } : {}) };
  }
}
