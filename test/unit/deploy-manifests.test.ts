import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Ajv } from 'ajv';
import { CustomResourceDefinition } from 'kubernetes-models/apiextensions.k8s.io/v1';
import { DaemonSet, Deployment } from 'kubernetes-models/apps/v1';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1';
import { ClusterRole, ClusterRoleBinding, Role, RoleBinding } from 'kubernetes-models/rbac.authorization.k8s.io/v1';
import { ConfigMap, Namespace, Service, ServiceAccount } from 'kubernetes-models/v1';
import { PodMonitor, ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
import { parseAllDocuments } from 'yaml';
import { agentDefaults, envName, loadAgentConfig, AgentConfigSchema } from '../../src/agent/config.js';
import { agentMetrics } from '../../src/agent/metrics.js';
import { PIPY_BUILTINS } from '../../src/proxy/metrics.js';
import { modeLabel } from '../../src/agent/mode.js';
import { parseCommandArgs } from '../../src/cli/command.js';
import { agentCommand } from '../../src/cli/commands/agent.js';
import { cleanupCommand } from '../../src/cli/commands/cleanup.js';
import { controllerCommand } from '../../src/cli/commands/controller.js';
import { main } from '../../src/cli/main.js';
import { publishCa, SecretCertStore } from '../../src/controller/certs.js';
import { CONTROLLER_SERVICE, DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_LISTEN, parseListen, runController } from '../../src/controller/main.js';
import { controllerMetrics } from '../../src/controller/metrics.js';
import { PolicyHub } from '../../src/controller/hub.js';
import { buildApi } from '../../src/http/server.js';
import { PolicyClient } from '../../src/policy/client.js';
import { PolicyCompiler } from '../../src/policy/compiler.js';
import { DEFAULT_CONTROLLER_NAMESPACE, LABEL_MONITORED_BY, MESH_CONFIG_NAME } from '../../src/policy/fsm.js';
import { FSMN_MC_API_VERSION, MCS_API_VERSION, parseGlobalTrafficPolicy, parseServiceExport } from '../../src/multicluster/api.js';
import { serviceImport } from '../../src/multicluster/kubernetes.js';
import { KINDS, toRecord, type Kind } from '../../src/policy/objects.js';
import { eventually } from '../support/eventually.js';
import { TestApiServer, type Obj as ApiObj } from '../support/k8s-api-server.js';
import { baseMesh, pod } from './policy-fixtures.js';
import {
  at,
  deployDir,
  find,
  hasModel,
  loadDir,
  loadDocs,
  modelName,
  nonStructural,
  prunedFields,
  requestInfo,
  root,
  ruleAllows,
  runScript,
  unknownFields,
  yamlFiles,
  type ApiRequest,
  type JsonSchema,
  type K8sObject,
  type ManifestDoc,
  type PolicyRule,
} from './deploy-support.js';

/**
 * The manifests under daemonset/: they parse, each object passes the
 * Kubernetes schema of its kind, kustomize renders them, and what they say
 * about images, ports, paths, names, flags and RBAC agrees with the code.
 */

/** The agent's metrics need live values only when scraped; the names are what these tests read. */
const idle = { ready: () => false, proxy: () => ({ listening: false, restarts: 0 }), policyReceivedAt: () => undefined, policyFetchErrors: () => 0 };
const version = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version;
const all = (): ManifestDoc[] => yamlFiles(deployDir).flatMap(loadDocs);
const objects = (): ManifestDoc[] => all().filter((d) => d.obj.kind !== 'Kustomization' && !/\/scrape-annotations\.yaml$/.test(d.file));
const base = () => loadDir(join(deployDir, 'base')).concat(loadDir(join(deployDir, 'crds')));
const agentDs = () => find(base(), 'DaemonSet', 'fsm-node-agent');
const controllerDeploy = () => find(base(), 'Deployment', 'fsm-node-controller');

interface Container {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: Array<{ name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } }>;
  ports?: Array<{ name: string; containerPort: number; hostPort?: number }>;
  volumeMounts?: Array<{ name: string; mountPath: string; mountPropagation?: string }>;
  livenessProbe?: { httpGet?: { path: string; port: string | number; scheme?: string } };
  readinessProbe?: { httpGet?: { path: string; port: string | number; scheme?: string } };
  startupProbe?: { httpGet?: { path: string; port: string | number; scheme?: string } };
  securityContext?: Record<string, unknown>;
}
const podSpec = (o: K8sObject) => at<Record<string, unknown>>(o, 'spec', 'template', 'spec');
const containers = (o: K8sObject): Container[] => [...(at<Container[]>(podSpec(o), 'initContainers') ?? []), ...at<Container[]>(podSpec(o), 'containers')];
const container = (o: K8sObject, name: string): Container => {
  const c = containers(o).find((x) => x.name === name);
  if (!c) throw new Error(`${o.kind} ${o.metadata.name} has no container ${name}`);
  return c;
};
const envOf = (c: Container, values: Record<string, string>): Record<string, string> =>
  Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value ?? values[e.valueFrom?.fieldRef?.fieldPath ?? ''] ?? '']));
const scriptOf = (c: Container): string => {
  expect(c.command).toEqual(['/bin/sh', '-c']);
  return c.args![0]!;
};

// ---- schemas -------------------------------------------------------------------

type Validating = new (data: never) => { validate(): void };
const schemaModels: Record<string, Validating> = {
  'v1/Namespace': Namespace,
  'v1/ServiceAccount': ServiceAccount,
  'v1/ConfigMap': ConfigMap,
  'v1/Service': Service,
  'apps/v1/Deployment': Deployment,
  'apps/v1/DaemonSet': DaemonSet,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'rbac.authorization.k8s.io/v1/ClusterRole': ClusterRole,
  'rbac.authorization.k8s.io/v1/ClusterRoleBinding': ClusterRoleBinding,
  'rbac.authorization.k8s.io/v1/Role': Role,
  'rbac.authorization.k8s.io/v1/RoleBinding': RoleBinding,
  'apiextensions.k8s.io/v1/CustomResourceDefinition': CustomResourceDefinition,
  'monitoring.coreos.com/v1/PodMonitor': PodMonitor,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
};

interface Crd {
  spec: { group: string; names: { kind: string; plural: string }; scope: string; versions: Array<{ name: string; served: boolean; storage: boolean; subresources?: Record<string, unknown>; schema: { openAPIV3Schema: JsonSchema } }> };
}
const crds = () => loadDir(join(deployDir, 'crds')).filter((d) => d.obj.kind === 'CustomResourceDefinition').map((d) => d.obj as unknown as K8sObject & Crd);

