import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { z } from 'zod';
import { InvalidInputError } from '../errors.js';
import { formatPath } from '../policy/schema.js';

/**
 * The agent's configuration: one schema, filled from (lowest to highest
 * precedence) defaults, an optional YAML/JSON file (--config), environment
 * variables FSMN_<FIELD> (FSMN_NODE, FSMN_CONTROLLER, ...), and flags.
 * Errors name the field and the value.
 */
const hostPort = z.string().regex(/^[^\s:]+:\d{1,5}$/, 'expected HOST:PORT');
const port = z.coerce.number().int().min(1).max(65535);
const bool = z.preprocess((v) => (v === 'true' ? true : v === 'false' ? false : v), z.boolean());

export const AgentConfigSchema = z
  .object({
    node: z.string().min(1, 'required: the node name (--node or NODE_NAME)'),
    controller: z.string().url('expected an https:// URL'),
    caFile: z.string().min(1),
    tokenFile: z.string().min(1),
    mode: z.enum(['auto', 'ebpf', 'iptables']),
    stateDir: z.string().min(1),
    bpffsDir: z.string().min(1),
    podsCgroup: z.string().min(1, 'required: the cgroup v2 directory containing all pods (--pods-cgroup)'),
    proxyCgroup: z.string().min(1, 'required: the cgroup v2 directory the proxy runs in (--proxy-cgroup)'),
    listen: hostPort,
    /** Lab only: the network namespace that plays the node (dataplane rules and proxy live there). */
    netns: z.string().min(1).optional(),
    proxy: z.enum(['pipy', 'passthrough']),
    proxyAddress: z.string().ip({ version: 'v4' }),
    outboundPort: port,
    inboundPort: port,
    fastPath: bool,
    /** What happens while the proxy crash-loops: keep redirecting (connections fail) or stop redirecting until it is back. */
    failurePolicy: z.enum(['fail-closed', 'fail-open']),
    /** Upper bound on Pipy worker threads (one per CPU up to this): small boards keep memory low. */
    proxyThreadCap: z.coerce.number().int().min(1).max(64),
    /**
     * Pipy processes sharing the proxy's listeners (SO_REUSEPORT): with 2 or
     * more a crash of one fails no new connection. Threads are split among
     * them. Optional in the type (in-process agents get the supervisor's default).
     */
    proxyInstances: z.coerce.number().int().min(1).max(16).optional(),
    /**
     * How a new proxy config goes live: handover (new instances with it beside
     * the old, the old drained: no request in flight fails) or signal (Pipy's
     * SIGHUP reload in place: no process start, but requests in flight are
     * reset). Optional in the type (in-process agents get the supervisor's default).
     */
    proxyReload: z.enum(['handover', 'signal']).optional(),
    /** How long a retiring proxy instance may take to answer what is in flight (hand-over, upgrade, stop). */
    proxyDrainSeconds: z.coerce.number().int().min(1).max(3600).optional(),
    /**
     * Run the proxy as this user ("UID" or "UID:GID", FSM: 1500) with only
     * CAP_NET_ADMIN; the agent then hands it its key files (owned by that
     * uid, 0600). Unset: the proxy runs as the agent does (docs/security.md
     * "Keys on the node" says why that is the default).
     */
    proxyUser: z
      .string()
      .regex(/^\d{1,10}(:\d{1,10})?$/, 'expected UID or UID:GID, e.g. 1500 or 1500:1500')
      .refine((v) => v.split(':').every((n) => Number(n) > 0 && Number(n) < 2 ** 32 - 1), 'must not be root (0) or the invalid id 4294967295: leave the setting out to run the proxy as the agent does')
      .optional(),
    /** Addresses of this node that pods and peers use (its own traffic is never redirected). */
    nodeAddresses: z.array(z.string().ip({ version: 'v4' })),
    /** Unix socket the CNI plugin relays pod creation to (src/cni/); unset: no enrolment at creation. */
    cniSocket: z.string().min(1).max(107, 'a unix socket path has at most 107 bytes').optional(),
    /** Where the plugin leaves requests while the agent is away. */
    cniSpool: z.string().min(1),
    /** What the plugin does when the agent is unreachable; auto: fail-closed in strict meshes, fail-open in permissive ones. */
    cniFailurePolicy: z.enum(['auto', 'fail-closed', 'fail-open']),
    /** CNI conf directories to chain the plugin into (and keep it there); empty: the agent installs nothing. */
    cniConfDirs: z.array(z.string().min(1)),
    /** Where the plugin binary goes. */
    cniBinDir: z.string().min(1),
  })
  .strict();
