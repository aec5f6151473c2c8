import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { FsmNodeError } from '../errors.js';

/**
 * What a running lab is made of, written by `lab up` into <dir>/lab.json and
 * read by `lab check`, `lab exec` and `lab down` (separate processes). A
 * pointer file under /run remembers the lab directory, so `--dir` is needed
 * only for `lab up`; /run is a tmpfs, like the network namespaces it forgets
 * on reboot together with them.
 */

export const LAB_PREFIX = 'fsmlab';
export const DEFAULT_LAB_DIR = '/var/tmp/fsm-node-lab';
export const LAB_POINTER = '/run/fsm-node-lab.dir';

const ProcessSchema = z.object({ pid: z.number().int().positive(), cgroup: z.string(), log: z.string() }).strict();

const NodeSchema = z
  .object({
    name: z.string(),
    index: z.number().int(),
    netns: z.string(),
    gateway: z.string(),
    underlayIp: z.string(),
    podCidr: z.string(),
    podsCgroup: z.string(),
    proxyCgroup: z.string(),
    bpffsDir: z.string(),
    stateDir: z.string(),
    tokenFile: z.string(),
    agentUrl: z.string(),
    /** In a cluster lab (`lab up --clusters N`): the cluster this node belongs to (src/lab/clusters/). */
    cluster: z.string().optional(),
  })
  .strict();

const ControllerSchema = z.object({ url: z.string(), stateDir: z.string(), caFile: z.string(), process: ProcessSchema.optional() }).strict();

/** One cluster of a cluster lab (src/lab/clusters/): its controller, files, underlay and uplink to the router. */
const ClusterSchema = z
  .object({
    name: z.string(),
    index: z.number().int(),
    /** Its nodes' underlay subnet (10.B.0.0/24) and pod subnets base (10.A.<node>.0/24). */
    subnetBase: z.number().int(),
    underlayCidr: z.string(),
    /** The router's address on this cluster's underlay: where other clusters' underlays are routed. */
    routerIp: z.string(),
    /** The uplink: a veth from the cluster's underlay bridge (`netns`/`dev`) to the router (`routerNetns`/`routerDev`). */
    uplink: z.object({ netns: z.string(), dev: z.string(), routerNetns: z.string(), routerDev: z.string() }).strict(),
    dir: z.string(),
    manifests: z.string(),
    multiclusterDir: z.string(),
    clustersetFile: z.string(),
    tokens: z.string(),
    /** The peers' API of its controller (mutual TLS, clusterset members only). */
    clustersetUrl: z.string(),
    controller: ControllerSchema,
    /** Carries the controllers' clusterset traffic over the uplinks (src/lab/clusters/relay.ts). */
    relay: ProcessSchema.optional(),
    nodes: z.array(z.string()),
    gateways: z.array(z.string()),
  })
  .strict();

const PodSchema = z
  .object({
    name: z.string(),
    node: z.string(),
    ip: z.string(),
    netns: z.string(),
    cgroupPath: z.string(),
    version: z.enum(['v1', 'v2']),
    server: ProcessSchema.optional(),
    /** Pods added by `lab pod add` (src/lab/pods.ts): their namespace and sandbox id (the CNI container id). */
    namespace: z.string().optional(),
    containerId: z.string().optional(),
    /** The MQTT broker (mosquitto) of the broker pod (src/lab/mqtt-lab.ts). */
    broker: ProcessSchema.optional(),
  })
  .strict();

