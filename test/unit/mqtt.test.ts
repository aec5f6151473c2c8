import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import yaml from 'yaml';
import { MQTT_ROUTE_GROUP_API_VERSION, parseMqttRouteGroup, topicFilterProblem } from '../../src/policy/mqtt.js';
import { toRecord } from '../../src/policy/objects.js';
import { portProtocol, renderProxyConfig } from '../../src/proxy/config.js';
import { FLEET_COLLECTOR, FLEET_DEVICES } from '../support/mqtt-fleet.js';
import { COVER_CASES, MATCH_CASES } from '../support/mqtt-topic-cases.js';
import { baseMesh, compiled, meshConfig, service, slice, target, type Obj } from './policy-fixtures.js';

/**
 * MQTT: topic matching (the very module the proxy runs, proxy/mqtt-topic.js,
 * imported here under Node), the MQTTRouteGroup parser, its CRD, and the way
 * from a TrafficTarget to the proxy's config.
 */

interface TopicModule {
  levels(s: string): string[];
  validTopicName(s: string): boolean;
  validFilter(s: string): boolean;
  effectiveFilter(s: string): string | null;
  topicMatches(filter: string[], topic: string): boolean;
  filterCovers(allowed: string[], sub: string[]): boolean;
  substitute(filter: string[], values: Record<string, string>): string[] | null;
  foldTopic(topic: string, n: number): string;
}
const topics = (await import(fileURLToPath(new URL('../../proxy/mqtt-topic.js', import.meta.url)))) as TopicModule;
const matches = (filter: string, topic: string) => topics.topicMatches(topics.levels(filter), topic);
const covers = (allowed: string, sub: string) => topics.filterCovers(topics.levels(allowed), topics.levels(sub));

describe('topic filters match topic names as MQTT 3.1.1/5 section 4.7 says', () => {
  test.each(MATCH_CASES)('%s ~ %s: %s', (filter, topic, expected) => {
    expect(matches(filter, topic)).toBe(expected);
  });
});

describe('a SUBSCRIBE filter is allowed only when an allowed filter covers every topic it can match', () => {
  test.each(COVER_CASES)('allowed %s covers %s: %s', (allowed, sub, expected) => {
    expect(covers(allowed, sub)).toBe(expected);
  });

  test('shared subscriptions are judged by the filter they share', () => {
    expect(topics.effectiveFilter('$share/g1/public/#')).toBe('public/#');
    expect(topics.effectiveFilter('public/#')).toBe('public/#');
    expect(topics.effectiveFilter('$share/g+/x')).toBeNull();
    expect(topics.effectiveFilter('$share/x')).toBeNull();
    expect(topics.effectiveFilter('$share//x')).toBeNull();
  });

  test('syntax: wildcards only as whole levels, # last, no NUL, not empty', () => {
    for (const ok of ['a', 'a/b', '+', '#', 'a/+/b', 'a/#', '/', '+/+', '$SYS/#']) expect([ok, topics.validFilter(ok)]).toEqual([ok, true]);
    for (const bad of ['', 'a/#/b', 'a#', 'a/b+', '#/a', 'a\u0000b', 'sport+']) expect([bad, topics.validFilter(bad)]).toEqual([bad, false]);
    for (const bad of ['', 'a/+', 'a/#', 'x\u0000']) expect([bad, topics.validTopicName(bad)]).toEqual([bad, false]);
    expect(topics.validTopicName('a/b c/$d')).toBe(true);
  });
});

describe('placeholders and metric folding', () => {
  const values = { '{clientId}': 'sensor-7', '{serviceAccount}': 'device' };
  test('a whole-level placeholder takes the connection value', () => {
    expect(topics.substitute(topics.levels('devices/{clientId}/#'), values)).toEqual(['devices', 'sensor-7', '#']);
    expect(topics.substitute(topics.levels('sa/{serviceAccount}/+'), values)).toEqual(['sa', 'device', '+']);
  });
  test('a client id that could widen the filter makes it grant nothing', () => {
    for (const bad of ['#', '+', 'a/b', '', 'x\u0000']) expect(topics.substitute(topics.levels('devices/{clientId}/#'), { ...values, '{clientId}': bad })).toBeNull();
  });
  test('topics fold to the configured number of levels', () => {
    expect(topics.foldTopic('devices/d17/temp', 2)).toBe('devices/d17/#');
    expect(topics.foldTopic('devices/d17', 2)).toBe('devices/d17');
    expect(topics.foldTopic('a/b/c', 0)).toBe('#');
    expect(topics.foldTopic('a/b/c', 1)).toBe('a/#');
  });
});

