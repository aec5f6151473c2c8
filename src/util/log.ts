import { destination, pino, type Logger } from 'pino';

/**
 * The root logger. JSON lines by default (what a DaemonSet log collector
 * wants); one readable line per record when stdout is a terminal (or
 * FSMN_LOG_FORMAT=pretty; FSMN_LOG_FORMAT=json forces JSON). Each module takes
 * its own child with `logger('name')` so every line says where it came from.
 * FSMN_LOG_LEVEL sets the level (default info; tests default to silent).
 * FSMN_LOG_DEST=stderr sends the records to stderr, for programs whose stdout
 * is data (the benchmarks print result rows there).
 */
const level = process.env.FSMN_LOG_LEVEL ?? (process.env.JEST_WORKER_ID ? 'silent' : 'info');
const out = process.env.FSMN_LOG_DEST === 'stderr' ? process.stderr : process.stdout;
const format = process.env.FSMN_LOG_FORMAT ?? (out.isTTY ? 'pretty' : 'json');

const levelNames: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO ', 40: 'WARN ', 50: 'ERROR', 60: 'FATAL' };

/** One pino JSON record as a terminal line: `12:00:01.123 WARN  agent: message key=value ...`. */
export function prettyLine(json: string): string {
  let rec: Record<string, unknown>;
  try {
    rec = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json.endsWith('\n') ? json : json + '\n';
  }
  const { level: lvl, time, msg, module, pid: _pid, hostname: _host, ...rest } = rec;
  const when = typeof time === 'number' ? new Date(time).toISOString().slice(11, 23) : '';
  const fields = Object.entries(rest).map(([k, v]) => `${k}=${typeof v === 'string' && !/\s/.test(v) ? v : JSON.stringify(v)}`);
  return `${when} ${levelNames[lvl as number] ?? String(lvl)} ${String(module ?? '-')}: ${String(msg ?? '')}${fields.length ? ' ' + fields.join(' ') : ''}\n`;
}

const options = {
  level,
  base: { pid: process.pid },
  redact: { paths: ['token', '*.token', 'authorization', '*.authorization'], censor: '[redacted]' },
};

export const rootLogger: Logger =
  format === 'pretty' ? pino(options, { write: (line: string) => out.write(prettyLine(line)) }) : pino(options, destination(out === process.stderr ? 2 : 1));

export function logger(module: string): Logger {
  return rootLogger.child({ module });
}

export type { Logger };
