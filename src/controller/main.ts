import { AuthenticationV1Api, CoreV1Api, KubeConfig } from '@kubernetes/client-node';
import { hostname } from 'node:os';
import { isIP } from 'node:net';
import type { FastifyInstance } from 'fastify';
import { FsmNodeError, InvalidInputError } from '../errors.js';
import { PolicyCompiler } from '../policy/compiler.js';
import { DEFAULT_CONTROLLER_NAMESPACE } from '../policy/fsm.js';
import type { NodeModeStatus } from '../policy/schema.js';
import { logger } from '../util/log.js';
import { TokenFileAuthenticator, TokenReviewAuthenticator, type Authenticator } from './auth.js';
import { ensureTls, FileCertStore, publishCa, SecretCertStore, type CertStore } from './certs.js';
import { PolicyHub } from './hub.js';
import { controllerMetrics } from './metrics.js';
import { NODE_EVENT_NAMESPACE, NodeStatusEvents } from './node-status.js';
import { buildPolicyServer } from './server.js';
import { DirectorySource } from './sources/directory.js';
import { KubernetesSource } from './sources/kubernetes.js';

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

  let kc: KubeConfig | undefined;
  if (opts.manifests === undefined) {
    kc = new KubeConfig();
    if (opts.inCluster) kc.loadFromCluster();
    else kc.loadFromFile(opts.kubeconfig!);
  }

  const sans = [...new Set(['localhost', '127.0.0.1', hostname(), ...(isIP(host) && host !== '0.0.0.0' && host !== '::' ? [host] : []), ...(opts.certSans ?? [])])];
  let store: CertStore;
  if (kc) {
    sans.push(CONTROLLER_SERVICE, `${CONTROLLER_SERVICE}.${namespace}`, `${CONTROLLER_SERVICE}.${namespace}.svc`);
    store = new SecretCertStore(kc.makeApiClient(CoreV1Api), namespace);
  } else store = new FileCertStore(opts.stateDir ?? DEFAULT_STATE_DIR);
  const tls = await ensureTls(store, sans);
  if (kc) await publishCa(kc.makeApiClient(CoreV1Api), namespace, tls.caCert);

  // Listen first: until the sources have synced, agents get 503 + Retry-After and /healthz answers.
  let k8s: KubernetesSource | undefined;
  let auth: Authenticator;
  if (opts.tokens) auth = new TokenFileAuthenticator(opts.tokens);
  else {
    const authn = kc!.makeApiClient(AuthenticationV1Api);
    const core = kc!.makeApiClient(CoreV1Api);
    auth = new TokenReviewAuthenticator({
      agentServiceAccount: opts.agentServiceAccount ?? DEFAULT_AGENT_SERVICE_ACCOUNT,
      review: async (token) => {
        const r = await authn.createTokenReview({ body: { spec: { token } } });
        return { authenticated: r.status?.authenticated === true, username: r.status?.user?.username, extra: r.status?.user?.extra };
      },
      pod: async (ns, name) => {
        const cached = k8s?.pod(ns, name);
        if (cached) return cached;
        const p = await core.readNamespacedPod({ namespace: ns, name }).catch(() => undefined);
        return p && { nodeName: p.spec?.nodeName, uid: p.metadata?.uid };
      },
    });
  }
  // In a cluster a fallback (or a node with no working mode) becomes an Event on the Node.
  const nodeEvents = kc ? new NodeStatusEvents(async (body) => void (await kc.makeApiClient(CoreV1Api).createNamespacedEvent({ namespace: NODE_EVENT_NAMESPACE, body }))) : undefined;
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
    if (kc) {
      k8s = new KubernetesSource({ kubeConfig: kc, compiler, namespace, onChange: compileAndPublish });
      source = k8s;
      await k8s.start();
    } else {
      const dir = new DirectorySource({ dir: opts.manifests!, compiler, onChange: compileAndPublish });
      source = dir;
      await dir.start();
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
