import { watch, type FSWatcher } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { basename, join, relative } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { errorMessage } from '../../errors.js';
import type { PolicyCompiler } from '../../policy/compiler.js';
import { CLUSTER_SCOPED, isKind, KINDS, type Kind } from '../../policy/objects.js';
import { logger } from '../../util/log.js';

const log = logger('source-directory');

type ParsedDoc = { origin: string; bad: { field: string; message: string } } | { origin: string; doc: Doc };

interface CachedFile {
  stamp: string;
  docs: ParsedDoc[];
}

interface Doc {
  kind: Kind;
  namespace: string;
  name: string;
  obj: unknown;
  /** file#index: where the document sits, for reports and for keeping last good copies. */
  origin: string;
  text: string;
}

export interface DirectorySourceOptions {
  dir: string;
  compiler: PolicyCompiler;
  /** Called after each load that fed the compiler (compile and publish from there). */
  onChange: () => void;
  debounceMs?: number;
}

/**
 * A directory of Kubernetes YAML manifests (*.yaml, *.yml, multi-document,
 * subdirectories included) as the source of cluster state: the embedded
 * default and what the lab uses. Watched and reloaded on change.
 *
 * A document that cannot be read as an object (YAML error, no kind or name,
 * an unknown kind) is reported by file and index and skipped; whatever that
 * position held at the last good load stays in force. A second document with
 * the same kind/namespace/name is reported as a duplicate; the first (in
 * path order) wins. Objects that fail their own checks are reported by the
 * compiler, which keeps their last good version.
 */
export class DirectorySource {
  private current = new Map<string, Doc>();
  /** Every manifest file seen, with its parsed documents: a reload re-reads only what changed. */
  private files = new Map<string, CachedFile>();
  /**
   * One inotify watch per directory (fs.watch without `recursive`): Node 20's
   * recursive mode on Linux misses deletions of files created after it started.
   */
  private readonly watchers = new Map<string, FSWatcher>();
  /** Paths named by watch events since the last load; `rescan` when a directory came or went. */
  private readonly pending = new Set<string>();
  private rescan = true;
  private timer: NodeJS.Timeout | undefined;
  private loading: Promise<void> = Promise.resolve();
  private readonly reportedOrigins = new Set<string>();

  constructor(private readonly o: DirectorySourceOptions) {}

  async start(): Promise<void> {
    await this.reload();
  }

  async stop(): Promise<void> {
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
    clearTimeout(this.timer);
    await this.loading;
  }

  /** Look at every file again (parsing only changed ones) and feed the differences to the compiler. Loads never overlap. */
  reload(): Promise<void> {
    this.rescan = true;
    return this.enqueue();
  }

  private enqueue(): Promise<void> {
    this.loading = this.loading.then(() => this.load()).catch((err) => log.error({ err: errorMessage(err) }, 'manifest reload failed; previous objects kept'));
    return this.loading;
  }