const group = (matches: unknown[], name = 'fleet', ns = 'app'): Obj => ({ apiVersion: MQTT_ROUTE_GROUP_API_VERSION, kind: 'MQTTRouteGroup', metadata: { name, namespace: ns }, spec: { matches } });

describe('MQTTRouteGroup', () => {
  test('parses named matches', () => {
    expect(parseMqttRouteGroup(group([{ name: 'devices', clientId: 'sensor-[0-9]+', publish: ['devices/{clientId}/#'] }, { name: 'collector', subscribe: ['devices/#'] }]))).toEqual({
      namespace: 'app',
      name: 'fleet',
      matches: [
        { name: 'devices', clientId: 'sensor-[0-9]+', publish: ['devices/{clientId}/#'], subscribe: [] },
        { name: 'collector', clientId: null, publish: [], subscribe: ['devices/#'] },
      ],
    });
  });

  test.each([
    [[{ name: 'a', publish: ['a/#/b'] }], 'spec.matches[0].publish[0]', "'#' must be the last level"],
    [[{ name: 'a', subscribe: ['ok', 'x+'] }], 'spec.matches[0].subscribe[1]', "'+' must be a whole level"],
    [[{ name: 'a', publish: ['devices/{client}/#'] }], 'spec.matches[0].publish[0]', 'placeholder'],
    [[{ name: 'a', publish: [''] }], 'spec.matches[0].publish[0]', 'is empty'],
    [[{ name: 'a', clientId: '(' }], 'spec.matches[0].clientId', 'not a regular expression'],
    [[{ name: 'a' }, { name: 'a' }], 'spec.matches[1].name', 'duplicate match name'],
    [[{ name: 'a', topics: ['x'] }], 'spec.matches[0]', 'Unrecognized key'],
    [[], 'spec.matches', 'at least 1'],
  ])('refuses %j naming %s', (m, field, why) => {
    let err: unknown;
    try {
      parseMqttRouteGroup(group(m as unknown[]));
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ field });
    expect((err as Error).message).toContain(why);
  });

  test('topicFilterProblem agrees with the proxy on what a filter is (placeholders aside)', () => {
    for (const f of ['a', 'a/+/b', '#', 'a/#', '+', '/', '$SYS/#', 'a/#/b', 'a#', 'b+/c', '', 'x\u0000']) {
      expect([f, topicFilterProblem(f) === null]).toEqual([f, topics.validFilter(f)]);
    }
  });

  test('the CRD accepts what the controller accepts, and refuses what it refuses', () => {
    const crdFile = fileURLToPath(new URL('../../daemonset/crds/mqttroutegroups.specs.fsm-node.io.yaml', import.meta.url));
    const crd = yaml.parse(readFileSync(crdFile, 'utf8')) as { spec: { group: string; versions: { name: string; schema: { openAPIV3Schema: object } }[] } };
    expect(`${crd.spec.group}/${crd.spec.versions[0]!.name}`).toBe(MQTT_ROUTE_GROUP_API_VERSION);
    const validate = new Ajv({ strict: false }).compile(crd.spec.versions[0]!.schema.openAPIV3Schema);
    const good = group([{ name: 'devices', clientId: 'sensor-.*', publish: ['devices/{clientId}/#'], subscribe: ['commands/{clientId}/+'] }]);
    expect(validate(good)).toBe(true);
    expect(() => toRecord('MQTTRouteGroup', good)).not.toThrow();
    // (An unknown key is pruned by the API server, structural schemas do; the controller's parser refuses it above.)
    for (const bad of [group([]), group([{ publish: ['x'] }]), group([{ name: 'a', publish: [''] }])]) {
      expect(validate(bad)).toBe(false);
      expect(() => toRecord('MQTTRouteGroup', bad)).toThrow();
    }
  });
});

