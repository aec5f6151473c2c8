import { hostname } from 'node:os';
import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { FsmNodeError, InvalidInputError } from '../errors.js';
import { PolicyCompiler } from '../policy/compiler.js';
import { DEFAULT_CONTROLLER_NAMESPACE } from '../policy/fsm.js';
import type { NodeModeStatus } from '../policy/schema.js';
import { logger } from '../util/log.js';
import { TokenFileAuthenticator, type Authenticator } from './auth.js';
import { ensureTls, FileCertStore } from './certs.js';
import type { ClusterAccess } from './cluster.js';
import { PolicyHub } from './hub.js';
import { controllerMetrics } from './metrics.js';
import { NodeStatusEvents } from './node-status.js';
import { buildPolicyServer } from './server.js';
import { DirectorySource } from './sources/directory.js';

const log = logger('controller');

import { CONTROLLER_SERVICE, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_LISTEN, DEFAULT_STATE_DIR } from './defaults.js';

export { CONTROLLER_SERVICE, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_LISTEN, DEFAULT_STATE_DIR };

export interface ControllerOptions {
  /** Directory of manifests (lab, embedded default). Exactly one of manifests, kubeconfig, inCluster. */
  manifests?: string;
  kubeconfig?: string;
  inCluster?: boolean;
  /** host:port of the HTTPS policy API (default 0.0.0.0:15443; port 0 picks one). */
  listen?: string;
  /** Keeps the CA and serving certificate in manifest mode (default /var/lib/fsm-node-controller). */
  stateDir?: string;
  /** Lab tokens file ({"<node>": "<token>"}); required with manifests, replaces TokenReview when given in a cluster. */
  tokens?: string;
  /** Namespace of the mesh ConfigMap, the certificate Secret and the CA ConfigMap (default fsm-system). */
  namespace?: string;
  /** namespace:name of the agents' ServiceAccount (cluster mode). */
  agentServiceAccount?: string;
  /** Extra names/addresses for the serving certificate (the address agents dial). */
  certSans?: string[];
}

export interface RunningController {
  /** https://host:port actually listened on. */
  url: string;
  /** PEM of the CA agents must trust. */
  caCert: string;
  compiler: PolicyCompiler;
  hub: PolicyHub;
  server: FastifyInstance;
  /** Compiles run so far (a benchmark or test waits on this to know a change was taken in). */
  compiles(): number;
  close(): Promise<void>;
}

export function parseListen(listen: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(listen);
  const port = Number(m?.[3]);
  if (!m || port > 65535) throw new InvalidInputError('--listen', listen, 'expected HOST:PORT, e.g. 0.0.0.0:15443');
  return { host: m[1] ?? m[2]!, port };
}

/**
 * The controller process: one source (manifest directory or Kubernetes) feeds
 * the compiler; each change compiles incrementally and wakes the long-polls of
 * the nodes whose version changed. Replicas are independent (each watches and
 * compiles on its own; versions are content hashes, so they agree): no leader.
 */
export async function runController(opts: ControllerOptions): Promise<RunningController> {
  const modes = [opts.manifests !== undefined, opts.kubeconfig !== undefined, opts.inCluster === true].filter(Boolean).length;
  if (modes !== 1) throw new InvalidInputError('source', { manifests: opts.manifests, kubeconfig: opts.kubeconfig, inCluster: opts.inCluster }, 'give exactly one of --manifests, --kubeconfig, --in-cluster');
  if (opts.manifests !== undefined && !opts.tokens) throw new InvalidInputError('--tokens', opts.tokens, 'manifest mode needs a tokens file (lab setup writes one)');
  const namespace = opts.namespace ?? DEFAULT_CONTROLLER_NAMESPACE;
  const { host, port } = parseListen(opts.listen ?? DEFAULT_LISTEN);

  const compiler = new PolicyCompiler({ controllerNamespace: namespace });
  const hub = new PolicyHub((node) => compiler.get(node));
  const metrics = controllerMetrics(compiler, hub);
  let compiles = 0;
  const compileAndPublish = () => {
    const r = compiler.compile();
    compiles++;
    metrics.compileSeconds.observe(r.durationMs / 1000);
    metrics.publishes.inc(r.changed.length);
    hub.publish(r.changed);
    if (r.changed.length) log.debug({ nodes: r.changed.length, ms: Math.round(r.durationMs * 10) / 10 }, 'compiled');
  };

  // Cluster mode only: client-node is loaded here, not at startup (see cluster.ts).
  const cluster: ClusterAccess | undefined =
    opts.manifests === undefined ? (await import('./cluster.js')).clusterAccess({ kubeconfig: opts.kubeconfig, inCluster: opts.inCluster, namespace }) : undefined;

  const sans = [...new Set(['localhost', '127.0.0.1', hostname(), ...(isIP(host) && host !== '0.0.0.0' && host !== '::' ? [host] : []), ...(opts.certSans ?? [])])];
  if (cluster) sans.push(CONTROLLER_SERVICE, `${CONTROLLER_SERVICE}.${namespace}`, `${CONTROLLER_SERVICE}.${namespace}.svc`);
  const tls = await ensureTls(cluster?.certStore ?? new FileCertStore(opts.stateDir ?? DEFAULT_STATE_DIR), sans);
  await cluster?.publishCa(tls.caCert);

  // Listen first: until the sources have synced, agents get 503 + Retry-After and /healthz answers.
  const auth: Authenticator = opts.tokens ? new TokenFileAuthenticator(opts.tokens) : cluster!.authenticator(opts.agentServiceAccount ?? DEFAULT_AGENT_SERVICE_ACCOUNT);
  // In a cluster a fallback (or a node with no working mode) becomes an Event on the Node.
  const nodeEvents = cluster ? new NodeStatusEvents((body) => cluster.postNodeEvent(body)) : undefined;
  const onNodeStatus = (node: string, status: NodeModeStatus): void => {
    log.info({ node, ...status }, 'agent reported its interception mode');
    void nodeEvents?.report(node, status);
  };
  const server = buildPolicyServer({ hub, auth, tls, registry: metrics.registry, onNodeStatus });
  let address: string;
  try {
    address = await server.listen({ host, port });
  } catch (err) {
    throw new FsmNodeError('FSMN_ERR_LISTEN', `cannot listen on ${host}:${port}: ${(err as Error).message}`, { cause: err });
  }

  let source: { stop(): Promise<void> };
  try {
    if (cluster) source = await cluster.startSource(compiler, compileAndPublish);
    else {
      const dir = new DirectorySource({ dir: opts.manifests!, compiler, onChange: compileAndPublish });
      await dir.start();
      source = dir;
    }
  } catch (err) {
    await server.close();
    throw err;
  }
  compileAndPublish();
  hub.setReady();
  log.info({ url: address, nodes: compiler.nodes().length, source: opts.manifests ?? (opts.inCluster ? 'in-cluster' : opts.kubeconfig) }, 'controller serving');

  let closed: Promise<void> | undefined;
  return {
    url: address,
    caCert: tls.caCert,
    compiler,
    hub,
    server,
    compiles: () => compiles,
    close: () =>
      (closed ??= (async () => {
        await source.stop();
        await server.close();
      })()),
  };
}