export type AgentConfig = z.infer<typeof AgentConfigSchema>;

export const agentDefaults: Partial<AgentConfig> = {
  mode: 'auto',
  stateDir: '/var/lib/fsm-node',
  bpffsDir: '/sys/fs/bpf/fsm-node',
  listen: '0.0.0.0:15900',
  proxy: 'pipy',
  outboundPort: 15001,
  inboundPort: 15003,
  fastPath: true,
  failurePolicy: 'fail-closed',
  proxyThreadCap: 4,
  proxyInstances: 2,
  proxyReload: 'handover',
  proxyDrainSeconds: 10,
  nodeAddresses: [],
  cniSpool: '/run/fsm-node-cni/spool',
  cniFailurePolicy: 'auto',
  cniConfDirs: [],
  cniBinDir: '/opt/cni/bin',
};

/** Fields given as comma-separated lists in flags and the environment. */
export const listFields = new Set<string>(['nodeAddresses', 'cniConfDirs']);
const fields = Object.keys(AgentConfigSchema.shape) as Array<keyof AgentConfig>;
const envName = (f: string) => 'FSMN_' + f.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase();
const flagName = (f: string) => f.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** Merge defaults < file < env < flags, then validate; `flags` uses camelCase field names. */
export function loadAgentConfig(flags: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env, file?: string): AgentConfig {
  const merged: Record<string, unknown> = { ...agentDefaults };
  if (file) {
    let doc: unknown;
    try {
      // yaml is loaded only when a file is given: most agents are configured by flags and env.
      const { parse } = createRequire(import.meta.url)('yaml') as typeof import('yaml');
      doc = parse(readFileSync(file, 'utf8'));
    } catch (err) {
      throw new InvalidInputError('--config', file, (err as Error).message);
    }
    if (typeof doc !== 'object' || doc === null) throw new InvalidInputError('--config', file, 'expected a mapping of agent settings');
    Object.assign(merged, doc);
  }
  if (env.NODE_NAME && merged.node === undefined) merged.node = env.NODE_NAME;
  for (const f of fields) {
    const v = env[envName(f)];
    if (v !== undefined) merged[f] = listFields.has(f) ? v.split(',').filter(Boolean) : v;
  }
  for (const [k, v] of Object.entries(flags)) if (v !== undefined) merged[k] = v;
  const parsed = AgentConfigSchema.safeParse(merged);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const field = String(issue.path[0] ?? '');
    const source = field ? `--${flagName(field)} / ${envName(field)}` : 'agent config';
    const value = field ? merged[field] : merged;
    throw new InvalidInputError(`${source}${issue.path.length > 1 ? ` (${formatPath(issue.path)})` : ''}`, value, issue.message);
  }
  return parsed.data;
}

/** --proxy-user "UID[:GID]" as ids (GID defaults to UID); undefined when unset. */
export function proxyRunAs(config: Pick<AgentConfig, 'proxyUser'>): { uid: number; gid: number } | undefined {
  if (config.proxyUser === undefined) return undefined;
  const [uid, gid = uid] = config.proxyUser.split(':').map(Number) as [number, number?];
  return { uid, gid };
}

export { envName, flagName };
