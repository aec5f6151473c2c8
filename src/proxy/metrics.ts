/**
 * Pipy's admin /metrics text -> a correct Prometheus exposition, re-exported
 * on the agent's /metrics. Pure: text in, text out; the agent does the HTTP.
 *
 * What Pipy gets wrong (see test/fixtures/pipy-metrics.txt, a real capture):
 * - histogram buckets are per bucket, not cumulative, and the last one is
 *   `le="Inf"` instead of `le="+Inf"`;
 * - every built-in labelled metric also prints an unlabelled line holding the
 *   sum over its labels, so `sum()` in PromQL counts everything twice;
 * - no HELP lines, counters without `_total`, gauges named `*_count`, and
 *   durations in milliseconds.
 *
 * Rules applied, in this order, per metric family:
 * 1. rename: Pipy's built-ins by the table below; the project's proxy program
 *    (proxy/metrics.js, `fsmn_proxy_*`) to `fsm_node_proxy_*`; anything else
 *    to `fsm_node_proxy_script_<name>`. A counter gets `_total` if it lacks
 *    it; a name in milliseconds (`_ms`) becomes `_seconds` and its values
 *    (bucket bounds, sums, counter and gauge values) are divided by 1000.
 * 2. drop the unlabelled total line of a family that also has labelled lines;
 * 3. make histogram buckets cumulative, `le` sorted, last bucket `+Inf`;
 * 4. add identity labels: the constant ones (node) on every line and, for a
 *    `peer="[ip]:port"` label naming a pod the agent knows, `peer_namespace`
 *    and `peer_pod`. A label the line already has is kept; ours is then
 *    dropped for that line rather than overwriting it.
 */

export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface Sample {
  /** Full sample name, e.g. `x_bucket` for a histogram family `x`. */
  name: string;
  labels: Array<[string, string]>;
  value: number;
}

export interface Family {
  name: string;
  type: MetricType;
  help?: string;
  samples: Sample[];
}

interface Builtin {
  name: string;
  help: string;
  /** The values are milliseconds; exported in seconds. */
  ms?: boolean;
}

/** Pipy's own metrics (src/listener.cpp, outbound.cpp, pipeline.cpp... upstream): new name and meaning. */
export const PIPY_BUILTINS: Readonly<Record<string, Builtin>> = {
  pipy_inbound_count: { name: 'fsm_node_proxy_inbound_connections', help: 'Open inbound connections of the node proxy, by listener.' },
  pipy_inbound_in: { name: 'fsm_node_proxy_inbound_received_bytes_total', help: 'Bytes the node proxy received on inbound connections, by listener.' },
  pipy_inbound_out: { name: 'fsm_node_proxy_inbound_sent_bytes_total', help: 'Bytes the node proxy sent on inbound connections, by listener.' },
  pipy_outbound_count: { name: 'fsm_node_proxy_outbound_connections', help: 'Open outbound connections of the node proxy, by protocol and peer.' },
  pipy_outbound_in: { name: 'fsm_node_proxy_outbound_received_bytes_total', help: 'Bytes the node proxy received on outbound connections, by protocol and peer.' },
  pipy_outbound_out: { name: 'fsm_node_proxy_outbound_sent_bytes_total', help: 'Bytes the node proxy sent on outbound connections, by protocol and peer.' },
  pipy_outbound_conn_time: { name: 'fsm_node_proxy_outbound_connect_duration_seconds', help: 'Time the node proxy took to connect to upstream peers.', ms: true },
  pipy_pipeline_count: { name: 'fsm_node_proxy_pipelines', help: 'Pipelines alive in the node proxy.' },
  pipy_object_count: { name: 'fsm_node_proxy_objects', help: 'Script objects alive in the node proxy.' },
  pipy_chunk_count: { name: 'fsm_node_proxy_buffer_chunks', help: 'Data buffer chunks allocated by the node proxy.' },
  pipy_http2_stream_count: { name: 'fsm_node_proxy_http2_streams', help: 'Open HTTP/2 streams in the node proxy, by type.' },
  pipy_pool_allocated_size: { name: 'fsm_node_proxy_pool_allocated_bytes', help: 'Bytes allocated from the node proxy memory pools, by class.' },
  pipy_pool_spare_size: { name: 'fsm_node_proxy_pool_spare_bytes', help: 'Bytes kept spare in the node proxy memory pools, by class.' },
};

/** Prefix of the project's Pipy program's own metrics (proxy/metrics.js). */
const PROGRAM_PREFIX = 'fsmn_proxy_';
export const EXPORT_PREFIX = 'fsm_node_proxy_';

// ---- parsing ------------------------------------------------------------------

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;

