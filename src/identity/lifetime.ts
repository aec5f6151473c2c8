import { InvalidInputError } from '../errors.js';

/** Workload certificate lifetimes (docs/security.md "Lifetimes"). */
export const DEFAULT_CERT_LIFETIME_MS = 24 * 3600_000;
/** Short enough for rotation tests (2-minute certificates), long enough that half-life renewal is not a storm. */
export const MIN_CERT_LIFETIME_MS = 60_000;
/** Edge sites offline for weeks may want long certificates; a year is the ceiling. */
export const MAX_CERT_LIFETIME_MS = 366 * 24 * 3600_000;

const UNIT: Record<string, number> = { s: 1000, m: 60_000, h: 3600_000, d: 24 * 3600_000 };

/** "24h", "7d", "90m", "120s" -> milliseconds within [1 min, 366 d]; InvalidInputError naming `field` otherwise. */
export function parseLifetime(value: string, field: string): number {
  const m = typeof value === 'string' ? /^(\d+)(s|m|h|d)$/.exec(value.trim()) : null;
  if (!m) throw new InvalidInputError(field, value, 'expected a duration such as 24h, 7d or 90m');
  const ms = Number(m[1]) * UNIT[m[2]!]!;
  if (ms < MIN_CERT_LIFETIME_MS || ms > MAX_CERT_LIFETIME_MS) throw new InvalidInputError(field, value, 'must be between 1m and 366d');
  return ms;
}
