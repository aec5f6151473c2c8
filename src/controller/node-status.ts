import type { CoreV1Event } from '@kubernetes/client-node';
import { errorMessage } from '../errors.js';
import type { NodeModeStatus } from '../policy/schema.js';
import { logger } from '../util/log.js';

const log = logger('controller-node-status');

/** Nodes are cluster-scoped: their Events go to `default`, where kubelet puts its own and `kubectl describe node` finds them. */
export const NODE_EVENT_NAMESPACE = 'default';

/**
 * The Event an agent's mode report deserves, or undefined when all is as
 * desired. Pure. A fallback is a Warning naming the missing capability; a
 * node where no mode works is a Warning saying its pods are not meshed.
 */
export function nodeModeEvent(node: string, s: NodeModeStatus, now: Date): CoreV1Event | undefined {
  let reason: string;
  let message: string;
  if (!s.ready) {
    reason = 'InterceptionUnavailable';
    message = `fsm-node cannot intercept on this node, its mesh pods are not served: ${s.reason ?? 'no reason given'}`;
  } else if (s.fallbackReason) {
    reason = 'InterceptionModeFallback';
    message = `interception mode ${s.desired} wanted, ${s.effective} in use: ${s.fallbackReason}`;
  } else return undefined;
  return {
    metadata: { generateName: `${node}.`, namespace: NODE_EVENT_NAMESPACE },
    involvedObject: { kind: 'Node', name: node, apiVersion: 'v1' },
    reason,
    message,
    type: 'Warning',
    source: { component: 'fsm-node-controller', host: node },
    firstTimestamp: now,
    lastTimestamp: now,
    count: 1,
  };
}

/**
 * The Event for identities failing closed on the node (their certificate
 * expired without renewal, so their cross-node traffic is refused), or
 * undefined when there are none. Pure.
 */
export function nodeIdentityEvent(node: string, s: NodeModeStatus, now: Date): CoreV1Event | undefined {
  const ids = s.expiredIdentities ?? [];
  if (ids.length === 0) return undefined;
  const shown = ids.slice(0, 5).map((i) => `${i.namespace}/${i.serviceAccount} (${i.reason})`);
  return {
    metadata: { generateName: `${node}.`, namespace: NODE_EVENT_NAMESPACE },
    involvedObject: { kind: 'Node', name: node, apiVersion: 'v1' },
    reason: 'IdentityExpired',
    message: `fsm-node fails closed for ${ids.length} identit${ids.length === 1 ? 'y' : 'ies'} on this node whose certificate expired without renewal: ${shown.join('; ')}${ids.length > 5 ? `; and ${ids.length - 5} more` : ''}`,
    type: 'Warning',
    source: { component: 'fsm-node-controller', host: node },
    firstTimestamp: now,
    lastTimestamp: now,
    count: 1,
  };
}

/**
 * Turns agents' mode reports into Node Events, once per node and distinct
 * problem (an agent reports on every new decision and after restarts).
 * Posting is best effort: a failure is logged and the next report retries.
 */
export class NodeStatusEvents {
  private readonly posted = new Map<string, string>();

  constructor(private readonly post: (event: CoreV1Event) => Promise<void>) {}

  async report(node: string, status: NodeModeStatus, now = new Date()): Promise<void> {
    // Mode and identities are separate problems: each posts once per distinct state.
    await this.one(node, nodeModeEvent(node, status, now));
    await this.one(`${node}\nidentity`, nodeIdentityEvent(node, status, now));
  }

  private async one(slot: string, event: CoreV1Event | undefined): Promise<void> {
    if (!event) {
      this.posted.delete(slot);
      return;
    }
    const key = `${event.reason}\n${event.message}`;
    if (this.posted.get(slot) === key) return;
    try {
      await this.post(event);
      this.posted.set(slot, key);
    } catch (err) {
      log.warn({ node: event.involvedObject.name, err: errorMessage(err) }, 'could not post the Node Event');
    }
  }
}
