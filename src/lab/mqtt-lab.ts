import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { manifestUid } from '../policy/objects.js';
import { MQTT_ROUTE_GROUP_API_VERSION } from '../policy/mqtt.js';
import { packageRoot } from '../util/paths.js';
import type { CheckCase } from './check.js';
import type { Step } from './mqtt-client.js';
import { runInside } from './processes.js';
import { startDetached } from './processes.js';
import { labFiles, type LabPod, type LabProcess, type LabState } from './state.js';

/**
 * The lab's MQTT example (docs/mqtt.md): Debian's mosquitto runs in the
 * first pod (the broker pod, as a second container of it would), behind the
 * service `broker` (10.96.0.20:1883, port name `mqtt`). Every other pod is a
 * device: MQTTRouteGroup `lab-devices` lets it publish only under
 * devices/<its service account>/ (the identity the mesh proves, not a client
 * id it could choose) and subscribe to devices/#. `lab check` then proves an
 * allowed publish reaching a subscriber on another node, and a denied publish
 * and subscribe refused with MQTT 5's "not authorized".
 */

export const MQTT_PORT = 1883;
export const BROKER_SERVICE = { name: 'broker', clusterIP: '10.96.0.20' } as const;
const NAMESPACE = 'demo';

interface Pod {
  name: string;
  node: string;
  ip: string;
}

/** The broker pod: the first pod (it also serves the echo like every pod). */
export function brokerPod<P extends Pod>(pods: readonly P[]): P | undefined {
  return pods[0];
}

/** Service, EndpointSlice, MQTTRouteGroup and TrafficTarget of the example; none without at least two pods. */
export function mqttLabObjects(pods: readonly Pod[]): unknown[] {
  const broker = brokerPod(pods);
  const devices = pods.filter((p) => p !== broker);
  if (!broker || devices.length === 0) return [];
  return [
    {
      apiVersion: 'v1',
      kind: 'Service',
      metadata: { name: BROKER_SERVICE.name, namespace: NAMESPACE },
      // No selector: the EndpointSlice below names the broker pod (the lab's pods all carry app=echo).
      spec: { clusterIP: BROKER_SERVICE.clusterIP, ports: [{ name: 'mqtt', port: MQTT_PORT, targetPort: MQTT_PORT }] },
    },
    {
      apiVersion: 'discovery.k8s.io/v1',
      kind: 'EndpointSlice',
      metadata: { name: `${BROKER_SERVICE.name}-lab`, namespace: NAMESPACE, labels: { 'kubernetes.io/service-name': BROKER_SERVICE.name } },
      addressType: 'IPv4',
      ports: [{ name: 'mqtt', port: MQTT_PORT, protocol: 'TCP' }],
      endpoints: [{ addresses: [broker.ip], conditions: { ready: true }, nodeName: broker.node, targetRef: { kind: 'Pod', name: broker.name, namespace: NAMESPACE, uid: manifestUid(NAMESPACE, broker.name) } }],
    },
    {
      apiVersion: MQTT_ROUTE_GROUP_API_VERSION,
      kind: 'MQTTRouteGroup',
      metadata: { name: 'lab-devices', namespace: NAMESPACE },
      spec: { matches: [{ name: 'own-prefix', publish: ['devices/{serviceAccount}/#'], subscribe: ['devices/#'] }] },
    },
    {
      apiVersion: 'access.smi-spec.io/v1alpha3',
      kind: 'TrafficTarget',
      metadata: { name: `to-${broker.name}-mqtt`, namespace: NAMESPACE },
      spec: {
        destination: { kind: 'ServiceAccount', name: broker.name, namespace: NAMESPACE, port: MQTT_PORT },
        sources: devices.map((d) => ({ kind: 'ServiceAccount', name: d.name, namespace: NAMESPACE })),
        rules: [{ kind: 'MQTTRouteGroup', name: 'lab-devices' }],
      },
    },
  ];
}