  private schedule(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.enqueue(), this.o.debounceMs ?? 10);
  }

  /**
   * Bring `files` up to date: everything on a rescan, otherwise just the paths
   * events named. Returns the files whose documents changed, with what they
   * held before, or undefined after a rescan.
   */
  private async refreshFiles(): Promise<Map<string, CachedFile | undefined> | undefined> {
    if (!this.rescan) {
      const paths = [...this.pending];
      this.pending.clear();
      const previous = new Map<string, CachedFile | undefined>();
      for (const path of paths) {
        const st = await stat(path).catch(() => undefined);
        if (st?.isDirectory() || (!st && this.watchers.has(path))) {
          this.rescan = true; // a directory came or went
          break;
        }
        const old = this.files.get(path);
        if (!st) this.files.delete(path);
        else if (isManifestFile(basename(path))) {
          const parsed = await this.parsed(path);
          if (parsed) this.files.set(path, parsed);
        }
        if (this.files.get(path) !== old && !previous.has(path)) previous.set(path, old);
      }
      if (!this.rescan) return previous;
    }
    this.rescan = false;
    this.pending.clear();
    const { dirs, files } = await listTree(this.o.dir);
    // Watch first, then read: a file written in between is still seen by one or the other.
    for (const [dir, w] of this.watchers) {
      if (dirs.includes(dir)) continue;
      w.close();
      this.watchers.delete(dir);
    }
    for (const dir of dirs) if (!this.watchers.has(dir)) this.watch(dir);
    const next = new Map<string, CachedFile>();
    for (const file of files) {
      const parsed = await this.parsed(file);
      if (parsed) next.set(file, parsed);
    }
    this.files = next;
    return undefined;
  }

  private watch(dir: string): void {
    try {
      const w = watch(dir, (_event, name) => {
        if (name) this.pending.add(join(dir, name));
        else this.rescan = true;
        this.schedule();
      });
      w.on('error', () => {
        this.rescan = true;
        this.schedule();
      });
      this.watchers.set(dir, w);
    } catch (err) {
      log.warn({ dir, err: errorMessage(err) }, 'cannot watch a manifest directory; changes there need a restart');
    }
  }

  private async load(): Promise<void> {
    const previous = await this.refreshFiles();
    if (previous && this.loadChanged(previous)) return;
    const reporter = this.o.compiler.reporter;
    const next = new Map<string, Doc>();
    const badOrigins = new Set<string>();
    for (const file of [...this.files.keys()].sort()) {
      for (const p of this.files.get(file)!.docs) {
        if ('bad' in p) {
          badOrigins.add(p.origin);
          const ref = { kind: 'Document', namespace: '', name: p.origin };
          reporter.report({ ref, stage: 'source', ...p.bad, origin: p.origin, keptLastGood: this.heldAt(p.origin) !== undefined });
          continue;
        }
        const { doc } = p;
        const key = docKey(doc);
        const first = next.get(key);
        if (first) {
          badOrigins.add(doc.origin);
          const ref = { kind: doc.kind, namespace: doc.namespace, name: doc.name };
          reporter.report({ ref, stage: 'source', field: 'metadata.name', message: `duplicate of ${first.origin}; ${doc.origin} ignored`, origin: doc.origin, keptLastGood: true });
          continue;
        }
        next.set(key, doc);
      }
    }
    // A bad position keeps what it held at the last good load.
    for (const origin of badOrigins) {
      const h = this.heldAt(origin);
      if (h && !next.has(h[0])) next.set(h[0], h[1]);
    }
    for (const origin of this.reportedOrigins) if (!badOrigins.has(origin)) this.clearSourceIssue(origin);
    this.reportedOrigins.clear();
    for (const o of badOrigins) this.reportedOrigins.add(o);

    let changes = 0;
    for (const [key, doc] of this.current) {
      if (next.has(key)) continue;
      this.o.compiler.remove({ kind: doc.kind, namespace: doc.namespace, name: doc.name });
      changes++;
    }
    for (const [key, doc] of next) {
      if (this.current.get(key)?.text === doc.text) continue;
      this.o.compiler.upsert(doc.kind, doc.obj, doc.origin);
      changes++;
    }
    this.current = next;
    log.debug({ files: this.files.size, objects: next.size, changes }, 'manifests loaded');
    if (changes > 0) this.o.onChange();
  }

  /**
   * The common case in time proportional to the files that changed, not to
   * the directory (a 14k-object directory costs ~15 ms to walk): nothing was
   * reported at the last load (so every document held is the only one of its
   * key) and the changed files bring no bad document and no duplicate.
   * Anything else returns false before changing anything, and the full walk
   * above decides.
   */
  private loadChanged(previous: Map<string, CachedFile | undefined>): boolean {
    if (this.reportedOrigins.size > 0) return false;
    const changedFiles = new Set([...previous.keys()].map((f) => relative(this.o.dir, f)));
    const incoming = new Map<string, Doc>();
    for (const file of previous.keys()) {
      for (const p of this.files.get(file)?.docs ?? []) {
        if ('bad' in p) return false;
        const key = docKey(p.doc);
        const held = this.current.get(key);
        if (incoming.has(key) || (held && !changedFiles.has(fileOf(held.origin)))) return false;
        incoming.set(key, p.doc);
      }
    }
    let changes = 0;
    for (const old of previous.values()) {
      for (const p of old?.docs ?? []) {
        if ('bad' in p) continue;
        const key = docKey(p.doc);
        if (incoming.has(key) || !this.current.delete(key)) continue;
        this.o.compiler.remove({ kind: p.doc.kind, namespace: p.doc.namespace, name: p.doc.name });
        changes++;
      }
    }
    for (const [key, doc] of incoming) {
      if (this.current.get(key)?.text !== doc.text) {
        this.o.compiler.upsert(doc.kind, doc.obj, doc.origin);
        changes++;
      }
      this.current.set(key, doc);
    }
    log.debug({ files: previous.size, objects: this.current.size, changes }, 'manifests loaded (changed files only)');
    if (changes > 0) this.o.onChange();
    return true;
  }

  /** What a document position held at the last load (bad documents are rare: a scan is fine). */
  private heldAt(origin: string): [string, Doc] | undefined {
    for (const e of this.current) if (e[1].origin === origin) return e;
    return undefined;
  }

  /** A file's documents, parsed again only when the file changed (big directories reload one file). */
  private async parsed(file: string): Promise<CachedFile | undefined> {
    try {
      const st = await stat(file);
      const stamp = `${st.mtimeMs}:${st.size}:${st.ino}`;
      const cached = this.files.get(file);
      if (cached?.stamp === stamp) return cached;
      return { stamp, docs: parseManifest(relative(this.o.dir, file), await readFile(file, 'utf8')) };
    } catch (err) {
      // Vanished between listing and reading (an editor's rename): the next event reloads.
      log.debug({ file, err: errorMessage(err) }, 'manifest unreadable');
      return undefined;
    }
  }

  private clearSourceIssue(origin: string): void {
    const reporter = this.o.compiler.reporter;
    for (const i of reporter.active()) if (i.stage === 'source' && i.origin === origin) reporter.clear(i.ref, 'source');
  }
}

