import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { InvalidInputError } from '../errors.js';
import { writeFileAtomic } from '../policy/store.js';

/**
 * ClusterSetIP allocation. Each cluster picks the virtual IPs of its own
 * imports (the KEP leaves the address to the importing cluster) from a
 * configurable IPv4 CIDR, and keeps them:
 *
 * - an import that has an address keeps it for as long as it exists and the
 *   address is still inside the CIDR (a pod holding a connection to it, or a
 *   DNS answer in a cache, stays right);
 * - a new import first tries the address its name hashes to, then the next
 *   free ones: clusters with the same CIDR usually agree, and the order in
 *   which imports appear does not matter for most of them;
 * - the table is saved (state directory) and read back at start, so a
 *   restarted controller hands out the same addresses.
 *
 * The network and broadcast addresses of the CIDR are never used.
 */

export interface Cidr4 {
  base: number;
  bits: number;
  /** Usable addresses (size minus network and broadcast for /30 and wider). */
  first: number;
  last: number;
}

export function ipToInt(ip: string): number {
  const p = ip.split('.').map(Number);
  return (((p[0]! << 24) >>> 0) + (p[1]! << 16) + (p[2]! << 8) + p[3]!) >>> 0;
}

export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

export function parseCidr4(cidr: string, field = 'clustersetCidr'): Cidr4 {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(cidr);
  if (!m || m.slice(1, 5).some((o) => Number(o) > 255) || Number(m[5]) > 32) throw new InvalidInputError(field, cidr, 'must be an IPv4 CIDR such as 241.0.0.0/16');
  const bits = Number(m[5]);
  if (bits > 30) throw new InvalidInputError(field, cidr, 'is too small: at least a /30 (two usable addresses)');
  const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
  const base = (ipToInt(`${m[1]}.${m[2]}.${m[3]}.${m[4]}`) & mask) >>> 0;
  const size = 2 ** (32 - bits);
  return { base, bits, first: base + 1, last: base + size - 2 };
}

export function inCidr(ip: string, c: Cidr4): boolean {
  const n = ipToInt(ip);
  return n >= c.first && n <= c.last;
}

export interface Allocation {
  /** key (ns/name) -> address, for every key that got one. */
  ips: Record<string, string>;
  /** Keys left without an address: the CIDR is full. */
  exhausted: string[];
}

/**
 * Addresses for `keys` (the ClusterSetIP imports, any order), keeping
 * `previous` where it still applies. Pure: same arguments, same answer.
 */
export function allocate(keys: readonly string[], cidr: Cidr4, previous: Readonly<Record<string, string>>): Allocation {
  const wanted = [...new Set(keys)].sort();
  const ips: Record<string, string> = {};
  const used = new Set<number>();
  for (const k of wanted) {
    const ip = previous[k];
    if (ip !== undefined && /^\d+\.\d+\.\d+\.\d+$/.test(ip) && inCidr(ip, cidr) && !used.has(ipToInt(ip))) {
      ips[k] = ip;
      used.add(ipToInt(ip));
    }
  }
  const size = cidr.last - cidr.first + 1;
  const exhausted: string[] = [];
  for (const k of wanted) {
    if (ips[k] !== undefined) continue;
    if (used.size >= size) {
      exhausted.push(k);
      continue;
    }
    let n = cidr.first + (createHash('sha256').update(k).digest().readUInt32BE(0) % size);
    while (used.has(n)) n = n === cidr.last ? cidr.first : n + 1;
    used.add(n);
    ips[k] = intToIp(n);
  }
  return { ips, exhausted };
}

/** The allocation table on disk ({"ns/name": "ip"}), written atomically. A missing file is an empty table. */
export async function loadAllocations(path: string): Promise<Record<string, string>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw err;
  }
  const v = JSON.parse(text) as unknown;
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new InvalidInputError(path, v, 'is not a {"ns/name": "ip"} table');
  return Object.fromEntries(Object.entries(v).filter((e): e is [string, string] => typeof e[1] === 'string'));
}

export function saveAllocations(path: string, ips: Record<string, string>): Promise<void> {
  const sorted = Object.fromEntries(Object.entries(ips).sort((a, b) => (a[0] < b[0] ? -1 : 1)));
  return writeFileAtomic(path, `${JSON.stringify(sorted, null, 2)}\n`, 0o644);
}