describe('from TrafficTarget to the proxy config', () => {
  // The fixture's slices name their port 'http': appProtocol says MQTT.
  const brokerPorts = [{ name: 'http', port: 1883, targetPort: 1883, appProtocol: 'mqtt' }];
  const mesh = (): Obj[] => [
    ...baseMesh(),
    meshConfig({ trafficPolicy: 'smi', mqttTopicLevels: '3' }),
    service('db', { clusterIP: '172.16.0.2', ports: brokerPorts }),
    slice('db', [{ ip: '10.0.0.2', pod: 'db-1' }], { port: 1883, name: 'db-1883' }),
    group([{ name: 'devices', clientId: 'sensor-.*', publish: ['devices/{clientId}/#'] }, { name: 'collector', subscribe: ['devices/#'] }]),
    target('fleet', 'db', ['web'], [{ kind: 'MQTTRouteGroup', name: 'fleet', matches: ['devices'] }]),
  ];

  test('port protocol: appProtocol mqtt or a name mqtt / mqtt-*; mqtts stays TCP', () => {
    expect(portProtocol({ name: 'broker', appProtocol: 'mqtt' })).toBe('mqtt');
    expect(portProtocol({ name: 'mqtt', appProtocol: null })).toBe('mqtt');
    expect(portProtocol({ name: 'mqtt-ws', appProtocol: null })).toBe('mqtt');
    expect(portProtocol({ name: 'mqtts', appProtocol: null })).toBe('tcp');
    expect(portProtocol({ name: 'mqtt', appProtocol: 'tcp' })).toBe('tcp');
  });

  test('the rule carries the named matches, the endpoint port is mqtt, the settings come from the mesh config', () => {
    const c = compiled(mesh());
    expect(c.reporter.active()).toEqual([]);
    const policy = c.get('node-a')!.policy;
    expect(policy.access.find((a) => a.name === 'fleet')!.rules).toEqual([{ kind: 'MQTTRouteGroup', name: 'fleet', matches: [{ name: 'devices', clientId: 'sensor-.*', publish: ['devices/{clientId}/#'], subscribe: [] }] }]);
    const cfg = renderProxyConfig(policy, { outboundPort: 15001, inboundPort: 15003 });
    expect(cfg.endpoints['10.0.0.2']!.ports['1883']).toBe('mqtt');
    expect(cfg.access['app/db']).toEqual([expect.objectContaining({ target: 'app/fleet', sources: ['app/web'], tcpAllPorts: false, mqtt: [{ clientId: 'sensor-.*', publish: ['devices/{clientId}/#'], subscribe: [] }] })]);
    expect(cfg.mqtt).toEqual({ topicLevels: 3, maxTopics: 500, maxPacketBytes: 1048576 });
  });

  test('a missing group or match is reported on the target, which is left out', () => {
    const c = compiled([...mesh(), target('broken', 'db', ['web'], [{ kind: 'MQTTRouteGroup', name: 'fleet', matches: ['nope'] }])]);
    expect(c.get('node-a')!.policy.access.map((a) => a.name)).not.toContain('broken');
    expect(c.reporter.active()).toEqual([expect.objectContaining({ ref: { kind: 'TrafficTarget', namespace: 'app', name: 'broken' }, field: 'spec.rules[0].matches[0]' })]);
  });

  test('a bad mesh setting names its key', () => {
    expect(() => toRecord('ConfigMap', meshConfig({ mqttTopicLevels: 'two' }))).toThrow(expect.objectContaining({ field: 'data.mqttTopicLevels' }));
    expect(() => toRecord('ConfigMap', meshConfig({ mqttMaxPacketBytes: '1' }))).toThrow(expect.objectContaining({ field: 'data.mqttMaxPacketBytes' }));
    // Not set: no mqtt key at all (policies of meshes that never mention MQTT keep their versions).
    expect(toRecord('ConfigMap', meshConfig({})).settings.mqtt).toBeUndefined();
  });
});

describe('docs/mqtt.md', () => {
  test('the device-fleet policy is the one the Pipy tier runs against mosquitto, and the controller accepts every object of it', () => {
    const doc = readFileSync(fileURLToPath(new URL('../../docs/mqtt.md', import.meta.url)), 'utf8');
    const block = /## A device fleet[\s\S]*?```yaml\n([\s\S]*?)```/.exec(doc)?.[1];
    expect(block).toBeDefined();
    const objects = yaml.parseAllDocuments(block!).map((d) => d.toJS() as Obj);
    expect(objects.map((o) => o.kind)).toEqual(['Service', 'MQTTRouteGroup', 'TrafficTarget', 'TrafficTarget']);
    for (const o of objects) expect(() => toRecord(o.kind as Parameters<typeof toRecord>[0], o)).not.toThrow();
    expect(parseMqttRouteGroup(objects[1]!).matches).toEqual([FLEET_DEVICES, FLEET_COLLECTOR]);
    const ports = (objects[0]!.spec as { ports: { name: string; appProtocol?: string }[] }).ports;
    expect(portProtocol({ name: ports[0]!.name, appProtocol: ports[0]!.appProtocol ?? null })).toBe('mqtt');
  });
});
