import { AuthenticationV1Api } from '@kubernetes/client-node';
import { TokenReviewAuthenticator } from '../../src/controller/auth.js';
import { KubernetesSource } from '../../src/controller/sources/kubernetes.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { TestApiServer, type Obj as ApiObj } from '../support/k8s-api-server.js';
import { baseMesh, matchSplit, meshConfig, pod, routeGroup, slice, split } from './policy-fixtures.js';

let api: TestApiServer;
let compiler: PolicyCompiler;
let source: KubernetesSource;

const pods = (node = 'node-a') => compiler.get(node)?.policy.pods.map((p) => p.name).sort() ?? [];

/** Resolves once `cond` holds (polled; the test timeout is the only limit). */
async function eventually(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}

async function startSource(): Promise<void> {
  source = new KubernetesSource({
    kubeConfig: api.kubeConfig(),
    compiler,
    namespace: 'fsm-system',
    debounceMs: 5,
    backoff: { initialMs: 20, maxMs: 200 },
    onChange: () => void compiler.compile(),
  });
  await source.start();
  compiler.compile();
}

beforeEach(async () => {
  api = await TestApiServer.start();
  for (const o of baseMesh()) api.create(o as ApiObj);
  compiler = new PolicyCompiler();
});

afterEach(async () => {
  await source?.stop();
  await api.close();
});

describe('TrafficSplit versions a cluster serves', () => {
  const withSplit = async (served: Record<string, string>, obj: ApiObj): Promise<void> => {
    await api.close();
    api = await TestApiServer.start({ served });
    for (const o of baseMesh()) api.create(o as ApiObj);
    api.create(obj);
    await startSource();
  };

  test('a cluster that serves only v1alpha2 (OSM\'s CRD) is read through v1alpha2', async () => {
    await withSplit({ TrafficSplit: 'v1alpha2' }, split('s', 'web', [{ service: 'db', weight: 1 }]) as ApiObj);
    expect(compiler.get('node-a')!.policy.splits.map((x) => x.name)).toEqual(['s']);
    const paths = api.requests.filter((r) => r.path.includes('trafficsplits')).map((r) => r.path);
    expect(paths[0]).toBe('/apis/split.smi-spec.io/v1alpha4/trafficsplits');
    expect(paths).toContain('/apis/split.smi-spec.io/v1alpha2/trafficsplits');
  });

  test('a cluster that serves v1alpha4 is read through it, matches included', async () => {
    await withSplit({}, matchSplit('s', 'web', [{ service: 'db', weight: 1 }], ['routes']) as ApiObj);
    api.create(routeGroup('routes') as ApiObj);
    await eventually(() => compiler.get('node-a')!.policy.splits.length === 1);
    expect(compiler.get('node-a')!.policy.splits[0]!.matches.map((m) => m.name)).toEqual(['api']);
    expect(api.requests.some((r) => r.path.includes('/v1alpha2/trafficsplits'))).toBe(false);
  });

  test('a cluster without the CRD does not block the sync', async () => {
    await api.close();
    api = await TestApiServer.start({ served: { TrafficSplit: 'v9' } });
    for (const o of baseMesh()) api.create(o as ApiObj);
    await startSource();
    expect(source.synced).toBe(true);
    expect(pods()).toEqual(['db-1', 'web-1']);
    for (const v of ['v1alpha4', 'v1alpha3', 'v1alpha2', 'v1alpha1']) expect(api.requests.some((r) => r.path === `/apis/split.smi-spec.io/${v}/trafficsplits`)).toBe(true);
  });
});

