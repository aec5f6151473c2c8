/**
 * Pure parts of a reload done as a hand-over (docs/proxy.md, "Reload: a
 * hand-over"): the supervisor starts new Pipy instances with the new config
 * beside the running ones on the same ports, and once they listen retires the
 * old ones with SIGINT; proxy/drain.js holds each old instance until its
 * requests in flight are answered. These functions read what the instances
 * print, so the supervisor needs no channel into them.
 */

/** How a delivered config becomes live: a hand-over between instances (default), or Pipy's in-place SIGHUP reload. */
export type ReloadMode = 'handover' | 'signal';

export const RELOAD_MODES: readonly ReloadMode[] = ['handover', 'signal'];

/** The version proxy/config.js reports for a config.json text ('none' when it has none, as the program says). */
export function configVersion(text: string): string {
  try {
    const v = (JSON.parse(text) as { version?: unknown } | null)?.version;
    return v === undefined ? 'none' : String(v);
  } catch {
    return 'none';
  }
}

export interface DrainAck {
  /** Every worker thread of the program running `version` ended its drain. */
  done: boolean;
  /** Threads whose drain ended at the deadline with work left (cut connections or requests). */
  deadline: number;
}

/**
 * proxy/drain.js prints one line per worker thread when its drain ends:
 * `fsmn-proxy drain drained|idle|deadline version=V: requests R, connections C, clients K, started while draining N`
 * (idle: only idle keep-alive connections of clients were left, and closed).
 * Lines of other versions come from programs an earlier SIGHUP replaced,
 * whose exit callbacks Pipy still runs; they do not count.
 */
export function parseDrainAck(logTail: string, version: string, threads: number): DrainAck {
  let ended = 0;
  let deadline = 0;
  for (const m of logTail.matchAll(/fsmn-proxy drain (drained|idle|deadline) version=(\S*): /g)) {
    if (m[2] !== version) continue;
    ended += 1;
    if (m[1] === 'deadline') deadline += 1;
  }
  return { done: ended >= threads, deadline };
}

/** Why a new instance exited before listening: the program's error lines from its log (Pipy prints `[ERR]`), or its last lines. */
export function startFailure(logTail: string, maxChars = 600): string {
  const lines = logTail.split('\n').filter((l) => l.trim() !== '');
  const errors = lines.filter((l) => l.includes('[ERR]'));
  const text = (errors.length ? errors : lines.slice(-5)).map((l) => l.replace(/^\S+ \S+ \[ERR\] /, '').trim()).join(' | ');
  return text.length > maxChars ? `${text.slice(0, maxChars)}...` : text || 'no output';
}