/** Labels of `{a="x",b="y"}` starting at text[i] === '{'; returns them and the index after '}'. */
function parseLabels(text: string, i: number): [Array<[string, string]>, number] | undefined {
  const labels: Array<[string, string]> = [];
  i += 1;
  for (;;) {
    while (text[i] === ' ' || text[i] === ',') i += 1;
    if (text[i] === '}') return [labels, i + 1];
    const m = NAME.exec(text.slice(i));
    if (!m || text[i + m[0].length] !== '=' || text[i + m[0].length + 1] !== '"') return undefined;
    i += m[0].length + 2;
    let value = '';
    for (; i < text.length && text[i] !== '"'; i += 1) {
      if (text[i] === '\\' && i + 1 < text.length) {
        i += 1;
        value += text[i] === 'n' ? '\n' : text[i];
      } else value += text[i];
    }
    if (i >= text.length) return undefined;
    labels.push([m[0], value]);
    i += 1;
  }
}

function parseValue(s: string): number | undefined {
  if (/^[+]?Inf$/i.test(s)) return Infinity;
  if (/^-Inf$/i.test(s)) return -Infinity;
  if (/^NaN$/i.test(s)) return NaN;
  const n = Number(s);
  return s !== '' && !Number.isNaN(n) ? n : undefined;
}

/** The family a sample belongs to: `x_bucket|_sum|_count` of a known histogram `x`, else its own name. */
function familyOf(sample: string, types: Map<string, MetricType>): string {
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!sample.endsWith(suffix)) continue;
    const base = sample.slice(0, -suffix.length);
    const t = types.get(base);
    if (t === 'histogram' || (t === 'summary' && suffix !== '_bucket')) return base;
  }
  return sample;
}

export interface Parsed {
  families: Family[];
  /** Lines that were neither a comment nor a sample Prometheus could read. */
  rejected: string[];
}

/** Prometheus text format as Pipy writes it; families in first-seen order, repeated TYPE lines merged. */
export function parseExposition(text: string): Parsed {
  const types = new Map<string, MetricType>();
  const helps = new Map<string, string>();
  const lines = text.split('\n');
  for (const line of lines) {
    const m = /^#\s+(TYPE|HELP)\s+([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(.*)$/.exec(line);
    if (!m) continue;
    if (m[1] === 'TYPE') {
      const t = m[3]!.trim();
      types.set(m[2]!, (['counter', 'gauge', 'histogram', 'summary'].includes(t) ? t : 'untyped') as MetricType);
    } else helps.set(m[2]!, m[3]!);
  }
  const families = new Map<string, Family>();
  const rejected: string[] = [];
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const name = NAME.exec(line)?.[0];
    let rest: [Array<[string, string]>, number] | undefined = name ? [[], name.length] : undefined;
    if (name && line[name.length] === '{') rest = parseLabels(line, name.length);
    const fields = rest ? line.slice(rest[1]).trim().split(/\s+/) : [];
    const value = parseValue(fields[0] ?? '');
    if (!name || !rest || value === undefined || fields.length > 2) {
      rejected.push(raw);
      continue;
    }
    const fam = familyOf(name, types);
    let f = families.get(fam);
    if (!f) {
      f = { name: fam, type: types.get(fam) ?? 'untyped', samples: [] };
      const help = helps.get(fam);
      if (help !== undefined) f.help = help;
      families.set(fam, f);
    }
    f.samples.push({ name, labels: rest[0], value });
  }
  return { families: [...families.values()], rejected };
}

// ---- normalising ----------------------------------------------------------------

export interface PodIdentity {
  namespace: string;
  name: string;
}

export interface NormaliseOptions {
  /** Labels put on every line (the agent: `node`). */
  constLabels?: Record<string, string>;
  /** The pod behind a peer IP, when it is one the agent knows (its node's pods). */
  podByIp?: (ip: string) => PodIdentity | undefined;
}

const sanitize = (s: string) => s.replace(/[^a-zA-Z0-9_]/g, '_').replace(/^([0-9])/, '_$1');

/** New family name, help and whether values are milliseconds to convert. */
export function exportedName(name: string, type: MetricType): { name: string; help: string; ms: boolean } {
  const builtin = PIPY_BUILTINS[name];
  if (builtin) return { name: builtin.name, help: builtin.help, ms: builtin.ms ?? false };
  let out = name.startsWith(PROGRAM_PREFIX) ? EXPORT_PREFIX + name.slice(PROGRAM_PREFIX.length) : `${EXPORT_PREFIX}script_${name}`;
  out = sanitize(out);
  let ms = false;
  if (/_ms(_total)?$/.test(out)) {
    out = out.replace(/_ms(_total)?$/, '_seconds$1');
    ms = true;
  }
  if (type === 'counter' && !out.endsWith('_total')) out += '_total';
  return { name: out, help: `Pipy ${type} ${name}, re-exported by the fsm-node agent.`, ms };
}

const labelKey = (labels: Array<[string, string]>) => JSON.stringify(labels.filter(([k]) => k !== 'le'));

/** Rule 2: the unlabelled sum lines go when the family has labelled lines (le does not count as a label). */
function dropUnlabelledTotals(samples: Sample[]): Sample[] {
  const labelled = samples.some((s) => s.labels.some(([k]) => k !== 'le'));
  return labelled ? samples.filter((s) => s.labels.some(([k]) => k !== 'le')) : samples;
}