describe('KubernetesSource with the real client-node informers', () => {
  test('lists every resource, then follows ADDED / MODIFIED / DELETED', async () => {
    await startSource();
    expect(pods()).toEqual(['db-1', 'web-1']);
    expect(source.synced).toBe(true);

    api.create(pod('web-2', { ip: '10.0.0.12', sa: 'web' }) as ApiObj);
    await eventually(() => pods().includes('web-2'));

    api.update({ ...(pod('web-2', { ip: '10.0.0.12', sa: 'web', annotations: { 'flomesh.io/sidecar-injection': 'disabled' } }) as ApiObj) });
    await eventually(() => !pods().includes('web-2'));

    api.remove('Pod', 'app', 'db-1');
    await eventually(() => !pods().includes('db-1'));
    expect(pods()).toEqual(['web-1']);
  });

  test('watches ask for bookmarks, and a resumed watch starts from the bookmark', async () => {
    await startSource();
    const podWatches = () => api.requests.filter((r) => r.path === '/api/v1/pods' && r.query.watch === 'true');
    expect(podWatches().every((r) => r.query.allowWatchBookmarks === 'true')).toBe(true);
    // Writes elsewhere move the resourceVersion on; only a bookmark tells the pod watch about it.
    api.create({ apiVersion: 'v1', kind: 'ConfigMap', metadata: { name: 'unrelated', namespace: 'fsm-system' } });
    api.bookmark();
    const rv = api.get('ConfigMap', 'fsm-system', 'unrelated')!.metadata.resourceVersion;
    const before = podWatches().length;
    await new Promise((r) => setTimeout(r, 20)); // let the bookmark line arrive before the drop
    api.dropWatches();
    await eventually(() => podWatches().length > before && api.watchCount('pods') === 1);
    expect(podWatches().at(-1)!.query.resourceVersion).toBe(rv);
  });

  test('410 Gone on resume makes the informer relist; changes missed meanwhile are applied', async () => {
    await startSource();
    const lists = () => api.requests.filter((r) => r.path === '/api/v1/pods' && r.query.watch !== 'true').length;
    const listsBefore = lists();
    // The watch connection drops; while the client is away, a pod is deleted and history is compacted.
    api.dropWatches();
    api.remove('Pod', 'app', 'db-1');
    api.create(pod('web-4', { ip: '10.0.0.14' }) as ApiObj);
    api.compact();
    await eventually(() => pods().join() === 'web-1,web-4');
    expect(lists()).toBeGreaterThan(listsBefore);
  });

  test('list errors restart the informer with backoff until the API answers', async () => {
    api.failNext('GET', '/api/v1/pods', 500, 3);
    await startSource();
    expect(pods()).toEqual(['db-1', 'web-1']);
    const podLists = api.requests.filter((r) => r.path === '/api/v1/pods' && r.query.watch !== 'true');
    expect(podLists.length).toBe(4);
  });

  test('a dropped watch with a failing relist recovers and sees later changes', async () => {
    await startSource();
    api.failNext('GET', '/api/v1/pods', 503, 2);
    api.dropWatches();
    api.create(pod('web-5', { ip: '10.0.0.15' }) as ApiObj);
    await eventually(() => pods().includes('web-5'));
  });

  test('an SMI CRD that is not installed does not block the first sync', async () => {
    api.failNext('GET', '/apis/split.smi-spec.io/', 404, 1);
    await startSource();
    expect(source.synced).toBe(true);
    expect(pods()).toEqual(['db-1', 'web-1']);
  });

  test('only the mesh ConfigMap is watched (field selector), and it is applied', async () => {
    api.create(meshConfig({ inbound: 'strict' }) as ApiObj);
    api.create({ ...(meshConfig({ inbound: 'nonsense' }) as ApiObj), metadata: { name: 'other-config', namespace: 'fsm-system' } });
    await startSource();
    expect(compiler.get('node-a')!.policy.mesh.inbound).toBe('strict');
    const cm = api.requests.filter((r) => r.path === '/api/v1/namespaces/fsm-system/configmaps');
    expect(cm.length).toBeGreaterThan(0);
    expect(cm.every((r) => r.query.fieldSelector === 'metadata.name=fsm-mesh-config')).toBe(true);
    expect(compiler.reporter.active()).toEqual([]);
  });

  test('a bad object is reported with a Kubernetes Event; the rest keeps compiling', async () => {
    await startSource();
    api.create(split('bad', 'web', [{ service: 'db', weight: 'heavy' }]) as ApiObj);
    api.create(slice('web', [{ ip: '10.0.0.1', pod: 'web-1' }]) as ApiObj);
    await eventually(() => compiler.get('node-b')!.policy.services.find((s) => s.name === 'web')!.endpoints.length === 1);
    await eventually(() => api.list('Event').length === 1);
    const [ev] = api.list('Event');
    expect(ev).toMatchObject({
      reason: 'InvalidMeshObject',
      type: 'Warning',
      involvedObject: { kind: 'TrafficSplit', name: 'bad', namespace: 'app' },
    });
    expect(String(ev!.message)).toContain('spec.backends[0].weight');
  });
});

describe('TokenReview authentication against the API server', () => {
  test('binds an agent token to the node its pod runs on; refuses other accounts and unbound tokens', async () => {
    api.create(pod('fsm-node-agent-x', { ns: 'fsm-system', node: 'node-b', uid: 'agent-uid' }) as ApiObj);
    api.tokens.set('agent-token', {
      username: 'system:serviceaccount:fsm-system:fsm-node-agent',
      extra: { 'authentication.kubernetes.io/pod-name': ['fsm-node-agent-x'], 'authentication.kubernetes.io/pod-uid': ['agent-uid'] },
    });
    api.tokens.set('stale-token', {
      username: 'system:serviceaccount:fsm-system:fsm-node-agent',
      extra: { 'authentication.kubernetes.io/pod-name': ['fsm-node-agent-x'], 'authentication.kubernetes.io/pod-uid': ['old-uid'] },
    });
    api.tokens.set('app-token', { username: 'system:serviceaccount:app:web', extra: { 'authentication.kubernetes.io/pod-name': ['web-1'] } });
    api.tokens.set('unbound-token', { username: 'system:serviceaccount:fsm-system:fsm-node-agent' });
    const authn = api.kubeConfig().makeApiClient(AuthenticationV1Api);
    const auth = new TokenReviewAuthenticator({
      agentServiceAccount: 'fsm-system:fsm-node-agent',
      review: async (token) => {
        const r = await authn.createTokenReview({ body: { spec: { token } } });
        return { authenticated: r.status?.authenticated === true, username: r.status?.user?.username, extra: r.status?.user?.extra };
      },
      pod: async (ns, name) => {
        const p = api.get('Pod', ns, name);
        return p && { nodeName: (p.spec as { nodeName: string }).nodeName, uid: p.metadata.uid };
      },
    });
    expect(await auth.authenticate('agent-token')).toEqual({ node: 'node-b', principal: 'system:serviceaccount:fsm-system:fsm-node-agent pod fsm-node-agent-x' });
    expect(await auth.authenticate('stale-token')).toBeUndefined();
    expect(await auth.authenticate('app-token')).toBeUndefined();
    expect(await auth.authenticate('unbound-token')).toBeUndefined();
    expect(await auth.authenticate('nobody')).toBeUndefined();
    // Cached: a second call does not ask the API server again.
    const reviews = () => api.requests.filter((r) => r.path.endsWith('/tokenreviews')).length;
    const n = reviews();
    await auth.authenticate('agent-token');
    expect(reviews()).toBe(n);
  });
});
