import { AuthenticationV1Api, CertificatesV1Api, CoreV1Api, CustomObjectsApi, KubeConfig, PatchStrategy, setHeaderOptions, type CoreV1Event } from '@kubernetes/client-node';
import { GatewayStatusWriter } from '../gateway/status-writer.js';
import type { CertificateProvider } from '../identity/provider.js';
import { meshCaSecretStore, type MeshCaMaterial } from '../identity/providers/builtin.js';
import { KubernetesCsrProvider, type CsrApi } from '../identity/providers/kubernetes-csr.js';
import type { PolicyCompiler } from '../policy/compiler.js';
import { TokenReviewAuthenticator, type Authenticator } from './auth.js';
import { publishCa, SecretCertStore, type CertStore, type PemStore } from './certs.js';
import { NODE_EVENT_NAMESPACE } from './node-status.js';
import { KubernetesSource } from './sources/kubernetes.js';

/**
 * What the controller takes from a Kubernetes API server: the certificate
 * Secret, the published CA, TokenReview, Node Events and the informers. Its
 * own module, loaded only in cluster mode: @kubernetes/client-node costs
 * ~75 MiB resident, which the lab and manifest mode do not need to pay.
 */
export interface ClusterAccess {
  certStore: CertStore;
  /** The built-in workload CA's Secret (fsm-node-mesh-ca). */
  meshCaStore: PemStore<MeshCaMaterial>;
  /** Workload certificates from an external signer through the CSR API. */
  csrProvider(signerName: string, trustBundle: () => string[]): CertificateProvider;
  publishCa(caCert: string): Promise<void>;
  /** TokenReview bound to the node of the agent pod; pods are looked up in the source's cache first. */
  authenticator(agentServiceAccount: string): Authenticator;
  postNodeEvent(body: CoreV1Event): Promise<void>;
  startSource(compiler: PolicyCompiler, onChange: () => void): Promise<KubernetesSource>;
  /** For the clusterset member's own informers and writers (src/multicluster/kubernetes.ts). */
  kubeConfig: KubeConfig;
}

export function clusterAccess(o: { kubeconfig?: string; inCluster?: boolean; namespace: string }): ClusterAccess {
  const kc = new KubeConfig();
  if (o.inCluster) kc.loadFromCluster();
  else kc.loadFromFile(o.kubeconfig!);
  const core = kc.makeApiClient(CoreV1Api);
  let source: KubernetesSource | undefined;
  return {
    kubeConfig: kc,
    certStore: new SecretCertStore(core, o.namespace),
    meshCaStore: meshCaSecretStore(core, o.namespace),
    csrProvider: (signerName, trustBundle) => new KubernetesCsrProvider({ api: kc.makeApiClient(CertificatesV1Api) as unknown as CsrApi, signerName, trustBundle }),
    publishCa: (caCert) => publishCa(core, o.namespace, caCert),
    authenticator(agentServiceAccount) {
      const authn = kc.makeApiClient(AuthenticationV1Api);
      return new TokenReviewAuthenticator({
        agentServiceAccount,
        review: async (token) => {
          const r = await authn.createTokenReview({ body: { spec: { token } } });
          return { authenticated: r.status?.authenticated === true, username: r.status?.user?.username, extra: r.status?.user?.extra };
        },
        pod: async (ns, name) => {
          const cached = source?.pod(ns, name);
          if (cached) return cached;
          const p = await core.readNamespacedPod({ namespace: ns, name }).catch(() => undefined);
          return p && { nodeName: p.spec?.nodeName, uid: p.metadata?.uid };
        },
      });
    },
    postNodeEvent: async (body) => void (await core.createNamespacedEvent({ namespace: NODE_EVENT_NAMESPACE, body })),
    async startSource(compiler, onChange) {
      // After each compile the Gateway API status goes back to the cluster (src/gateway/status-writer.ts).
      const status = new GatewayStatusWriter(kc.makeApiClient(CustomObjectsApi), setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
      source = new KubernetesSource({
        kubeConfig: kc,
        compiler,
        namespace: o.namespace,
        onChange: () => {
          onChange();
          const r = compiler.gatewayStatus();
          if (r && source) status.update(r, (kind, ns, name) => source?.object(kind, ns, name) as { status?: Record<string, unknown> } | undefined);
        },
      });
      await source.start();
      return source;
    },
  };
}
