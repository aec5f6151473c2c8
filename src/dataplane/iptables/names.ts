import { InvalidInputError } from '../../errors.js';

/**
 * Names of every kernel object the iptables dataplane owns. Ownership is by
 * prefix only: a chain whose name starts with `FSMN_` or a set whose name
 * starts with `fsmn-` is ours (to rewrite, prune, clean up); nothing else is
 * ever touched.
 */

/** iptables chain names: at most 28 characters (legacy's limit, the tighter one). */
export const MAX_CHAIN_NAME = 28;
/** ipset names: IPSET_MAXNAMELEN is 32 including the terminating NUL. */
export const MAX_SET_NAME = 31;
/** Suffix of the scratch set a changed set is built in before `swap`. */
export const TMP_SUFFIX = '-tmp';

export const DEFAULT_PREFIX = 'fsmn';

export type Table = 'nat' | 'filter';
export const TABLES: readonly Table[] = ['nat', 'filter'];

export interface Names {
  /** `FSMN_`: every chain that starts with it is ours. */
  chainPrefix: string;
  /** `fsmn-`: every set that starts with it is ours. */
  setPrefix: string;
  chains: {
    /** nat: mesh pods' outbound TCP, redirected to the proxy unless excluded. */
    outbound: string;
    /** filter: strict inbound, connections to strict pods not from a node proxy are reset. */
    inbound: string;
  };
  sets: {
    /** hash:ip with comment = pod uid: the enrolled pods (enrolment is one `add`). */
    pods: string;
    /** hash:ip: enrolled pods in strict inbound mode. */
    strict: string;
    /** hash:ip,port: per-pod outbound port exclusions (pod ip, tcp:port), matched src,dst. */
    outPorts: string;
    /** hash:ip,port: per-pod inbound port exclusions of strict pods, matched dst,dst. */
    inPorts: string;
    /** hash:net: node proxies that may reach strict pods directly. */
    proxySources: string;
  };
}

/**
 * Derive all names from one prefix (`fsmn` -> chains `FSMN_*`, sets
 * `fsmn-*`) and refuse a prefix that would make any of them too long for
 * the kernel, before anything is created.
 */
export function makeNames(prefix: string = DEFAULT_PREFIX): Names {
  if (typeof prefix !== 'string' || !/^[a-z][a-z0-9]*$/.test(prefix)) {
    throw new InvalidInputError('prefix', prefix, 'must be lower-case letters and digits, starting with a letter');
  }
  const chainPrefix = `${prefix.toUpperCase()}_`;
  const setPrefix = `${prefix}-`;
  const names: Names = {
    chainPrefix,
    setPrefix,
    chains: { outbound: `${chainPrefix}OUTBOUND`, inbound: `${chainPrefix}INBOUND` },
    sets: {
      pods: `${setPrefix}pods`,
      strict: `${setPrefix}strict`,
      outPorts: `${setPrefix}out-ports`,
      inPorts: `${setPrefix}in-ports`,
      proxySources: `${setPrefix}proxy-src`,
    },
  };
  for (const chain of Object.values(names.chains)) {
    if (chain.length > MAX_CHAIN_NAME) {
      throw new InvalidInputError('prefix', prefix, `makes chain name ${chain} ${chain.length} characters long; iptables allows ${MAX_CHAIN_NAME}`);
    }
  }
  for (const set of Object.values(names.sets)) {
    const longest = `${set}${TMP_SUFFIX}`;
    if (longest.length > MAX_SET_NAME) {
      throw new InvalidInputError('prefix', prefix, `makes set name ${longest} ${longest.length} characters long; ipset allows ${MAX_SET_NAME}`);
    }
  }
  return names;
}

export function isOurChain(names: Names, chain: string): boolean {
  return chain.startsWith(names.chainPrefix);
}

export function isOurSet(names: Names, set: string): boolean {
  return set.startsWith(names.setPrefix);
}

export function tmpSetName(set: string): string {
  return `${set}${TMP_SUFFIX}`;
}
