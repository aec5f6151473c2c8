import { pino, type Logger } from 'pino';

/**
 * The root logger. JSON lines by default (what a DaemonSet log collector
 * wants); each module takes its own child with `logger('name')` so every line
 * says where it came from. FSMN_LOG_LEVEL sets the level (default info; tests
 * default to silent unless FSMN_LOG_LEVEL is set).
 */
const level = process.env.FSMN_LOG_LEVEL ?? (process.env.JEST_WORKER_ID ? 'silent' : 'info');

export const rootLogger: Logger = pino({
  level,
  base: { pid: process.pid },
  redact: { paths: ['token', '*.token', 'authorization', '*.authorization'], censor: '[redacted]' },
});

export function logger(module: string): Logger {
  return rootLogger.child({ module });
}

export type { Logger };
