import { parseExposition, type MetricType } from './metrics.js';

/**
 * One node proxy, several Pipy instances: their admin /metrics summed into one
 * Pipy-shaped exposition (normalised afterwards by metrics.ts, as a single
 * instance's would be). Pure apart from the state it keeps between scrapes.
 *
 * Counters (and every sample of a histogram or summary, whose buckets, sums
 * and counts only grow) are kept as running totals per instance slot: a value
 * lower than the last one seen (a reload that re-created the program's
 * counters) or a new process in the slot (a restart) is a reset of that
 * slot's series, whose total so far is carried as an offset. The exported
 * sum therefore never goes down while the agent runs, so Prometheus' rate()
 * sees no false reset when one instance restarts and the others keep
 * counting. Gauges are summed over the instances alive now.
 */

interface Series {
  family: string;
  name: string;
  labels: Array<[string, string]>;
}

interface SlotState {
  /** The process the totals were last read from (pid and start time). */
  instance: string;
  /** Series key -> last value read and the totals of earlier resets. */
  counters: Map<string, { last: number; offset: number }>;
  /** Series key -> value in the last scrape. */
  gauges: Map<string, number>;
}

const grows = (t: MetricType): boolean => t === 'counter' || t === 'histogram' || t === 'summary';
const keyOf = (name: string, labels: Array<[string, string]>): string => `${name}${JSON.stringify(labels)}`;

function formatValue(n: number): string {
  if (n === Infinity) return '+Inf';
  if (n === -Infinity) return '-Inf';
  return Number.isNaN(n) ? 'NaN' : String(Number(n.toPrecision(15)));
}

const escapeLabel = (v: string): string => v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');

export class InstanceMetricsSum {
  private readonly slots = new Map<number, SlotState>();
  /** Family name -> type, in first-seen order. */
  private readonly families = new Map<string, MetricType>();
  /** Series key -> identity, in first-seen order. */
  private readonly series = new Map<string, Series>();

  /** One scrape of the instance `instance` (pid:startTime) running in `slot`. */
  observe(slot: number, instance: string, text: string): void {
    let s = this.slots.get(slot);
    if (!s) {
      s = { instance, counters: new Map(), gauges: new Map() };
      this.slots.set(slot, s);
    } else if (s.instance !== instance) {
      // A new process in the slot starts from zero: everything so far is history.
      for (const c of s.counters.values()) {
        c.offset += c.last;
        c.last = 0;
      }
      s.instance = instance;
    }
    s.gauges = new Map();
    for (const f of parseExposition(text).families) {
      if (!this.families.has(f.name)) this.families.set(f.name, f.type);
      const counter = grows(this.families.get(f.name)!);
      for (const sample of f.samples) {
        const key = keyOf(sample.name, sample.labels);
        if (!this.series.has(key)) this.series.set(key, { family: f.name, name: sample.name, labels: sample.labels });
        if (!counter) {
          s.gauges.set(key, sample.value);
          continue;
        }
        const c = s.counters.get(key) ?? { last: 0, offset: 0 };
        if (sample.value < c.last) c.offset += c.last;
        c.last = sample.value;
        s.counters.set(key, c);
      }
    }
  }

  /**
   * The summed exposition: counters over every slot ever seen (their totals
   * outlive the process), gauges only of the instances alive now (`alive`:
   * slot -> the instance running in it). Empty when nothing was observed.
   */
  render(alive: ReadonlyMap<number, string>): string {
    const totals = new Map<string, number>();
    for (const [slot, s] of this.slots) {
      for (const [key, c] of s.counters) totals.set(key, (totals.get(key) ?? 0) + c.offset + c.last);
      if (alive.get(slot) !== s.instance) continue;
      for (const [key, v] of s.gauges) totals.set(key, (totals.get(key) ?? 0) + v);
    }
    const byFamily = new Map<string, string[]>();
    for (const [key, ser] of this.series) {
      const v = totals.get(key);
      if (v === undefined) continue;
      const labels = ser.labels.length ? `{${ser.labels.map(([k, val]) => `${k}="${escapeLabel(val)}"`).join(',')}}` : '';
      const lines = byFamily.get(ser.family) ?? [];
      lines.push(`${ser.name}${labels} ${formatValue(v)}`);
      byFamily.set(ser.family, lines);
    }
    const out: string[] = [];
    for (const [family, type] of this.families) {
      const lines = byFamily.get(family);
      if (lines?.length) out.push(`# TYPE ${family} ${type}`, ...lines);
    }
    return out.length ? out.join('\n') + '\n' : '';
  }

  /** Series kept (tests, and a bound check: Pipy's own series count times the slots). */
  size(): number {
    return this.series.size;
  }
}