export const LabStateSchema = z
  .object({
    version: z.literal(1),
    prefix: z.literal(LAB_PREFIX),
    dir: z.string(),
    createdAt: z.string(),
    mode: z.enum(['auto', 'ebpf', 'iptables']),
    proxy: z.enum(['pipy', 'passthrough']),
    /** Why the proxy was chosen (said again by `lab check`). */
    proxyNote: z.string(),
    controllerCgroupRoot: z.string(),
    /** In a cluster lab: the first cluster's controller (each cluster's is in `clusters`). */
    controller: ControllerSchema,
    /** The lab supervisor, which runs the agents (their pids are in supervisor.json, src/lab/supervisor.ts). */
    supervisor: ProcessSchema.optional(),
    nodes: z.array(NodeSchema),
    pods: z.array(PodSchema),
    /** The outside client and server (src/lab/outside.ts); absent in labs made before them. */
    outside: z
      .object({
        client: z.object({ netns: z.string(), ip: z.string() }).strict(),
        server: z
          .object({ netns: z.string(), ip: z.string(), httpPort: z.number().int(), httpsPort: z.number().int(), serverName: z.string(), caFile: z.string(), process: ProcessSchema.optional() })
          .strict(),
        cgroup: z.string(),
      })
      .strict()
      .optional(),
    /** A cluster lab (`lab up --clusters N`, src/lab/clusters/): the clusters and the router joining them. */
    clusters: z.array(ClusterSchema).optional(),
    router: z.object({ netns: z.string() }).strict().optional(),
  })
  .strict();
export type LabState = z.infer<typeof LabStateSchema>;
export type LabNode = LabState['nodes'][number];
export type LabPod = LabState['pods'][number];
export type LabProcess = z.infer<typeof ProcessSchema>;
export type LabCluster = z.infer<typeof ClusterSchema>;

export class LabError extends FsmNodeError {
  constructor(message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super('FSMN_ERR_LAB', message, options);
  }
}

/** `lab up` while a lab (or its leftovers) exists: nothing was started. */
export class LabExistsError extends LabError {}

export const labFiles = (dir: string) => ({
  state: join(dir, 'lab.json'),
  manifests: join(dir, 'manifests'),
  logs: join(dir, 'logs'),
  controller: join(dir, 'controller'),
  tokens: join(dir, 'tokens.json'),
  nodes: join(dir, 'nodes'),
  supervisor: join(dir, 'supervisor.json'),
  /** One file per faulty pod, written by `lab fault` and read by its echo server (src/lab/faults.ts). */
  faults: join(dir, 'faults'),
  /** A cluster lab's per-cluster directories (manifests, controller, clusterset files) and the clusterset CA. */
  clusters: join(dir, 'clusters'),
});

/** --dir when given, else the directory of the lab that runs, else the default. */
export function resolveLabDir(flag: string | undefined): string {
  if (flag) return flag;
  try {
    const dir = readFileSync(LAB_POINTER, 'utf8').trim();
    if (dir) return dir;
  } catch {
    // no lab pointer: the default directory
  }
  return DEFAULT_LAB_DIR;
}

export function readLabState(dir: string): LabState | undefined {
  const file = labFiles(dir).state;
  if (!existsSync(file)) return undefined;
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new LabError(`lab state ${file} is not JSON (${(err as Error).message}): run \`fsm-node lab down --dir ${dir}\` to remove the lab`, { cause: err });
  }
  const r = LabStateSchema.safeParse(raw);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new LabError(`lab state ${file}: ${i.path.join('.')}: ${i.message} (written by another fsm-node version?): run \`fsm-node lab down --dir ${dir}\``);
  }
  return r.data;
}

export function writeLabState(state: LabState): void {
  const file = labFiles(state.dir).state;
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(`${file}.tmp`, `${JSON.stringify(state, null, 2)}\n`);
  renameSync(`${file}.tmp`, file);
}

export function removeLabPointer(): void {
  rmSync(LAB_POINTER, { force: true });
}

/**
 * Claim the one lab of this machine: the pointer file is created exclusively,
 * so two `lab up` at the same time cannot both pass. Returns false when a lab
 * (or its leftovers) already claims it.
 */
export function claimLabPointer(dir: string): boolean {
  try {
    writeFileSync(LAB_POINTER, `${dir}\n`, { flag: 'wx' });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw err;
  }
}
