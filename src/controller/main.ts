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
import { IdentityService } from './identities.js';
import { parseLifetime } from '../identity/lifetime.js';
import type { CertificateProvider } from '../identity/provider.js';
import { BuiltinProvider, MESH_CA_DIR, meshCaFileStore } from '../identity/providers/builtin.js';
import { splitPem } from '../identity/x509.js';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Registry } from 'prom-client';
import { parse as parseYaml } from 'yaml';
import { gatewayIdentities } from '../gateway/render.js';
import { multiclusterIdentities } from '../multicluster/identity.js';
import { parseClusterSet } from '../multicluster/api.js';
import { MulticlusterController } from '../multicluster/controller.js';
import { MulticlusterKubernetes } from '../multicluster/kubernetes.js';
import type { KubeConfig } from '@kubernetes/client-node';

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
  /** Workload certificate lifetime when the mesh config sets none, e.g. "24h" (default) or "7d". */
  certificateLifetime?: string;
  /**
   * Cluster mode: sign workload certificates through the Kubernetes CSR API
   * with this signerName (cert-manager, Vault, any external CA) instead of the
   * built-in CA; caBundleFile then names the signer's root(s), PEM.
   */
  caSignerName?: string;
  caBundleFile?: string;
  /** Per-node certificate requests per second and burst; distinct identities a node may hold. */
  identityRate?: { perSecond: number; burst: number };
  maxIdentitiesPerNode?: number;
  /**
   * A ClusterSet file (docs/multicluster.md): makes this controller a member
   * of a clusterset: it serves its exports to the peers named there and
   * imports theirs.
   */
  clusterset?: string;
  /** ServiceExport and GlobalTrafficPolicy manifests (manifest mode); default <manifests>/../multicluster when manifests is given. */
  multiclusterDir?: string;
}

export interface RunningController {
  /** https://host:port actually listened on. */
  url: string;
  /** PEM of the CA agents must trust. */
  caCert: string;
  /** Where workload certificates come from (built-in CA or the CSR API). */
  certificates: CertificateProvider;
  compiler: PolicyCompiler;
  hub: PolicyHub;
  server: FastifyInstance;
  /** The clusterset member, when started with a ClusterSet. */
  multicluster: MulticlusterController | undefined;
  /** Compiles run so far (a benchmark or test waits on this to know a change was taken in). */
  compiles(): number;
  close(): Promise<void>;
}

/** How often the CA store and trust bundle are re-read. */
const CA_REFRESH_MS = 30_000;

/** The built-in CA (files under the state directory, or a Secret in a cluster), or the CSR API with a signerName. */
async function certificateProvider(opts: ControllerOptions, cluster: ClusterAccess | undefined): Promise<CertificateProvider> {
  if (opts.caSignerName !== undefined) {
    if (!cluster) throw new InvalidInputError('--ca-signer-name', opts.caSignerName, 'the CSR API needs a cluster (--kubeconfig or --in-cluster)');
    if (!opts.caBundleFile) throw new InvalidInputError('--ca-bundle', opts.caBundleFile, "an external signer needs its root(s): a PEM file (mount the signer's CA ConfigMap)");
    const file = opts.caBundleFile;
    const read = (): string[] => {
      const roots = splitPem(readFileSync(file, 'utf8'));
      if (roots.length === 0) throw new InvalidInputError('--ca-bundle', file, 'holds no PEM certificate');
      return roots;
    };
    let roots = read();
    return cluster.csrProvider(opts.caSignerName, () => {
      try {
        roots = read();
      } catch (err) {
        log.error({ file, err: (err as Error).message }, 'CA bundle unreadable; keeping the previous roots');
      }
      return roots;
    });
  }
  return BuiltinProvider.start({ store: cluster?.meshCaStore ?? meshCaFileStore(join(opts.stateDir ?? DEFAULT_STATE_DIR, MESH_CA_DIR)) });
}