/** Start mosquitto in the broker pod; resolves when it listens. */
export async function startLabBroker(state: LabState): Promise<LabProcess | undefined> {
  const pod = brokerPod(state.pods);
  if (!pod) return undefined;
  const f = labFiles(state.dir);
  const conf = join(f.logs, 'mosquitto.conf');
  writeFileSync(conf, `listener ${MQTT_PORT} 0.0.0.0\nallow_anonymous true\npersistence false\nlog_dest stderr\n`);
  const log = join(f.logs, `pod-${pod.name}-mosquitto.log`);
  const proc = startDetached(pod.cgroupPath, pod.netns, ['mosquitto', '-c', conf], log);
  const deadline = Date.now() + 10_000;
  while (!readFileSync(log, 'utf8').includes(' running')) {
    if (Date.now() > deadline) throw new Error(`mosquitto in pod ${pod.name} did not start: ${readFileSync(log, 'utf8').slice(-300)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return proc;
}

async function mqttFrom(pod: LabPod, steps: Step[]): Promise<unknown[] | string> {
  const script = join(packageRoot(), 'dist', 'src', 'lab', 'mqtt-client.js');
  const r = await runInside(pod.cgroupPath, pod.netns, [process.execPath, script, 'scenario', BROKER_SERVICE.clusterIP, String(MQTT_PORT), JSON.stringify({ version: 5, steps })], 20_000);
  try {
    const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as unknown;
    return Array.isArray(out) ? out : JSON.stringify(out);
  } catch {
    return `client exited ${r.code}: ${(r.stderr || r.stdout).trim().slice(0, 300)}`;
  }
}

const NOT_AUTHORIZED = 0x87;

function declaresExample(dir: string): boolean {
  const files = readdirSync(dir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && /\.ya?ml$/.test(e.name));
  return files.some((e) =>
    parseAllDocuments(readFileSync(join(e.parentPath, e.name), 'utf8')).some((d) => {
      const o = d.toJS() as { kind?: unknown; metadata?: { name?: unknown } } | null;
      return o?.kind === 'MQTTRouteGroup' && o.metadata?.name === 'lab-devices';
    }),
  );
}

/** The MQTT cases of `lab check` (Pipy only: the passthrough proxy reads no MQTT). */
export async function mqttCases(state: LabState): Promise<CheckCase[]> {
  const broker = brokerPod(state.pods);
  const devices = state.pods.filter((p) => p !== broker);
  if (!broker || devices.length === 0) return [];
  if (state.proxy === 'passthrough') {
    return [{ name: 'mqtt: topic access control', kind: 'mqtt', from: '*', to: broker.name, result: 'skip', reason: 'needs the Pipy proxy (passthrough reads no MQTT)' }];
  }
  // Judged against what the manifests say now: without the example (70-mqtt.yaml removed or edited away) there is nothing to expect.
  if (!declaresExample(labFiles(state.dir).manifests)) {
    return [{ name: 'mqtt: topic access control', kind: 'mqtt', from: '*', to: broker.name, result: 'skip', reason: 'the manifests no longer hold the MQTT example (MQTTRouteGroup lab-devices)' }];
  }
  // A publisher on the broker's node, a subscriber on another node when there is one.
  const publisher = devices.find((p) => p.node === broker.node) ?? devices[0]!;
  const subscriber = devices.find((p) => p.node !== publisher.node) ?? devices.find((p) => p !== publisher) ?? publisher;
  const topic = `devices/${publisher.name}/temperature`;
  const cases: CheckCase[] = [];

  const sub = mqttFrom(subscriber, [
    { op: 'connect', clientId: `lab-${subscriber.name}-sub` },
    { op: 'subscribe', filters: [{ filter: 'devices/#', qos: 1 }] },
    { op: 'message', topic, timeoutMs: 10_000 },
  ]);
  await new Promise((r) => setTimeout(r, 1500));
  const pub = await mqttFrom(publisher, [{ op: 'connect', clientId: `lab-${publisher.name}` }, { op: 'publish', topic, payload: '21.5', qos: 1 }]);
  const got = await sub;
  const delivered = Array.isArray(got) && (got[2] as { payload?: string } | null)?.payload === '21.5';
  cases.push({
    name: `mqtt: ${publisher.name} publishes ${topic}, ${subscriber.name} (${subscriber.node}) receives it`,
    kind: 'mqtt',
    from: publisher.name,
    to: broker.name,
    result: delivered && Array.isArray(pub) && pub[0] === 0 ? 'pass' : 'fail',
    reason: `publisher ${JSON.stringify(pub)}; subscriber ${JSON.stringify(got)}`,
  });

  const spoof = `devices/${publisher.name}/spoofed`;
  const denied = await mqttFrom(subscriber, [{ op: 'connect', clientId: `lab-${subscriber.name}` }, { op: 'publish', topic: spoof, payload: 'x', qos: 1 }]);
  cases.push({
    name: `mqtt: ${subscriber.name} may not publish under ${publisher.name}'s prefix (${spoof})`,
    kind: 'mqtt',
    from: subscriber.name,
    to: broker.name,
    result: Array.isArray(denied) && denied[0] === 0 && denied[1] === NOT_AUTHORIZED ? 'pass' : 'fail',
    reason: `CONNACK, PUBACK: ${JSON.stringify(denied)} (expected [0, ${NOT_AUTHORIZED}]: not authorized)`,
  });

  const subs = await mqttFrom(publisher, [{ op: 'connect', clientId: `lab-${publisher.name}-s` }, { op: 'subscribe', filters: [{ filter: '$SYS/#', qos: 0 }, { filter: 'devices/#', qos: 1 }] }]);
  cases.push({
    name: `mqtt: ${publisher.name} subscribes $SYS/# (denied) and devices/# (allowed) in one SUBSCRIBE`,
    kind: 'mqtt',
    from: publisher.name,
    to: broker.name,
    result: Array.isArray(subs) && JSON.stringify(subs[1]) === JSON.stringify([NOT_AUTHORIZED, 1]) ? 'pass' : 'fail',
    reason: `SUBACK ${JSON.stringify(Array.isArray(subs) ? subs[1] : subs)} (expected [${NOT_AUTHORIZED}, 1])`,
  });
  return cases;
}
