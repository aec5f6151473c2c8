import { FsmNodeError } from '../errors.js';

/**
 * The wire between the C plugin (cni/fsm-node-cni.c) and the agent, and the
 * CNI 1.0 shapes the agent answers with. Pure.
 *
 * Request: "FSMCNI1\n", NUL-terminated "KEY=VALUE" entries (the CNI_*
 * variables the runtime set), an empty entry, then the plugin's stdin (its
 * network configuration with prevResult). The spool files the plugin leaves
 * when the agent is away hold the same bytes.
 * Answer: "<exit code>\n" and the bytes the plugin writes to its stdout.
 */

export const MAGIC = 'FSMCNI1\n';
export const PLUGIN_TYPE = 'fsm-node-cni';
export const SUPPORTED_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0'] as const;

/** CNI spec error codes (SPEC.md "Error"), plus ours from 100 up. */
export const CniCode = {
  incompatibleVersion: 1,
  unsupportedField: 2,
  unknownContainer: 3,
  invalidEnv: 4,
  ioFailure: 5,
  decodeFailure: 6,
  invalidConfig: 7,
  tryAgainLater: 11,
  /** The agent could not enrol the pod (no interception mode works, the dataplane failed). */
  enrolFailed: 100,
} as const;

export class CniError extends FsmNodeError {
  constructor(
    readonly cniCode: number,
    message: string,
    readonly detail = '',
  ) {
    super('FSMN_ERR_CNI', detail ? `${message}: ${detail}` : message, { details: { cniCode, detail } });
  }
}

export type CniCommand = 'ADD' | 'DEL' | 'CHECK' | 'VERSION' | 'GC' | 'STATUS';

export interface CniRequest {
  command: string;
  containerId: string;
  netns: string;
  ifname: string;
  /** CNI_ARGS as key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID ...). */
  args: Record<string, string>;
  path: string;
  /** The network configuration (stdin) as parsed JSON. */
  config: PluginConf;
  /** The stdin bytes as received. */
  raw: string;
}

/** What the plugin's own entry in the conflist carries, plus what the runtime adds (name, cniVersion, prevResult). */
export interface PluginConf {
  cniVersion?: string;
  name?: string;
  type?: string;
  socket?: string;
  failurePolicy?: 'fail-closed' | 'fail-open';
  spool?: string;
  prevResult?: unknown;
  [key: string]: unknown;
}

export interface CniAnswer {
  exitCode: number;
  stdout: string;
}

/** "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=p1;IgnoreUnknown=1" -> pairs; later keys win. */
export function parseCniArgs(s: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of s.split(';')) {
    if (part === '') continue;
    const i = part.indexOf('=');
    if (i <= 0) throw new CniError(CniCode.invalidEnv, 'CNI_ARGS is not KEY=VALUE;...', JSON.stringify(part));
    out[part.slice(0, i)] = part.slice(i + 1);
  }
  return out;
}

/** Decode the plugin's request bytes. Throws CniError naming what is malformed. */
export function decodeRequest(buf: Buffer): CniRequest {
  if (buf.length < MAGIC.length || buf.subarray(0, MAGIC.length).toString('latin1') !== MAGIC) {
    throw new CniError(CniCode.decodeFailure, 'not an fsm-node-cni request', `expected the ${JSON.stringify(MAGIC)} header (plugin and agent of different versions?)`);
  }
  const env: Record<string, string> = {};
  let at = MAGIC.length;
  for (;;) {
    const nul = buf.indexOf(0, at);
    if (nul < 0) throw new CniError(CniCode.decodeFailure, 'truncated fsm-node-cni request', 'the environment block has no end');
    if (nul === at) {
      at += 1;
      break;
    }
    const entry = buf.subarray(at, nul).toString('utf8');
    const eq = entry.indexOf('=');
    if (eq > 0) env[entry.slice(0, eq)] = entry.slice(eq + 1);
    at = nul + 1;
  }
  const raw = buf.subarray(at).toString('utf8');
  let config: unknown;
  try {
    config = JSON.parse(raw);
  } catch (err) {
    throw new CniError(CniCode.decodeFailure, 'the network configuration on stdin is not JSON', (err as Error).message);
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new CniError(CniCode.decodeFailure, 'the network configuration on stdin is not a JSON object');
  return {
    command: env.CNI_COMMAND ?? '',
    containerId: env.CNI_CONTAINERID ?? '',
    netns: env.CNI_NETNS ?? '',
    ifname: env.CNI_IFNAME ?? '',
    args: parseCniArgs(env.CNI_ARGS ?? ''),
    path: env.CNI_PATH ?? '',
    config: config as PluginConf,
    raw,
  };
}

/** Encode a request as the plugin does (tests, the lab, the bench's direct client). */
export function encodeRequest(env: Record<string, string | undefined>, stdin: string): Buffer {
  const parts: Buffer[] = [Buffer.from(MAGIC, 'latin1')];
  for (const k of ['CNI_COMMAND', 'CNI_CONTAINERID', 'CNI_NETNS', 'CNI_IFNAME', 'CNI_ARGS', 'CNI_PATH']) {
    const v = env[k];
    if (v !== undefined) parts.push(Buffer.from(`${k}=${v}\0`, 'utf8'));
  }
  parts.push(Buffer.from([0]), Buffer.from(stdin, 'utf8'));
  return Buffer.concat(parts);
}

export function encodeAnswer(a: CniAnswer): Buffer {
  return Buffer.from(`${a.exitCode}\n${a.stdout}`, 'utf8');
}

/** The CNI error result (exit code 1). */
export function errorAnswer(cniVersion: string | undefined, err: CniError): CniAnswer {
  const msg = err.detail ? err.message.slice(0, err.message.length - err.detail.length - 2) : err.message;
  return { exitCode: 1, stdout: `${JSON.stringify({ cniVersion: cniVersion ?? '1.0.0', code: err.cniCode, msg, details: err.detail })}\n` };
}

/** A chained plugin's ADD result: the previous result unchanged (the cniVersion it already carries). */
export function passThrough(conf: PluginConf): CniAnswer {
  if (conf.prevResult === undefined) {
    throw new CniError(CniCode.invalidConfig, 'fsm-node-cni must be chained after the primary CNI plugin', 'no prevResult in the network configuration');
  }
  return { exitCode: 0, stdout: `${JSON.stringify(conf.prevResult)}\n` };
}

/** The pod's IPv4 address from prevResult (CNI 0.3+ "ips", the first IPv4 one); undefined when it has none. */
export function podIPv4(prevResult: unknown): string | undefined {
  const ips = (prevResult as { ips?: unknown } | undefined)?.ips;
  if (!Array.isArray(ips)) return undefined;
  for (const e of ips as Array<{ address?: unknown }>) {
    const a = typeof e?.address === 'string' ? e.address.split('/')[0]! : '';
    if (/^\d{1,3}(\.\d{1,3}){3}$/.test(a)) return a;
  }
  return undefined;
}

/** The Kubernetes pod the runtime names in CNI_ARGS (kubelet/containerd/CRI-O set these). */
export interface PodRef {
  namespace: string;
  name: string;
  /** Empty when the runtime does not pass K8S_POD_UID. */
  uid: string;
}

export function podRef(args: Record<string, string>): PodRef | undefined {
  const namespace = args.K8S_POD_NAMESPACE;
  const name = args.K8S_POD_NAME;
  if (!namespace || !name) return undefined;
  return { namespace, name, uid: args.K8S_POD_UID ?? '' };
}