/** The clusterset member of this controller, from the ClusterSet file and the PEM files it names. */
async function startMulticluster(opts: ControllerOptions, compiler: PolicyCompiler, registry: Registry, onChange: () => void, kc: KubeConfig | undefined): Promise<{ mc: MulticlusterController; k8s: MulticlusterKubernetes | undefined }> {
  const file = opts.clusterset!;
  let config;
  try {
    config = parseClusterSet(parseYaml(readFileSync(file, 'utf8')));
  } catch (err) {
    if (err instanceof InvalidInputError) throw new InvalidInputError(`--clusterset ${file}: ${err.field}`, err.value, err.message.replace(/^invalid .*?: /, ''));
    throw new InvalidInputError('--clusterset', file, `cannot be read: ${(err as Error).message}`);
  }
  const pem = (f: string, field: string) => {
    try {
      return readFileSync(resolve(dirname(file), f), 'utf8');
    } catch (err) {
      throw new InvalidInputError(`ClusterSet.spec.${field}`, f, `cannot be read: ${(err as Error).message}`);
    }
  };
  const tls = { ca: pem(config.caFile, 'caFile'), cert: pem(config.certFile, 'certFile'), key: pem(config.keyFile, 'keyFile') };
  const objectsDir = opts.multiclusterDir ?? (opts.manifests !== undefined ? join(dirname(resolve(opts.manifests)), 'multicluster') : undefined);
  // Kubernetes mode (no directory): ServiceExports and GlobalTrafficPolicies come from the API, ServiceImports and conditions go back to it.
  const ref: { mc?: MulticlusterController } = {};
  const k8s = objectsDir === undefined && kc ? new MulticlusterKubernetes(kc, () => ref.mc) : undefined;
  const mc = (ref.mc = await MulticlusterController.start({ config, compiler, tls, objectsDir, registry, stateDir: join(opts.stateDir ?? DEFAULT_STATE_DIR, 'multicluster'), onStatus: k8s && ((st) => k8s.onStatus(st)) }, onChange));
  try {
    await k8s?.start();
  } catch (err) {
    await mc.stop();
    throw err;
  }
  return { mc, k8s };
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
  let multicluster: MulticlusterController | undefined;
  let multiclusterK8s: MulticlusterKubernetes | undefined;
  const compileAndPublish = () => {
    compileOnce();
    // The exports follow the Services just compiled; imports that changed go out in one more compile.
    if (multicluster?.refresh()) compileOnce();
  };
  const compileOnce = () => {
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

  // Workload identities: the provider's roots go into every node's policy.
  const provider = await certificateProvider(opts, cluster);
  compiler.setTrustBundle(provider.trustBundle());
  const identities = new IdentityService({
    provider,
    // The identities a node may hold: its pods', those of the Gateways it serves, and the clusterset gateway's.
    podsOf: (node) => {
      const policy = compiler.get(node)?.policy;
      return policy ? [...policy.pods, ...gatewayIdentities(policy), ...multiclusterIdentities(policy)] : undefined;
    },
    settings: () => compiler.identitySettings(),
    defaultLifetimeMs: opts.certificateLifetime === undefined ? undefined : parseLifetime(opts.certificateLifetime, '--certificate-lifetime'),
    rate: opts.identityRate,
    maxIdentitiesPerNode: opts.maxIdentitiesPerNode,
    registry: metrics.registry,
  });
  log.info({ provider: provider.describe() }, 'workload certificates');

  // Listen first: until the sources have synced, agents get 503 + Retry-After and /healthz answers.
  const auth: Authenticator = opts.tokens ? new TokenFileAuthenticator(opts.tokens) : cluster!.authenticator(opts.agentServiceAccount ?? DEFAULT_AGENT_SERVICE_ACCOUNT);
  // In a cluster a fallback (or a node with no working mode) becomes an Event on the Node.
  const nodeEvents = cluster ? new NodeStatusEvents((body) => cluster.postNodeEvent(body)) : undefined;
  const onNodeStatus = (node: string, status: NodeModeStatus): void => {
    log.info({ node, ...status }, 'agent reported its interception mode');
    void nodeEvents?.report(node, status);
  };
  const server = buildPolicyServer({ hub, auth, tls, registry: metrics.registry, onNodeStatus, identities });
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
  if (opts.clusterset !== undefined) {
    try {
      ({ mc: multicluster, k8s: multiclusterK8s } = await startMulticluster(opts, compiler, metrics.registry, compileAndPublish, cluster?.kubeConfig));
    } catch (err) {
      await source.stop();
      await server.close();
      throw err;
    }
  }
  compileAndPublish();
  hub.setReady();
  // A CA or trust list edited in its store (root rotation) reaches the policies without a restart.
  const caWatch = setInterval(() => {
    void (async () => {
      if (provider instanceof BuiltinProvider) await provider.refresh();
      if (compiler.setTrustBundle(provider.trustBundle())) compileAndPublish();
    })();
  }, CA_REFRESH_MS);
  caWatch.unref();
  log.info({ url: address, nodes: compiler.nodes().length, source: opts.manifests ?? (opts.inCluster ? 'in-cluster' : opts.kubeconfig) }, 'controller serving');

  let closed: Promise<void> | undefined;
  return {
    url: address,
    caCert: tls.caCert,
    certificates: provider,
    compiler,
    hub,
    server,
    multicluster,
    compiles: () => compiles,
    close: () =>
      (closed ??= (async () => {
        clearInterval(caWatch);
        await multiclusterK8s?.stop();
        await multicluster?.stop();
        await source.stop();
        await server.close();
      })()),
  };
}
