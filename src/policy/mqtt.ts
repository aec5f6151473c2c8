import { z } from 'zod';
import { FieldError } from './fields.js';
import { formatPath } from './schema.js';

/**
 * MQTTRouteGroup: this project's route group for MQTT, in the spirit of SMI's
 * HTTPRouteGroup. Named matches, each on a client id pattern, PUBLISH topic
 * filters and SUBSCRIBE topic filters; a TrafficTarget rule
 * `{ kind: MQTTRouteGroup, name, matches? }` allows what its matches allow on
 * MQTT ports of the destination (docs/mqtt.md). Checked here, field by field;
 * the node proxy enforces it (proxy/mqtt.js, matching in proxy/mqtt-topic.js).
 *
 *   apiVersion: specs.fsm-node.io/v1alpha1
 *   kind: MQTTRouteGroup
 *   spec:
 *     matches:
 *     - name: own-prefix                    # a match with no filters only lets matching clients connect
 *       clientId: "sensor-[0-9]+"           # anchored regex; absent = any client
 *       publish: ["devices/{clientId}/#"]    # topic filters a PUBLISH topic must match
 *       subscribe: ["commands/{clientId}/+"] # filters a SUBSCRIBE filter must stay within
 */

export const MQTT_ROUTE_GROUP_API_VERSION = 'specs.fsm-node.io/v1alpha1';

/** Whole-level placeholders a filter may use; the proxy fills them in per connection. */
export const MQTT_PLACEHOLDERS = ['{clientId}', '{serviceAccount}'] as const;

/** The MQTT spec's limit for a UTF-8 string field (a topic filter is one). */
const MAX_FILTER_BYTES = 65535;

export interface MqttMatch {
  name: string;
  /** Anchored regular expression on the CONNECT client identifier; null = any client. */
  clientId: string | null;
  /** Topic filters: a PUBLISH (and a will) is allowed when its topic matches one. */
  publish: string[];
  /** Topic filters: a SUBSCRIBE filter is allowed when every topic it can match is matched by one. */
  subscribe: string[];
}

export interface MqttRouteGroupRec {
  namespace: string;
  name: string;
  matches: MqttMatch[];
}

/**
 * Why `filter` is not a topic filter, or null when it is. MQTT 5 section
 * 4.7.1: '#' alone as the last level, '+' alone as a level; no U+0000; not
 * empty. Our placeholders must stand alone as a level too.
 */
export function topicFilterProblem(filter: string): string | null {
  if (filter === '') return 'is empty';
  if (filter.includes('\u0000')) return 'contains U+0000';
  if (Buffer.byteLength(filter, 'utf8') > MAX_FILTER_BYTES) return `is longer than ${MAX_FILTER_BYTES} bytes`;
  const levels = filter.split('/');
  for (let i = 0; i < levels.length; i++) {
    const l = levels[i]!;
    if (l === '#') {
      if (i !== levels.length - 1) return "'#' must be the last level";
    } else if (l !== '+') {
      if (l.includes('#')) return "'#' must be a whole level";
      if (l.includes('+')) return "'+' must be a whole level";
      if ((l.includes('{') || l.includes('}')) && !(MQTT_PLACEHOLDERS as readonly string[]).includes(l)) {
        return `a placeholder must be a whole level, one of ${MQTT_PLACEHOLDERS.join(', ')}`;
      }
    }
  }
  return null;
}

const Filters = z.array(z.string()).nullish();
const dns = z.string().min(1).max(253).regex(/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/, 'must be a lowercase RFC 1123 name');
export const MqttRouteGroupIn = z.object({
  metadata: z.object({ name: dns, namespace: dns.optional() }).passthrough(),
  spec: z
    .object({
      matches: z
        .array(
          z
            .object({
              name: z.string().min(1),
              clientId: z.string().min(1).nullish(),
              publish: Filters,
              subscribe: Filters,
            })
            .strict(),
        )
        .min(1),
    })
    .strict(),
});

/** Check an MQTTRouteGroup object; throws FieldError naming the field (kubectl's dotted form) and the value. */
export function parseMqttRouteGroup(obj: unknown): MqttRouteGroupRec {
  const r = MqttRouteGroupIn.safeParse(obj);
  if (!r.success) {
    const first = r.error.issues[0]!;
    throw new FieldError(formatPath(first.path), first.message);
  }
  const { metadata: m, spec } = r.data;
  const names = new Set<string>();
  const matches = spec.matches.map((x, i): MqttMatch => {
    const at = `spec.matches[${i}]`;
    if (names.has(x.name)) throw new FieldError(`${at}.name`, `duplicate match name ${JSON.stringify(x.name)}`);
    names.add(x.name);
    if (x.clientId != null) {
      try {
        new RegExp(x.clientId);
      } catch (err) {
        throw new FieldError(`${at}.clientId`, `${JSON.stringify(x.clientId)} is not a regular expression: ${(err as Error).message}`);
      }
    }
    const filters = (key: 'publish' | 'subscribe'): string[] =>
      (x[key] ?? []).map((f, j) => {
        const why = topicFilterProblem(f);
        if (why) throw new FieldError(`${at}.${key}[${j}]`, `${JSON.stringify(f)} is not an MQTT topic filter: ${why}`);
        return f;
      });
    const publish = filters('publish');
    const subscribe = filters('subscribe');
    return { name: x.name, clientId: x.clientId ?? null, publish, subscribe };
  });
  return { namespace: m.namespace ?? 'default', name: m.name, matches };
}
