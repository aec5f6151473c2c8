import { DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_LISTEN, DEFAULT_STATE_DIR } from '../../controller/defaults.js';
import { InvalidInputError } from '../../errors.js';
import { DEFAULT_CONTROLLER_NAMESPACE } from '../../policy/fsm.js';
import { logger } from '../../util/log.js';
import type { Command } from '../command.js';

const log = logger('cli.controller');

export const controllerCommand: Command = {
  name: 'controller',
  summary: 'run the policy controller: watch Kubernetes or a manifest directory, serve per-node policy',
  usage: ['--manifests DIR --tokens FILE [options]', '--kubeconfig PATH | --in-cluster [options]'],
  help: `
Compiles the mesh (monitored namespaces, pods, services, endpoint slices, SMI
TrafficSplit / TrafficTarget / HTTPRouteGroup / TCPRoute, mesh config) into
one policy per node and serves it to the agents over HTTPS with a versioned
long-poll. Each agent can read only its own node's policy: in a cluster its
ServiceAccount token is checked with TokenReview and bound to the node its pod
runs on; with --tokens, a file {"<node>": "<token>"} does that (the lab).
The CA and serving certificate are made on first start and kept (a Secret in a
cluster, files in --state-dir otherwise). See docs/controller.md.
Workload certificates (mutual TLS between node proxies) come from the built-in
mesh CA (Secret fsm-node-mesh-ca, or --state-dir/mesh-ca/) or, with
--ca-signer-name, from an external CA via the CSR API. See docs/security.md.`,
  options: {
    manifests: { type: 'string', valueName: 'DIR', description: 'Directory of Kubernetes YAML manifests to serve (watched; the lab uses this).' },
    kubeconfig: { type: 'string', valueName: 'PATH', description: 'Watch the cluster named by this kubeconfig.' },
    'in-cluster': { type: 'boolean', description: "Watch the cluster using the pod's ServiceAccount." },
    tokens: { type: 'string', valueName: 'FILE', description: 'Per-node tokens file (required with --manifests).' },
    listen: { type: 'string', valueName: 'HOST:PORT', default: DEFAULT_LISTEN, description: 'HTTPS listen address for agents.' },
    'state-dir': { type: 'string', valueName: 'DIR', default: DEFAULT_STATE_DIR, description: 'Where the CA and serving certificate are kept (manifest mode).' },
    namespace: { type: 'string', valueName: 'NS', default: DEFAULT_CONTROLLER_NAMESPACE, description: 'Namespace of the mesh ConfigMap and the certificate Secret.' },
    'agent-service-account': { type: 'string', valueName: 'NS:NAME', default: DEFAULT_AGENT_SERVICE_ACCOUNT, description: "The agents' ServiceAccount (cluster mode)." },
    'cert-san': { type: 'string', multiple: true, valueName: 'NAME', description: 'Extra name or address for the serving certificate (repeatable).' },
    'certificate-lifetime': { type: 'string', valueName: 'DURATION', description: 'Workload certificate lifetime when the mesh config sets none (default 24h; e.g. 7d for sites offline for days).' },
    'ca-signer-name': { type: 'string', valueName: 'NAME', description: 'Sign workload certificates through the Kubernetes CSR API with this signerName (cert-manager, Vault) instead of the built-in CA.' },
    'ca-bundle': { type: 'string', valueName: 'FILE', description: "PEM root(s) of the --ca-signer-name signer (published to every node as the trust bundle)." },
    clusterset: { type: 'string', valueName: 'FILE', description: 'ClusterSet file: join a clusterset (serve exports to its peers, import theirs). See docs/multicluster.md.' },
    'multicluster-dir': { type: 'string', valueName: 'DIR', description: 'ServiceExport and GlobalTrafficPolicy manifests (default with --manifests: DIR/../multicluster).' },
  },
  async run(values) {
    const sources = ['manifests', 'kubeconfig', 'in-cluster'].filter((k) => values[k] !== undefined);
    if (sources.length !== 1) throw new InvalidInputError('--manifests | --kubeconfig | --in-cluster', sources, 'give exactly one source');
    // Loaded here, not at the top: the Kubernetes client costs ~70 MiB the agent must not pay.
    const { runController } = await import('../../controller/main.js');
    const controller = await runController({
      ...(values.manifests ? { manifests: String(values.manifests) } : {}),
      ...(values.kubeconfig ? { kubeconfig: String(values.kubeconfig) } : {}),
      ...(values['in-cluster'] ? { inCluster: true } : {}),
      ...(values.tokens ? { tokens: String(values.tokens) } : {}),
      listen: String(values.listen),
      stateDir: String(values['state-dir']),
      namespace: String(values.namespace),
      agentServiceAccount: String(values['agent-service-account']),
      ...(values['cert-san'] ? { certSans: values['cert-san'] as string[] } : {}),
      ...(values['certificate-lifetime'] ? { certificateLifetime: String(values['certificate-lifetime']) } : {}),
      ...(values['ca-signer-name'] ? { caSignerName: String(values['ca-signer-name']) } : {}),
      ...(values['ca-bundle'] ? { caBundleFile: String(values['ca-bundle']) } : {}),
      ...(values.clusterset ? { clusterset: String(values.clusterset) } : {}),
      ...(values['multicluster-dir'] ? { multiclusterDir: String(values['multicluster-dir']) } : {}),
    });
    log.info({ url: controller.url }, 'controller serving');
    await new Promise<void>((resolve) => {
      process.once('SIGTERM', resolve);
      process.once('SIGINT', resolve);
    });
    await controller.close();
    return 0;
  },
};