/** The documents of one manifest file, each either an object we know or the reason it is not. */
export function parseManifest(file: string, text: string): ParsedDoc[] {
  const out: ParsedDoc[] = [];
  parseAllDocuments(text).forEach((d, i) => {
    const origin = `${file}#${i}`;
    const bad = (field: string, message: string) => void out.push({ origin, bad: { field, message } });
    if (d.errors.length > 0) return bad('(document)', `YAML: ${d.errors[0]!.message.split('\n')[0]}`);
    const obj = d.toJS() as Record<string, unknown> | null;
    if (obj === null || obj === undefined) return; // an empty document (trailing ---)
    if (typeof obj !== 'object' || Array.isArray(obj)) return bad('(document)', 'is not a mapping');
    const { kind, apiVersion } = obj;
    if (!isKind(kind)) return bad('kind', `unknown kind ${JSON.stringify(kind)} (known: ${Object.keys(KINDS).join(', ')})`);
    if (!(KINDS[kind] as readonly string[]).includes(apiVersion as string)) return bad('apiVersion', `${JSON.stringify(apiVersion)} is not supported for ${kind} (use ${KINDS[kind].join(', ')})`);
    const meta = (obj.metadata ?? {}) as Record<string, unknown>;
    if (typeof meta.name !== 'string' || meta.name === '') return bad('metadata.name', 'is required');
    const namespace = CLUSTER_SCOPED.has(kind) ? '' : typeof meta.namespace === 'string' ? meta.namespace : 'default';
    out.push({ origin, doc: { kind, namespace, name: meta.name, obj, origin, text: JSON.stringify(obj) } });
  });
  return out;
}

const docKey = (d: Doc): string => `${d.kind}/${d.namespace}/${d.name}`;
/** The file part of an origin (file#index). */
const fileOf = (origin: string): string => origin.slice(0, origin.lastIndexOf('#'));

const isManifestFile = (name: string): boolean => /\.ya?ml$/.test(name) && !name.startsWith('.');

/** The directory and its subdirectories, and the manifest files in them. */
async function listTree(root: string): Promise<{ dirs: string[]; files: string[] }> {
  const dirs = [root];
  const files: string[] = [];
  for (const e of await readdir(root, { withFileTypes: true, recursive: true })) {
    const path = join(e.parentPath ?? e.path, e.name);
    if (e.isDirectory()) dirs.push(path);
    else if (e.isFile() && isManifestFile(e.name)) files.push(path);
  }
  return { dirs, files };
}