/** Rule 3: per series (labels without le), buckets sorted by le and summed; a missing +Inf bucket is taken from _count. */
function cumulativeBuckets(family: string, samples: Sample[]): Sample[] {
  const series = new Map<string, { buckets: Array<{ le: number; s: Sample }>; count?: Sample; sum?: Sample }>();
  const order: string[] = [];
  for (const s of samples) {
    const key = labelKey(s.labels);
    let e = series.get(key);
    if (!e) {
      e = { buckets: [] };
      series.set(key, e);
      order.push(key);
    }
    if (s.name === `${family}_bucket`) {
      const le = parseValue(s.labels.find(([k]) => k === 'le')?.[1] ?? '');
      if (le !== undefined && !Number.isNaN(le)) e.buckets.push({ le, s });
    } else if (s.name === `${family}_count`) e.count = s;
    else if (s.name === `${family}_sum`) e.sum = s;
  }
  const out: Sample[] = [];
  for (const key of order) {
    const e = series.get(key)!;
    const base = (JSON.parse(key) as Array<[string, string]>);
    e.buckets.sort((a, b) => a.le - b.le);
    let total = 0;
    for (const b of e.buckets) {
      total += b.s.value;
      out.push({ name: `${family}_bucket`, labels: [...base, ['le', b.le === Infinity ? '+Inf' : String(b.le)]], value: total });
    }
    if (e.buckets.at(-1)?.le !== Infinity && e.count) out.push({ name: `${family}_bucket`, labels: [...base, ['le', '+Inf']], value: e.count.value });
    if (e.sum) out.push(e.sum);
    if (e.count) out.push(e.count);
  }
  return out;
}

const PEER = /^\[([0-9a-fA-F.:]+)\]:\d+$/;

/** Rule 4. */
function identify(labels: Array<[string, string]>, opts: NormaliseOptions): Array<[string, string]> {
  const out: Array<[string, string]> = labels.map(([k, v]) => [sanitize(k), v]);
  const has = (k: string) => out.some(([n]) => n === k);
  const add = (k: string, v: string) => {
    if (!has(k)) out.push([k, v]);
  };
  const peer = labels.find(([k]) => k === 'peer')?.[1];
  const ip = peer === undefined ? undefined : PEER.exec(peer)?.[1];
  const pod = ip === undefined ? undefined : opts.podByIp?.(ip);
  if (pod) {
    add('peer_namespace', pod.namespace);
    add('peer_pod', pod.name);
  }
  for (const [k, v] of Object.entries(opts.constLabels ?? {})) add(k, v);
  // le last, where Prometheus tools expect it.
  const le = out.findIndex(([k]) => k === 'le');
  if (le >= 0) out.push(...out.splice(le, 1));
  return out;
}

const msToSeconds = (n: number) => Number((n / 1000).toPrecision(12));

/** Rules 1-4 on parsed families; families that map to the same name are merged. */
export function normaliseFamilies(families: Family[], opts: NormaliseOptions = {}): Family[] {
  const out = new Map<string, Family>();
  for (const f of families) {
    const { name, help, ms } = exportedName(f.name, f.type);
    let samples = dropUnlabelledTotals(f.samples);
    if (f.type === 'histogram') samples = cumulativeBuckets(f.name, samples);
    const renamed = samples.map((s): Sample => {
      const suffix = f.type === 'histogram' || f.type === 'summary' ? s.name.slice(f.name.length) : '';
      let labels = s.labels;
      let value = s.value;
      if (ms) {
        if (suffix === '_bucket') labels = labels.map(([k, v]) => [k, k === 'le' && v !== '+Inf' ? String(msToSeconds(Number(v))) : v]);
        else if (suffix !== '_count') value = msToSeconds(value);
      }
      return { name: name + suffix, labels: identify(labels, opts), value };
    });
    const existing = out.get(name);
    if (existing) existing.samples.push(...renamed);
    else out.set(name, { name, type: f.type, help: f.help ?? help, samples: renamed });
  }
  return [...out.values()];
}

const escapeLabel = (v: string) => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
const escapeHelp = (v: string) => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');

function formatValue(n: number): string {
  if (n === Infinity) return '+Inf';
  if (n === -Infinity) return '-Inf';
  if (Number.isNaN(n)) return 'NaN';
  return String(n);
}

/** Prometheus text exposition format 0.0.4. */
export function renderExposition(families: Family[]): string {
  const lines: string[] = [];
  for (const f of families) {
    if (f.samples.length === 0) continue;
    lines.push(`# HELP ${f.name} ${escapeHelp(f.help ?? '')}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      const labels = s.labels.length ? `{${s.labels.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}` : '';
      lines.push(`${s.name}${labels} ${formatValue(s.value)}`);
    }
  }
  return lines.length ? lines.join('\n') + '\n' : '';
}

/** The whole way: Pipy's text -> what the agent appends to its /metrics. */
export function normalisePipyMetrics(text: string, opts: NormaliseOptions = {}): { text: string; rejected: string[] } {
  const parsed = parseExposition(text);
  return { text: renderExposition(normaliseFamilies(parsed.families, opts)), rejected: parsed.rejected };
}