describe('manifests', () => {
  test('every YAML file under daemonset/ parses, and every object has apiVersion, kind and a name', () => {
    const docs = all();
    expect(docs.length).toBeGreaterThan(30);
    for (const { file, obj } of docs) {
      expect({ file, apiVersion: typeof obj.apiVersion, kind: typeof obj.kind }).toEqual({ file, apiVersion: 'string', kind: 'string' });
      if (obj.kind !== 'Kustomization') expect({ file, name: typeof obj.metadata?.name }).toEqual({ file, name: 'string' });
    }
  });

  test('each built-in object validates against the Kubernetes schema of its kind, with no unknown fields', () => {
    const checked = new Set<string>();
    for (const { file, obj } of objects()) {
      const key = `${obj.apiVersion}/${obj.kind}`;
      const group = obj.apiVersion.includes('.') ? obj.apiVersion.split('/')[0]! : '';
      if (/smi-spec\.io$|^policy\.flomesh\.io$/.test(group)) continue; // custom resources: next test
      const Model = schemaModels[key];
      if (!Model) throw new Error(`${file}: no schema for ${key}: add its model to the table`);
      const where = `${file} ${obj.kind}/${obj.metadata.name}`;
      try {
        new Model(obj as never).validate();
      } catch (err) {
        throw new Error(`${where}: ${(err as Error).message}`);
      }
      const model = modelName(obj.apiVersion, obj.kind);
      if (hasModel(model)) expect({ where, unknown: unknownFields(obj, model) }).toEqual({ where, unknown: [] });
      checked.add(key);
    }
    expect([...checked].sort()).toEqual(Object.keys(schemaModels).sort());
  });

  test('the unknown-field check finds a typo (so the test above can fail)', () => {
    const ds = structuredClone(agentDs());
    (podSpec(ds) as Record<string, unknown>).hostNetwrk = true;
    expect(unknownFields(ds, 'V1DaemonSet')).toEqual(['spec.template.spec.hostNetwrk']);
  });

  test('the CRDs are structural and serve the group, version, kind and plural the controller watches', () => {
    // The multi-cluster kinds are read by the clusterset member (src/multicluster), not the policy compiler: tested below.
    const defs = crds().filter((c) => `${c.spec.group}/v1alpha1` !== FSMN_MC_API_VERSION && `${c.spec.group}/v1alpha1` !== MCS_API_VERSION);
    const customKinds = (Object.keys(KINDS) as Kind[]).filter((k) => KINDS[k][0].includes('smi-spec.io') || KINDS[k][0].includes('fsm-node.io') || KINDS[k][0].startsWith('policy.flomesh.io/'));
    // The Gateway API's CRDs are upstream's (docs/ingress-egress.md).
    expect(defs.map((c) => c.spec.names.kind).sort()).toEqual([...customKinds].sort());
    // Only the SMI CRDs carry the label the existing-smi-crds overlay removes by.
    for (const c of defs) expect({ kind: c.spec.names.kind, smi: c.metadata.labels?.['fsm-node.io/api'] === 'smi' }).toEqual({ kind: c.spec.names.kind, smi: c.spec.group.endsWith('smi-spec.io') });
    for (const c of defs) {
      const kind = c.spec.names.kind as Kind;
      const [group] = KINDS[kind][0].split('/');
      // Every version the controller reads is served; the first (the one it watches) is stored.
      const versions = (KINDS[kind] as readonly string[]).map((v, i) => [v.split('/')[1], true, i === 0]);
      expect({ kind, group: c.spec.group, versions: c.spec.versions.map((v) => [v.name, v.served, v.storage]), scope: c.spec.scope }).toEqual({ kind, group, versions, scope: 'Namespaced' });
      expect(c.metadata.name).toBe(`${c.spec.names.plural}.${c.spec.group}`);
      // The plural is what the informer's path uses (src/controller/sources/kubernetes.ts).
      expect(c.spec.names.plural).toBe(kind === 'Egress' ? 'egresses' : kind === 'Retry' ? 'retries' : `${kind.toLowerCase()}s`);
      for (const v of c.spec.versions) expect({ kind, version: v.name, problems: nonStructural(v.schema.openAPIV3Schema) }).toEqual({ kind, version: v.name, problems: [] });
      // Several versions without conversion: the API server only rewrites apiVersion (what src/policy/smi-split.ts expects).
      if (c.spec.versions.length > 1) expect((c.spec as { conversion?: unknown }).conversion).toEqual({ strategy: 'None' });
    }
  });

  test('custom resources validate against our CRDs, lose no field to pruning, and are accepted by the controller', () => {
    const ajv = new Ajv({ strict: false, allErrors: true });
    const schemas = new Map<string, JsonSchema>(crds().flatMap((c) => c.spec.versions.map((v) => [`${c.spec.group}/${v.name}/${c.spec.names.kind}`, v.schema.openAPIV3Schema] as const)));
    const resources = objects().filter((d) => /smi-spec\.io\/|policy\.flomesh\.io\//.test(d.obj.apiVersion));
    expect(resources.length).toBeGreaterThanOrEqual(6);
    for (const { file, obj } of resources) {
      const where = `${file} ${obj.kind}/${obj.metadata.name}`;
      const schema = schemas.get(`${obj.apiVersion}/${obj.kind}`);
      if (!schema) throw new Error(`${where}: no CRD serves ${obj.apiVersion} ${obj.kind}`);
      const validate = ajv.compile(schema);
      expect({ where, valid: validate(obj), errors: validate.errors ?? null }).toEqual({ where, valid: true, errors: null });
      expect({ where, pruned: prunedFields(obj, schema) }).toEqual({ where, pruned: [] });
      // The controller's own parser (what makes it report an object as invalid).
      expect(() => toRecord(obj.kind as Kind, { ...obj, metadata: { ...obj.metadata, namespace: 'fsm-demo' } })).not.toThrow();
    }
    // And the CRD schemas refuse what the controller refuses.
    for (const v of ['v1alpha1', 'v1alpha2', 'v1alpha3', 'v1alpha4']) {
      const split = schemas.get(`split.smi-spec.io/${v}/TrafficSplit`)!;
      expect(ajv.validate(split, { spec: { service: 'a', backends: [] } })).toBe(false);
      expect(ajv.validate(split, { spec: { service: 'a', backends: [{ service: 'b', weight: -1 }] } })).toBe(false);
      expect(ajv.validate(split, { spec: { service: 'a', backends: [{ service: 'b', weight: '10%' }] } })).toBe(false);
    }
    const retry = schemas.get('policy.flomesh.io/v1alpha1/Retry')!;
    const retrySpec = { source: { kind: 'ServiceAccount', name: 'c' }, destinations: [{ kind: 'Service', name: 'e' }], retryPolicy: { retryOn: '5xx' } };
    expect(ajv.validate(retry, { spec: retrySpec })).toBe(true);
    expect(ajv.validate(retry, { spec: { ...retrySpec, destinations: [] } })).toBe(false);
    expect(ajv.validate(retry, { spec: { ...retrySpec, retryPolicy: { retryOn: '5xx', perTryTimeout: '2 seconds' } } })).toBe(false);
    const uts = schemas.get('policy.flomesh.io/v1alpha1/UpstreamTrafficSetting')!;
    expect(ajv.validate(uts, { spec: { host: 'e', rateLimit: { local: { http: { requests: 10, unit: 'day' } } } } })).toBe(false);
    expect(ajv.validate(uts, { spec: { host: 'e', connectionSettings: { tcp: { maxConnections: 0 } } } })).toBe(false);
    for (const v of ['v1alpha3', 'v1alpha4']) {
      const split = schemas.get(`split.smi-spec.io/${v}/TrafficSplit`)!;
      expect(ajv.validate(split, { spec: { service: 'a', backends: [{ service: 'b', weight: 1 }], matches: [{ kind: 'TCPRoute', name: 'r' }] } })).toBe(false);
      expect(ajv.validate(split, { spec: { service: 'a', backends: [{ service: 'b', weight: 1 }], matches: [{ apiGroup: 'x.io', kind: 'HTTPRouteGroup', name: 'r' }] } })).toBe(false);
      expect(ajv.validate(split, { spec: { service: 'a', backends: [{ service: 'b', weight: 0.5 }] } })).toBe(false);
    }
  });

  test('the GlobalTrafficPolicy CRD serves what the clusterset member watches and refuses what its parser refuses', () => {
    const crd = crds().find((c) => c.spec.names.kind === 'GlobalTrafficPolicy')!;
    expect(`${crd.spec.group}/${crd.spec.versions.map((v) => v.name).join()}`).toBe(FSMN_MC_API_VERSION);
    // The informer's path (src/multicluster/kubernetes.ts).
    expect(crd.metadata.name).toBe(`globaltrafficpolicies.${crd.spec.group}`);
    expect(crd.spec.names.plural).toBe('globaltrafficpolicies');
    const schema = crd.spec.versions[0]!.schema.openAPIV3Schema;
    expect(nonStructural(schema)).toEqual([]);
    const validate = new Ajv({ strict: false, allErrors: true }).compile(schema);
    const gtp = (spec: unknown) => ({ apiVersion: FSMN_MC_API_VERSION, kind: 'GlobalTrafficPolicy', metadata: { name: 'web', namespace: 'shop' }, spec });
    // docs/multicluster.md's example, and one of each mode.
    for (const spec of [{ mode: 'FailOver', failOver: ['c1'] }, {}, { mode: 'ActiveActive', weights: { c1: 3, c2: 1 } }, { mode: 'Locality' }]) {
      expect({ spec, valid: validate(gtp(spec)), errors: validate.errors ?? null }).toEqual({ spec, valid: true, errors: null });
      expect(prunedFields(gtp(spec), schema)).toEqual([]);
      expect(() => parseGlobalTrafficPolicy(gtp(spec))).not.toThrow();
    }
    // Refused by both, with the field named by the parser.
    const bad: Array<[unknown, RegExp]> = [
      [{ mode: 'Nearest' }, /spec\.mode/],
      [{ mode: 'ActiveActive', weights: { c1: -1 } }, /spec\.weights/],
      [{ mode: 'ActiveActive', weights: { c1: 1.5 } }, /spec\.weights/],
      [{ mode: 'FailOver', failOver: ['Site_1'] }, /spec\.failOver/],
    ];
    // (An unknown field such as `failover` is pruned by the API server, as structural schemas do; the parser refuses it.)
    expect(() => parseGlobalTrafficPolicy(gtp({ mode: 'FailOver', failover: ['c1'] }))).toThrow(/spec/);
    for (const [spec, field] of bad) {
      expect({ spec, valid: validate(gtp(spec)) }).toEqual({ spec, valid: false });
      expect(() => parseGlobalTrafficPolicy(gtp(spec))).toThrow(field);
    }
    // What JSON Schema cannot say is said to the API server: failOver is a set, and all-zero weights fail a CEL rule.
    expect(JSON.stringify(schema)).toContain('"x-kubernetes-list-type":"set"');
    expect(() => parseGlobalTrafficPolicy(gtp({ mode: 'FailOver', failOver: ['c1', 'c1'] }))).toThrow(/failOver\[1\]/);
    expect(JSON.stringify(schema)).toContain('self.weights.exists(k, self.weights[k] > 0)');
    expect(() => parseGlobalTrafficPolicy(gtp({ mode: 'ActiveActive', weights: { c1: 0 } }))).toThrow(/weight 0/);
  });

  test('the MCS-API CRDs (ServiceExport, ServiceImport) serve what the clusterset member reads and writes; the docs\' examples and the controller\'s objects pass them', () => {
    const find = (kind: string) => crds().find((c) => c.spec.names.kind === kind)!;
    const schemaOf = (kind: string) => find(kind).spec.versions[0]!.schema.openAPIV3Schema;
    for (const [kind, plural] of [['ServiceExport', 'serviceexports'], ['ServiceImport', 'serviceimports']] as const) {
      const crd = find(kind);
      expect(`${crd.spec.group}/${crd.spec.versions.map((v) => v.name).join()}`).toBe(MCS_API_VERSION);
      // The paths src/multicluster/kubernetes.ts uses, and the RBAC grants.
      expect([crd.metadata.name, crd.spec.names.plural, crd.spec.scope]).toEqual([`${plural}.${crd.spec.group}`, plural, 'Namespaced']);
      expect(nonStructural(schemaOf(kind))).toEqual([]);
    }
    // Conditions go through the status subresource; a ServiceImport is written whole (spec and status).
    expect(find('ServiceExport').spec.versions[0]!.subresources).toEqual({ status: {} });
    expect(find('ServiceImport').spec.versions[0]!.subresources).toBeUndefined();
    const ajv = new Ajv({ strict: false, allErrors: true });
    const check = (kind: string, obj: unknown) => {
      const ok = ajv.validate(schemaOf(kind), obj);
      return { obj, ok, errors: ajv.errors ?? null, pruned: prunedFields(obj, schemaOf(kind)) };
    };
    // docs/multicluster.md's examples (its yaml blocks of these kinds).
    const doc = readFileSync(join(root, 'docs', 'multicluster.md'), 'utf8');
    const examples = [...doc.matchAll(/```yaml\n([\s\S]*?)```/g)].flatMap((m) => parseAllDocuments(m[1]!).map((d) => d.toJS() as K8sObject)).filter((o) => o?.apiVersion === MCS_API_VERSION);
    expect(examples.map((o) => o.kind).sort()).toEqual(['ServiceExport', 'ServiceImport']);
    for (const o of examples) expect(check(o.kind, o)).toEqual({ obj: o, ok: true, errors: null, pruned: [] });
    expect(() => parseServiceExport(examples.find((o) => o.kind === 'ServiceExport'))).not.toThrow();
    // What the controller writes: ServiceImports of both types, and an export's conditions.
    for (const i of [
      { namespace: 'shop', name: 'web', type: 'ClusterSetIP', ips: ['241.0.0.1'], clusters: ['c1', 'c2'], ports: [8080, 9090], tiers: [['c1'], ['c2']] },
      { namespace: 'shop', name: 'db', type: 'Headless', ips: [], clusters: ['c2'], ports: [5432], tiers: [['c2']] },
    ]) {
      const o = serviceImport(i);
      expect(check('ServiceImport', o)).toEqual({ obj: o, ok: true, errors: null, pruned: [] });
    }
    const exported = { apiVersion: MCS_API_VERSION, kind: 'ServiceExport', metadata: { name: 'web', namespace: 'shop' }, status: { conditions: [
      { type: 'Valid', status: 'True', reason: 'Exported', message: 'exported to the clusterset', lastTransitionTime: '2026-12-04T21:00:00.000Z' },
      { type: 'Conflict', status: 'True', reason: 'PortConflict', message: 'port http: c1 wins (oldest export)', lastTransitionTime: '2026-12-04T21:00:00.000Z' },
    ] } };
    expect(check('ServiceExport', exported)).toEqual({ obj: exported, ok: true, errors: null, pruned: [] });
    // And what they refuse.
    const imp = (spec: unknown) => ({ apiVersion: MCS_API_VERSION, kind: 'ServiceImport', metadata: { name: 'web', namespace: 'shop' }, spec });
    for (const spec of [{ type: 'Loadbalanced', ports: [{ port: 80 }] }, { type: 'ClusterSetIP', ports: [{ port: 0 }] }, { type: 'ClusterSetIP', ports: [{ port: 80, protocol: 'HTTP' }] }, { type: 'ClusterSetIP' }, { type: 'ClusterSetIP', ports: [], ips: ['a', 'b', 'c'] }]) {
      expect({ spec, ok: check('ServiceImport', imp(spec)).ok }).toEqual({ spec, ok: false });
    }
    const badCondition = { ...exported, status: { conditions: [{ type: 'Valid', status: 'Maybe' }] } };
    expect(check('ServiceExport', badCondition).ok).toBe(false);
  });

  test('a TrafficSplit of every SMI version validates against its version of the CRD, keeps every field and is accepted by the controller', () => {
    const ajv = new Ajv({ strict: false, allErrors: true });
    const crd = crds().find((c) => c.spec.names.kind === 'TrafficSplit')!;
    const meta = { name: 's', namespace: 'fsm-demo' };
    const examples: Record<string, unknown> = {
      v1alpha1: { service: 'echo', backends: [{ service: 'echo-v1', weight: '500m' }, { service: 'echo-v2', weight: 1 }] },
      v1alpha2: { service: 'echo', backends: [{ service: 'echo-v1', weight: 80 }, { service: 'echo-v2', weight: 20 }] },
      v1alpha3: { service: 'echo', matches: [{ kind: 'HTTPRouteGroup', name: 'canary' }], backends: [{ service: 'echo-v2', weight: 100 }] },
      v1alpha4: { service: 'echo', matches: [{ apiGroup: 'specs.smi-spec.io', kind: 'HTTPRouteGroup', name: 'canary' }], backends: [{ service: 'echo-v1', weight: 0 }, { service: 'echo-v2', weight: 100 }] },
    };
    expect(crd.spec.versions.map((v) => v.name).sort()).toEqual(Object.keys(examples).sort());
    for (const v of crd.spec.versions) {
      const obj = { apiVersion: `split.smi-spec.io/${v.name}`, kind: 'TrafficSplit', metadata: meta, spec: examples[v.name] };
      const validate = ajv.compile(v.schema.openAPIV3Schema);
      expect({ v: v.name, valid: validate(obj), errors: validate.errors ?? null }).toEqual({ v: v.name, valid: true, errors: null });
      expect({ v: v.name, pruned: prunedFields(obj, v.schema.openAPIV3Schema) }).toEqual({ v: v.name, pruned: [] });
      expect(() => toRecord('TrafficSplit', obj)).not.toThrow();
    }
    // matches is no field of v1alpha2: the API server would prune it (the controller refuses it in a manifest).
    const v2 = crd.spec.versions.find((v) => v.name === 'v1alpha2')!.schema.openAPIV3Schema;
    expect(prunedFields({ spec: examples.v1alpha3 }, v2)).toEqual(['spec.matches']);
  });
});

// ---- kustomize -----------------------------------------------------------------

/** A kubectl whose built-in kustomize understands directories in `resources` (kubectl >= 1.21). */
function findKubectl(): { bin: string; version: string } | { missing: string } {
  const bin = process.env.KUBECTL ?? 'kubectl';
  const r = spawnSync(bin, ['version', '--client', '-o', 'json'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return { missing: `${bin} not runnable (${r.error?.message ?? r.stderr.trim()})` };
  const v = JSON.parse(r.stdout) as { clientVersion?: { minor?: string }; kustomizeVersion?: string };
  const minor = Number.parseInt(v.clientVersion?.minor ?? '0', 10);
  if (minor < 21) return { missing: `${bin} 1.${minor} embeds kustomize ${v.kustomizeVersion ?? '?'}, too old for these kustomizations (kubectl >= 1.21 needed)` };
  return { bin, version: `kubectl 1.${minor}, kustomize ${v.kustomizeVersion ?? '?'}` };
}

const kustomizations = ['crds', 'base', 'overlays/example-app', 'overlays/prometheus', 'overlays/uninstall', 'overlays/existing-smi-crds'];

describe('kustomize', () => {
  test('every file a kustomization names exists', () => {
    for (const k of kustomizations) {
      const dir = join(deployDir, k);
      const kz = loadDocs(join(dir, 'kustomization.yaml'))[0]!.obj as unknown as { resources?: string[]; patches?: Array<{ path?: string }>; configMapGenerator?: Array<{ files: string[] }> };
      const named = [...(kz.resources ?? []), ...(kz.patches ?? []).flatMap((p) => (p.path ? [p.path] : [])), ...(kz.configMapGenerator ?? []).flatMap((g) => g.files)];
      for (const n of named) expect({ k, n, exists: existsSync(join(dir, n)) }).toEqual({ k, n, exists: true });
    }
    // Every kustomization is listed here, so each one is rendered below.
    const found = yamlFiles(deployDir).filter((f) => f.endsWith('/kustomization.yaml')).map((f) => f.slice(deployDir.length + 1, -'/kustomization.yaml'.length));
    expect(found.sort()).toEqual([...kustomizations].sort());
  });

  const kubectl = findKubectl();
  const render = (k: string): K8sObject[] => {
    if ('missing' in kubectl) throw new Error(kubectl.missing);
    const out = execFileSync(kubectl.bin, ['kustomize', join(deployDir, k)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    return parseAllDocuments(out).map((d) => d.toJS() as K8sObject);
  };
  const kinds = (objs: K8sObject[]) => objs.map((o) => `${o.kind}/${o.metadata.name}`).sort();

  if ('missing' in kubectl) {
    test.skip(`renders (skipped: ${kubectl.missing}; set KUBECTL to a kubectl >= 1.21)`, () => undefined);
    return;
  }

  test(`renders every kustomization with ${kubectl.version}`, () => {
    const baseObjs = render('base');
    const baseSource = base().filter((d) => d.obj.kind !== 'Kustomization').map((d) => d.obj);
    expect(kinds(baseObjs)).toEqual(kinds(baseSource));
    expect(baseObjs.every((o) => ['Namespace', 'CustomResourceDefinition', 'ClusterRole', 'ClusterRoleBinding'].includes(o.kind) || o.metadata.namespace === DEFAULT_CONTROLLER_NAMESPACE)).toBe(true);

    const prom = render('overlays/prometheus');
    expect(kinds(prom)).toEqual([...kinds(baseObjs), 'ConfigMap/fsm-node-grafana-dashboard', 'PodMonitor/fsm-node-agent', 'ServiceMonitor/fsm-node-controller'].sort());
    const promAgent = prom.find((o) => o.kind === 'DaemonSet')!;
    expect(at(promAgent, 'spec', 'template', 'metadata', 'annotations')).toEqual({ 'prometheus.io/scrape': 'true', 'prometheus.io/port': '15900', 'prometheus.io/path': '/metrics' });
    // The patch adds annotations and changes nothing else.
    const stripped = structuredClone(promAgent);
    delete (stripped.spec as { template: { metadata: { annotations?: unknown } } }).template.metadata.annotations;
    expect(stripped).toEqual(baseObjs.find((o) => o.kind === 'DaemonSet'));
    const dashboard = prom.find((o) => o.metadata.name === 'fsm-node-grafana-dashboard')!;
    expect(Object.keys(at<Record<string, string>>(dashboard, 'data'))).toEqual(['fsm-node.json']);
    for (const o of prom) {
      const Model = schemaModels[`${o.apiVersion}/${o.kind}`];
      if (Model) new Model(o as never).validate();
    }

    const noCrds = render('overlays/existing-smi-crds');
    expect(kinds(noCrds)).toEqual(kinds(baseObjs).filter((k) => !(k.startsWith('CustomResourceDefinition/') && k.endsWith('smi-spec.io'))));
    expect(kinds(noCrds)).toContain('CustomResourceDefinition/mqttroutegroups.specs.fsm-node.io');

    const demo = render('overlays/example-app');
    expect(demo.every((o) => o.kind === 'Namespace' || o.metadata.namespace === 'fsm-demo')).toBe(true);
    expect(kinds(render('overlays/uninstall'))).toEqual(['DaemonSet/fsm-node-cleanup', 'Namespace/fsm-system']);
    // 4 SMI kinds, our MQTTRouteGroup and GlobalTrafficPolicy, FSM's Egress, Retry and UpstreamTrafficSetting, MCS-API's ServiceExport and ServiceImport.
    expect(kinds(render('crds'))).toHaveLength(11);
  });
});

// ---- agreement with the code -------------------------------------------------------

describe('the agent DaemonSet agrees with the agent', () => {
  const site = () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmt-deploy-'));
    const cg = join(dir, 'cgroup');
    mkdirSync(join(cg, 'kubepods.slice'), { recursive: true });
    const mounts = join(dir, 'mounts');
    writeFileSync(mounts, `cgroup2 ${cg} cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\nbpf ${join(dir, 'bpf')} bpf rw,relatime,mode=700 0 0\n`);
    return { dir, cg, mounts, bpffs: join(dir, 'bpf'), site: join(dir, 'run', 'site.yaml') };
  };

  test('every fsm-node image is the package version; pods run on linux amd64/arm64 only', () => {
    const docs = objects().filter((d) => ['DaemonSet', 'Deployment'].includes(d.obj.kind));
    const images = docs.flatMap((d) => containers(d.obj).map((c) => c.image)).filter((i) => i.startsWith('fsm-node'));
    expect(images.length).toBeGreaterThanOrEqual(5);
    expect(new Set(images)).toEqual(new Set([`fsm-node:${version}`]));
    for (const { obj } of docs.filter((d) => d.obj.metadata.namespace === DEFAULT_CONTROLLER_NAMESPACE)) {
      expect(at(podSpec(obj), 'nodeSelector')).toEqual({ 'kubernetes.io/os': 'linux' });
      expect(at(podSpec(obj), 'affinity', 'nodeAffinity', 'requiredDuringSchedulingIgnoredDuringExecution', 'nodeSelectorTerms')).toEqual([
        { matchExpressions: [{ key: 'kubernetes.io/arch', operator: 'In', values: ['amd64', 'arm64'] }] },
      ]);
    }
  });

  test('flags, environment and the prepared site file make a configuration the agent accepts', () => {
    const ds = agentDs();
    const agent = container(ds, 'agent');
    const { values } = parseCommandArgs(agentCommand, agent.args!.slice(1));
    expect(agent.args![0]).toBe('agent');
    const env = envOf(agent, { 'spec.nodeName': 'node-a', 'status.hostIP': '192.0.2.10' });
    // NODE_OPTIONS and MALLOC_ARENA_MAX are read by Node and glibc (memory sizing), not by the agent.
    const known = new Set([...Object.keys(AgentConfigSchema.shape).map(envName), 'NODE_NAME', 'FSMN_LOG_LEVEL', 'NODE_OPTIONS', 'MALLOC_ARENA_MAX']);
    expect(Object.keys(env).filter((k) => !known.has(k))).toEqual([]);

    const s = site();
    try {
      const prep = runScript(scriptOf(container(ds, 'prepare-node')), { MOUNTS: s.mounts, BPFFS: s.bpffs, SITE: s.site, PROXY_MEMORY_MAX: '256M' });
      expect(prep).toMatchObject({ status: 0, stderr: '' });
      // The file the agent reads is the one prepare-node writes (SITE defaults to it).
      expect(scriptOf(container(ds, 'prepare-node'))).toContain(`\${SITE:=${values.config as string}}`);
      const config = loadAgentConfig({}, env, s.site);
      expect(config).toMatchObject({
        node: 'node-a',
        proxyAddress: '192.0.2.10',
        nodeAddresses: ['192.0.2.10'],
        podsCgroup: join(s.cg, 'kubepods.slice'),
        proxyCgroup: join(s.cg, 'fsm-node-proxy'),
        stateDir: agentDefaults.stateDir,
        bpffsDir: agentDefaults.bpffsDir,
        listen: agentDefaults.listen,
        mode: agentDefaults.mode,
        proxy: agentDefaults.proxy,
        outboundPort: agentDefaults.outboundPort,
        inboundPort: agentDefaults.inboundPort,
      });
    } finally {
      rmSync(s.dir, { recursive: true, force: true });
    }
  });

  test('mounts sit where the configuration points', () => {
    const ds = agentDs();
    const agent = container(ds, 'agent');
    const env = envOf(agent, {});
    const mount = (name: string) => agent.volumeMounts!.find((m) => m.name === name)!;
    const hostPath = (name: string) => at<{ path: string; type: string } | undefined>(at<Array<{ name: string }>>(podSpec(ds), 'volumes').find((v) => v.name === name), 'hostPath');
    expect(mount('state').mountPath).toBe(env.FSMN_STATE_DIR);
    expect(hostPath('state')).toEqual({ path: agentDefaults.stateDir, type: 'DirectoryOrCreate' });
    expect(env.FSMN_BPFFS_DIR!.startsWith(`${mount('bpffs').mountPath}/`)).toBe(true);
    expect(hostPath('bpffs')?.path).toBe('/sys/fs/bpf');
    expect(mount('cgroup').mountPath).toBe('/sys/fs/cgroup');
    expect(hostPath('xtables-lock')).toEqual({ path: '/run/xtables.lock', type: 'FileOrCreate' });
    expect(env.FSMN_CA_FILE).toBe(`${mount('controller-ca').mountPath}/ca.crt`);
    expect(env.FSMN_TOKEN_FILE).toBe(`${mount('controller-token').mountPath}/token`);
    // Only the init container mounts bpffs; only it needs the mount to reach the host.
    expect(container(ds, 'prepare-node').volumeMounts!.find((m) => m.name === 'bpffs')!.mountPropagation).toBe('Bidirectional');
    expect(mount('bpffs').mountPropagation).toBe('HostToContainer');
    // The proxy outlives the agent only with the host's PID and cgroup namespaces (agent.yaml says why).
    expect(at(podSpec(ds), 'hostPID')).toBe(true);
    expect(at(podSpec(ds), 'hostNetwork')).toBe(true);
    expect(agent.securityContext).toEqual({ privileged: true });
  });

  test('ports and probes are the ones the agent serves', async () => {
    const agent = container(agentDs(), 'agent');
    const port = (name: string) => agent.ports!.find((p) => p.name === name)!;
    const listenPort = Number(envOf(agent, {}).FSMN_LISTEN!.split(':').pop());
    expect(listenPort).toBe(Number(agentDefaults.listen!.split(':').pop()));
    expect(port('api')).toEqual({ name: 'api', containerPort: listenPort, hostPort: listenPort, protocol: 'TCP' });
    expect(port('proxy-out').containerPort).toBe(agentDefaults.outboundPort);
    expect(port('proxy-in').containerPort).toBe(agentDefaults.inboundPort);
    for (const probe of [agent.startupProbe, agent.livenessProbe, agent.readinessProbe]) expect(probe?.httpGet?.port).toBe('api');
    // The probe paths answer as the probes expect: 200 when ready, 503 with the reason when not.
    let reason: string | undefined = 'no policy yet';
    const api = buildApi({ notReadyReason: () => reason, state: () => ({}), registry: agentMetrics(idle).registry });
    try {
      expect((await api.inject({ url: agent.livenessProbe!.httpGet!.path })).statusCode).toBe(200);
      expect((await api.inject({ url: agent.startupProbe!.httpGet!.path })).statusCode).toBe(200);
      expect((await api.inject({ url: agent.readinessProbe!.httpGet!.path })).statusCode).toBe(503);
      reason = undefined;
      expect((await api.inject({ url: agent.readinessProbe!.httpGet!.path })).statusCode).toBe(200);
    } finally {
      await api.close();
    }
  });

  test('the agent reaches the controller by its Service, with the CA the controller publishes and its own ServiceAccount', async () => {
    const docs = base();
    const ds = agentDs();
    const env = envOf(container(ds, 'agent'), {});
    const svc = find(docs, 'Service', CONTROLLER_SERVICE);
    const controllerPort = parseListen(DEFAULT_LISTEN).port;
    expect(env.FSMN_CONTROLLER).toBe(`https://${CONTROLLER_SERVICE}.${DEFAULT_CONTROLLER_NAMESPACE}.svc:${controllerPort}`);
    expect(at(svc, 'spec', 'ports')).toEqual([{ name: 'policy', port: controllerPort, targetPort: 'policy', protocol: 'TCP', appProtocol: 'https' }]);
    expect(`${ds.metadata.namespace}:${at(podSpec(ds), 'serviceAccountName')}`).toBe(DEFAULT_AGENT_SERVICE_ACCOUNT);
    expect(at(podSpec(ds), 'dnsPolicy')).toBe('ClusterFirstWithHostNet');
    // The ConfigMap name publishCa writes is the one the agent mounts.
    const published: string[] = [];
    const fake = {
      readNamespacedConfigMap: () => Promise.reject(Object.assign(new Error('not found'), { code: 404 })),
      createNamespacedConfigMap: (p: { body: { metadata: { name: string } } }) => Promise.resolve(published.push(p.body.metadata.name)),
      replaceNamespacedConfigMap: () => Promise.resolve(undefined),
    };
    await publishCa(fake as never, DEFAULT_CONTROLLER_NAMESPACE, 'PEM');
    const volume = at<Array<{ name: string; configMap?: { name: string } }>>(podSpec(ds), 'volumes').find((v) => v.name === 'controller-ca');
    expect(volume?.configMap?.name).toEqual(published[0]);
    // A pod-bound token, since the controller maps the token's pod to a node.
    expect(JSON.stringify(at(podSpec(ds), 'volumes'))).toContain('"serviceAccountToken":{"path":"token"');
    expect(at(podSpec(ds), 'automountServiceAccountToken')).toBe(false);
  });

  test('the controller Deployment runs the controller command with its default port and probes', () => {
    const docs = base();
    const d = controllerDeploy();
    const c = container(d, 'controller');
    expect(c.args![0]).toBe('controller');
    const { values } = parseCommandArgs(controllerCommand, c.args!.slice(1));
    expect(values).toMatchObject({ 'in-cluster': true, listen: DEFAULT_LISTEN });
    expect(c.ports).toEqual([{ name: 'policy', containerPort: parseListen(DEFAULT_LISTEN).port, protocol: 'TCP' }]);
    expect([c.startupProbe, c.livenessProbe, c.readinessProbe].map((p) => p?.httpGet)).toEqual([
      { path: '/healthz', port: 'policy', scheme: 'HTTPS' },
      { path: '/healthz', port: 'policy', scheme: 'HTTPS' },
      { path: '/readyz', port: 'policy', scheme: 'HTTPS' },
    ]);
    expect(d.metadata.namespace).toBe(DEFAULT_CONTROLLER_NAMESPACE);
    expect(at(d, 'spec', 'replicas')).toBe(2);
    expect(at(find(docs, 'PodDisruptionBudget', 'fsm-node-controller'), 'spec', 'minAvailable')).toBe(1);
  });

  test('selectors select the pods they are for', () => {
    const docs = objects().map((d) => d.obj);
    const matches = (sel: Record<string, string>, labels: Record<string, string> | undefined) => Object.entries(sel).every(([k, v]) => labels?.[k] === v);
    const workloads = docs.filter((o) => ['Deployment', 'DaemonSet'].includes(o.kind));
    for (const w of workloads) expect({ w: w.metadata.name, ok: matches(at(w, 'spec', 'selector', 'matchLabels'), at(w, 'spec', 'template', 'metadata', 'labels')) }).toEqual({ w: w.metadata.name, ok: true });
    const podsOf = (sel: Record<string, string>, ns: string | undefined) => workloads.filter((w) => (ns === undefined || w.metadata.namespace === ns) && matches(sel, at(w, 'spec', 'template', 'metadata', 'labels'))).map((w) => w.metadata.name);
    expect(podsOf(at(find(docs, 'Service', 'fsm-node-controller'), 'spec', 'selector'), 'fsm-system')).toEqual(['fsm-node-controller']);
    expect(podsOf(at(find(docs, 'PodDisruptionBudget', 'fsm-node-controller'), 'spec', 'selector', 'matchLabels'), 'fsm-system')).toEqual(['fsm-node-controller']);
    expect(podsOf(at(find(docs, 'PodMonitor', 'fsm-node-agent'), 'spec', 'selector', 'matchLabels'), 'fsm-system')).toEqual(['fsm-node-agent']);
    expect(matches(at(find(docs, 'ServiceMonitor', 'fsm-node-controller'), 'spec', 'selector', 'matchLabels'), find(docs, 'Service', 'fsm-node-controller').metadata.labels)).toBe(true);
    expect(at(find(docs, 'ServiceMonitor', 'fsm-node-controller'), 'spec', 'endpoints', 0, 'port')).toBe('policy');
    expect(at(find(docs, 'PodMonitor', 'fsm-node-agent'), 'spec', 'podMetricsEndpoints', 0, 'port')).toBe('api');
    // Example app: each Service selects pods of the overlay.
    for (const svc of docs.filter((o) => o.kind === 'Service' && o.metadata.name.startsWith('echo'))) expect(podsOf(at(svc, 'spec', 'selector'), undefined).length).toBeGreaterThan(0);
  });
});

describe('prepare-node (the agent init container)', () => {
  const script = () => scriptOf(container(agentDs(), 'prepare-node'));
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'fsmt-deploy-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));
  const run = (cgroupDirs: string[], extra: Record<string, string> = {}, mounts?: string) => {
    const cg = join(dir, 'cgroup');
    for (const d of cgroupDirs) mkdirSync(join(cg, d), { recursive: true });
    writeFileSync(join(dir, 'mounts'), mounts ?? `cgroup2 ${cg} cgroup2 rw 0 0\nbpf ${join(dir, 'bpf')} bpf rw 0 0\n`);
    const r = runScript(script(), { MOUNTS: join(dir, 'mounts'), BPFFS: join(dir, 'bpf'), SITE: join(dir, 'site.yaml'), ...extra });
    const site = r.status === 0 ? readFileSync(join(dir, 'site.yaml'), 'utf8') : '';
    return { ...r, cg, site };
  };

  test('finds kubelet systemd-driver pods (kubepods.slice) before cgroupfs ones (kubepods) and creates the proxy cgroup', () => {
    const r = run(['kubepods.slice', 'kubepods']);
    expect(r.site).toBe(`podsCgroup: ${r.cg}/kubepods.slice\nproxyCgroup: ${r.cg}/fsm-node-proxy\n`);
    expect(existsSync(join(r.cg, 'fsm-node-proxy'))).toBe(true);
  });

  test('finds cgroupfs-driver pods (k3s without systemd)', () => {
    expect(run(['kubepods']).site).toContain(`podsCgroup: ${join(dir, 'cgroup')}/kubepods\n`);
  });

  test('an explicit FSMN_PODS_CGROUP wins', () => {
    const r = run(['kubepods.slice', 'custom'], { FSMN_PODS_CGROUP: join(dir, 'cgroup', 'custom') });
    expect(r.site).toContain(`podsCgroup: ${r.cg}/custom\n`);
  });

  test('caps the proxy cgroup memory when the memory controller is there', () => {
    const memoryMax = join(dir, 'cgroup', 'fsm-node-proxy', 'memory.max');
    mkdirSync(join(dir, 'cgroup', 'fsm-node-proxy'), { recursive: true });
    writeFileSync(memoryMax, 'max\n');
    expect(run(['kubepods']).status).toBe(0);
    expect(readFileSync(memoryMax, 'utf8')).toBe('max\n');
    expect(run(['kubepods'], { PROXY_MEMORY_MAX: '256M' }).status).toBe(0);
    expect(readFileSync(memoryMax, 'utf8')).toBe('256M\n');
  });

  test('fails with a reason when there is no pods cgroup or no cgroup v2', () => {
    const none = run(['system.slice']);
    expect(none.status).toBe(1);
    expect(none.stderr).toMatch(/no pods cgroup under .*set FSMN_PODS_CGROUP/);
    const v1 = run([], {}, `cgroup ${dir}/cpu cgroup rw,cpu 0 0\nbpf ${join(dir, 'bpf')} bpf rw 0 0\n`);
    expect(v1.status).toBe(1);
    expect(v1.stderr).toMatch(/needs cgroup v2/);
  });
});

describe('uninstall', () => {
  const ds = () => find(loadDir(join(deployDir, 'overlays', 'uninstall')), 'DaemonSet', 'fsm-node-cleanup');

  test('the cleanup runs fsm-node cleanup with the agent paths, on every node, with the agent privileges', () => {
    const c = container(ds(), 'cleanup');
    const script = scriptOf(c);
    const line = script.split('\n').find((l) => l.trim().startsWith('fsm-node cleanup'))!;
    const args = line.trim().split(/\s+/).slice(2).map((a) => a.replace(/^"|"$/g, ''));
    const { values } = parseCommandArgs(cleanupCommand, args);
    expect(values['bpffs-dir']).toBe(agentDefaults.bpffsDir);
    expect(values['state-dir']).toBe(agentDefaults.stateDir);
    expect(values['proxy-cgroup']).toBe('$proxy');
    expect(script).toContain('proxy="${root:-/sys/fs/cgroup}/fsm-node-proxy"');
    expect(scriptOf(container(agentDs(), 'prepare-node'))).toContain('proxy="$root/fsm-node-proxy"');
    // It refuses while an agent answers on the agent's API port.
    expect(script).toContain(`http://127.0.0.1:${agentDefaults.listen!.split(':').pop()}/healthz`);
    const spec = podSpec(ds());
    const agentSpec = podSpec(agentDs());
    for (const k of ['hostNetwork', 'hostPID', 'tolerations', 'nodeSelector', 'affinity', 'priorityClassName']) expect({ k, v: spec[k] }).toEqual({ k, v: agentSpec[k] });
    const hostPaths = (s: Record<string, unknown>) => at<Array<{ hostPath?: { path: string } }>>(s, 'volumes').flatMap((v) => (v.hostPath ? [v.hostPath.path] : [])).sort();
    expect(hostPaths(spec)).toEqual(hostPaths(agentSpec));
    expect(c.securityContext).toEqual({ privileged: true });
  });

  test('its namespace is the base namespace', () => {
    expect(readFileSync(join(deployDir, 'overlays', 'uninstall', 'namespace.yaml'), 'utf8')).toBe(readFileSync(join(deployDir, 'base', 'namespace.yaml'), 'utf8'));
  });
});

// ---- mesh config, example app, RBAC, dashboard -----------------------------------------

describe('mesh configuration and example app', () => {
  test('the mesh ConfigMap is the one the controller reads, and it accepts every key', () => {
    const cm = find(base(), 'ConfigMap', MESH_CONFIG_NAME);
    expect(cm.metadata.namespace).toBe(DEFAULT_CONTROLLER_NAMESPACE);
    const mesh = toRecord('ConfigMap', cm).settings;
    expect(mesh).toMatchObject({ name: 'fsm', interceptionMode: 'auto', trafficPolicy: 'permissive', inbound: 'permissive', egress: 'allow' });
  });

  test('the example namespace is monitored by this mesh, and its SMI objects name what exists', () => {
    const docs = loadDir(join(deployDir, 'overlays', 'example-app')).map((d) => d.obj);
    const meshName = at<string>(find(base(), 'ConfigMap', MESH_CONFIG_NAME), 'data', 'meshName');
    expect(find(docs, 'Namespace', 'fsm-demo').metadata.labels?.[LABEL_MONITORED_BY]).toBe(meshName);
    const names = (kind: string) => new Set(docs.filter((o) => o.kind === kind).map((o) => o.metadata.name));
    const split = find(docs, 'TrafficSplit', 'echo');
    expect(names('Service').has(at(split, 'spec', 'service'))).toBe(true);
    for (const b of at<Array<{ service: string }>>(split, 'spec', 'backends')) expect(names('Service').has(b.service)).toBe(true);
    const routes = docs.filter((o) => o.kind === 'HTTPRouteGroup');
    for (const tt of docs.filter((o) => o.kind === 'TrafficTarget')) {
      expect(names('ServiceAccount').has(at(tt, 'spec', 'destination', 'name'))).toBe(true);
      for (const s of at<Array<{ name: string }>>(tt, 'spec', 'sources')) expect(names('ServiceAccount').has(s.name)).toBe(true);
      for (const r of at<Array<{ name: string; matches: string[] }>>(tt, 'spec', 'rules')) {
        const group = routes.find((g) => g.metadata.name === r.name);
        expect(group).toBeDefined();
        for (const m of r.matches) expect(at<Array<{ name: string }>>(group, 'spec', 'matches').map((x) => x.name)).toContain(m);
      }
    }
    // The destination port is the port the echo pods listen on.
    const ports = docs.filter((o) => o.kind === 'Deployment' && o.metadata.name.startsWith('echo')).map((o) => container(o, 'echo').ports![0]!.containerPort);
    for (const tt of docs.filter((o) => o.kind === 'TrafficTarget')) expect(ports).toContain(at(tt, 'spec', 'destination', 'port'));
  });
});

describe('RBAC', () => {
  const rbac = () => base().map((d) => d.obj);
  const rulesFor = (sa: string): Array<{ rule: PolicyRule; namespace?: string }> => {
    const docs = rbac();
    const subjectIs = (b: K8sObject) => at<Array<{ kind: string; name: string; namespace: string }>>(b, 'subjects').some((s) => s.kind === 'ServiceAccount' && `${s.namespace}:${s.name}` === sa);
    const out: Array<{ rule: PolicyRule; namespace?: string }> = [];
    for (const b of docs.filter((o) => o.kind === 'ClusterRoleBinding' && subjectIs(o))) out.push(...at<PolicyRule[]>(find(docs, 'ClusterRole', at(b, 'roleRef', 'name')), 'rules').map((rule) => ({ rule })));
    for (const b of docs.filter((o) => o.kind === 'RoleBinding' && subjectIs(o))) {
      out.push(...at<PolicyRule[]>(find(docs, 'Role', at(b, 'roleRef', 'name')), 'rules').map((rule) => ({ rule, namespace: b.metadata.namespace })));
    }
    return out;
  };
  const allowed = (rules: ReturnType<typeof rulesFor>, r: ApiRequest) => rules.some(({ rule, namespace }) => (namespace === undefined || namespace === r.namespace) && ruleAllows(rule, r));

  test('no wildcards; the agent has no role at all', () => {
    for (const o of rbac().filter((x) => x.kind === 'ClusterRole' || x.kind === 'Role')) {
      expect({ role: o.metadata.name, wild: JSON.stringify(o.rules).includes('"*"') }).toEqual({ role: o.metadata.name, wild: false });
    }
    expect(rulesFor(DEFAULT_AGENT_SERVICE_ACCOUNT)).toEqual([]);
  });

  test('the controller may make every API request it makes against a cluster, and nothing it never makes', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmt-deploy-rbac-'));
    const api = await TestApiServer.start();
    let ctrl: Awaited<ReturnType<typeof runController>> | undefined;
    try {
      for (const o of baseMesh()) api.create(o as ApiObj);
      // One object the controller reports with a Warning Event.
      api.create({ apiVersion: 'split.smi-spec.io/v1alpha2', kind: 'TrafficSplit', metadata: { name: 'bad', namespace: 'app' }, spec: { service: 'web', backends: [{ service: 'db', weight: 0 }] } } as ApiObj);
      // The resilience policies (src/policy/resilience.ts): the controller lists and watches them too.
      api.create({ apiVersion: 'policy.flomesh.io/v1alpha1', kind: 'Retry', metadata: { name: 'r', namespace: 'app' }, spec: { source: { kind: 'ServiceAccount', name: 'web' }, destinations: [{ kind: 'Service', name: 'db' }], retryPolicy: { retryOn: '5xx' } } } as ApiObj);
      api.create({ apiVersion: 'policy.flomesh.io/v1alpha1', kind: 'UpstreamTrafficSetting', metadata: { name: 'u', namespace: 'app' }, spec: { host: 'db' } } as ApiObj);
      api.create(pod('agent-b', { ns: 'fsm-system', node: 'node-b', uid: 'agent-b-uid' }) as ApiObj);
      api.tokens.set('sa-token-b', { username: `system:serviceaccount:${DEFAULT_AGENT_SERVICE_ACCOUNT}`, extra: { 'authentication.kubernetes.io/pod-name': ['agent-b'], 'authentication.kubernetes.io/pod-uid': ['agent-b-uid'] } });
      const kubeconfig = join(dir, 'kubeconfig');
      writeFileSync(kubeconfig, api.kubeConfig().exportConfig());
      ctrl = await runController({ kubeconfig, listen: '127.0.0.1:0' });
      // One agent fetching its policy: TokenReview, then the pod the token is bound to.
      writeFileSync(join(dir, 'token'), 'sa-token-b\n');
      const client = new PolicyClient({ url: ctrl.url, node: 'node-b', ca: ctrl.caCert, tokenFile: join(dir, 'token'), stateDir: dir, backoff: { initialMs: 20, maxMs: 100 } });
      const got = new Promise((resolve) => client.on('policy', resolve));
      client.start();
      await got;
      await client.stop();
      await eventually(async () => api.requests.some((r) => r.path.endsWith('/events')), (v) => v, 10_000);
    } finally {
      await ctrl?.close();
      await api.close();
      rmSync(dir, { recursive: true, force: true });
    }
    const rules = rulesFor(`${DEFAULT_CONTROLLER_NAMESPACE}:fsm-node-controller`);
    const made = api.requests.map((r) => requestInfo(r.method, r.path, r.query)).filter((r): r is ApiRequest => r !== undefined);
    const refused = made.filter((r) => !allowed(rules, r));
    expect(refused).toEqual([]);
    // Every granted verb is used, except those only a rare path takes.
    const used = new Set(made.map((r) => `${r.group}/${r.resource}:${r.verb}`));
    const rare = new Set([
      '/pods:get', // a token whose pod the informer has not seen yet
      '/configmaps:update', // the CA changed (renewal)
      '/secrets:update', // the serving certificate is renewed
      '/secrets:get', // a restart: the Secret exists already (here it is created)
      // Only with --ca-signer-name (an external CA); test/unit/identity-providers.test.ts runs that path.
      'certificates.k8s.io/certificatesigningrequests:create',
      'certificates.k8s.io/certificatesigningrequests:get',
      'certificates.k8s.io/certificatesigningrequests:delete',
      // Gateway API status: only when Gateways of our class exist (test/unit/gateway-status.test.ts).
      'gateway.networking.k8s.io/gatewayclasses/status:patch',
      'gateway.networking.k8s.io/gateways/status:patch',
      'gateway.networking.k8s.io/httproutes/status:patch',
      // Only a clusterset member (--clusterset) in Kubernetes mode; test/unit/multicluster-kubernetes.test.ts runs that path.
      'multicluster.x-k8s.io/serviceexports:list',
      'multicluster.x-k8s.io/serviceexports:watch',
      'multicluster.x-k8s.io/serviceexports/status:update',
      'multicluster.x-k8s.io/serviceimports:list',
      'multicluster.x-k8s.io/serviceimports:create',
      'multicluster.x-k8s.io/serviceimports:update',
      'multicluster.x-k8s.io/serviceimports:delete',
      'multicluster.fsm-node.io/globaltrafficpolicies:list',
      'multicluster.fsm-node.io/globaltrafficpolicies:watch',
    ]);
    const granted = rules.flatMap(({ rule }) => (rule.apiGroups ?? []).flatMap((g) => (rule.resources ?? []).flatMap((res) => rule.verbs.map((v) => `${g}/${res}:${v}`))));
    expect([...new Set(granted)].filter((g) => !used.has(g) && !rare.has(g)).sort()).toEqual([]);
  });

  test('`fsm-node mode set` needs what the operator role grants, and the controller may not do it', async () => {
    const api = await TestApiServer.start();
    const dir = mkdtempSync(join(tmpdir(), 'fsmt-deploy-rbac-'));
    const stderr = process.stderr.write;
    try {
      const kubeconfig = join(dir, 'kubeconfig');
      writeFileSync(kubeconfig, api.kubeConfig().exportConfig());
      process.stderr.write = () => true;
      await main(['mode', 'set', 'ebpf', '--node', 'node-a', '--kubeconfig', kubeconfig]);
    } finally {
      process.stderr.write = stderr;
      await api.close();
      rmSync(dir, { recursive: true, force: true });
    }
    const made = api.requests.map((r) => requestInfo(r.method, r.path, r.query)!);
    expect(made).toEqual([{ verb: 'patch', group: '', resource: 'nodes', namespace: '', name: 'node-a' }]);
    const operator = at<PolicyRule[]>(find(rbac(), 'ClusterRole', 'fsm-node-mode-operator'), 'rules');
    expect(operator.some((r) => ruleAllows(r, made[0]!))).toBe(true);
    expect(allowed(rulesFor(`${DEFAULT_CONTROLLER_NAMESPACE}:fsm-node-controller`), made[0]!)).toBe(false);
    expect(readFileSync(join(root, 'docs', 'deploy.md'), 'utf8')).toContain(`kubectl label node NODE ${modeLabel}=ebpf --overwrite`);
  });

  test('the controller keeps its certificate in the Secret the Role names', () => {
    const store = new SecretCertStore({} as never, DEFAULT_CONTROLLER_NAMESPACE);
    const role = at<PolicyRule[]>(find(rbac(), 'Role', 'fsm-node-controller'), 'rules');
    const secretRule = role.find((r) => r.resources?.includes('secrets') && r.resourceNames);
    expect(store.description).toBe(`Secret ${DEFAULT_CONTROLLER_NAMESPACE}/${secretRule!.resourceNames![0]}`);
  });
});

describe('Grafana dashboard', () => {
  const dashboard = () => JSON.parse(readFileSync(join(deployDir, 'overlays', 'prometheus', 'dashboards', 'fsm-node.json'), 'utf8')) as { uid: string; panels: Array<{ type: string; targets?: Array<{ expr: string }> }>; templating: { list: Array<{ query?: unknown }> } };

  test('queries only metrics the agent and controller export', () => {
    const names = new Set<string>();
    const add = (metrics: Array<{ name: string; type?: unknown }>) => {
      for (const m of metrics) {
        names.add(m.name);
        for (const suffix of ['_bucket', '_sum', '_count']) names.add(m.name + suffix);
      }
    };
    add(agentMetrics(idle).registry.getMetricsAsArray());
    // The node proxy's metrics, re-exported on the agent's /metrics under fixed names (src/proxy/metrics.ts).
    add(Object.values(PIPY_BUILTINS));
    const compiler = new PolicyCompiler({ controllerNamespace: DEFAULT_CONTROLLER_NAMESPACE });
    add(controllerMetrics(compiler, new PolicyHub((node) => compiler.get(node))).registry.getMetricsAsArray());
    const d = dashboard();
    const exprs = [...d.panels.flatMap((p) => (p.targets ?? []).map((t) => t.expr)), ...d.templating.list.map((v) => JSON.stringify(v.query ?? ''))];
    const used = new Set(exprs.flatMap((e) => e.match(/\bfsm_node_[a-z0-9_]+/g) ?? []));
    expect(used.size).toBeGreaterThan(10);
    expect([...used].filter((n) => !names.has(n))).toEqual([]);
    // Every agent metric the agent sets itself has a panel.
    const own = agentMetrics(idle).registry.getMetricsAsArray().map((m) => m.name).filter((n) => !n.startsWith('fsm_node_process_'));
    expect(own.filter((n) => ![...used].some((u) => u.startsWith(n)))).toEqual([]);
  });

  test('groups by the node label the PodMonitor sets', () => {
    const pm = find(loadDir(join(deployDir, 'overlays', 'prometheus')), 'PodMonitor', 'fsm-node-agent');
    expect(at(pm, 'spec', 'podMetricsEndpoints', 0, 'relabelings')).toEqual([{ sourceLabels: ['__meta_kubernetes_pod_node_name'], targetLabel: 'node' }]);
    expect(JSON.stringify(dashboard())).toContain('node=~\\"$node\\"');
  });
});
