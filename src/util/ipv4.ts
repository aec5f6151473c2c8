/**
 * IPv4 parsing into the canonical text iptables-save and ipset save print, so
 * what we render compares equal, byte for byte, with what the kernel reports.
 * Pure; returns undefined for anything that is not a plain dotted quad.
 */

/**
 * A character loop rather than split + regex: validation runs over every pod
 * on every sync, and this is most of its cost.
 */
export function parseIPv4(text: string): number | undefined {
  let value = 0;
  let octet = 0;
  let digits = 0;
  let dots = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 46 /* . */) {
      if (digits === 0 || dots === 3) return undefined;
      value = value * 256 + octet;
      octet = 0;
      digits = 0;
      dots++;
    } else if (c >= 48 && c <= 57) {
      // No leading zeros: "010" is octal to some tools and decimal to others.
      if (digits > 0 && octet === 0) return undefined;
      octet = octet * 10 + (c - 48);
      if (++digits > 3 || octet > 255) return undefined;
    } else {
      return undefined;
    }
  }
  if (dots !== 3 || digits === 0) return undefined;
  return value * 256 + octet;
}

export function formatIPv4(value: number): string {
  return `${value >>> 24}.${(value >>> 16) & 255}.${(value >>> 8) & 255}.${value & 255}`;
}

export interface Cidr {
  network: number;
  prefix: number;
}

/** "a.b.c.d" (a /32) or "a.b.c.d/n"; host bits are masked off as iptables does. */
export function parseCidr(text: string): Cidr | undefined {
  const slash = text.indexOf('/');
  const addr = parseIPv4(slash < 0 ? text : text.slice(0, slash));
  if (addr === undefined) return undefined;
  let prefix = 32;
  if (slash >= 0) {
    const len = text.slice(slash + 1);
    if (!/^(0|[1-9][0-9]?)$/.test(len) || Number(len) > 32) return undefined;
    prefix = Number(len);
  }
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return { network: (addr & mask) >>> 0, prefix };
}

/** How iptables-save prints an address match: always with the prefix length. */
export function cidrText(c: Cidr): string {
  return `${formatIPv4(c.network)}/${c.prefix}`;
}

/** How ipset save prints a hash:net member: a /32 without its prefix length. */
export function cidrSetMember(c: Cidr): string {
  return c.prefix === 32 ? formatIPv4(c.network) : cidrText(c);
}
