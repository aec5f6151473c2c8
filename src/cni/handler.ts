import { existsSync } from 'node:fs';
import type { Logger } from '../util/log.js';
import { errorMessage } from '../errors.js';
import type { NodePolicy } from '../policy/schema.js';
import { wantsEnrolment, type EnrolledStore } from './enrolled.js';
import { CniCode, CniError, errorAnswer, passThrough, podIPv4, podRef, SUPPORTED_VERSIONS, type CniAnswer, type CniRequest } from './protocol.js';

/**
 * What the agent does with one CNI request. All decisions of the plugin live
 * here (the C plugin only relays):
 * - ADD: a pod of a monitored namespace that did not opt out is recorded as
 *   enrolled early and a sync is awaited, so the dataplane has it before ADD
 *   returns and the pod's first process starts intercepted. Answer: prevResult.
 * - DEL: the sandbox's enrolment goes (a newer sandbox of the same pod stays).
 *   Always succeeds.
 * - CHECK: fails when a pod that should be enrolled is not.
 * - VERSION: the versions the plugin speaks (the plugin answers it itself too).
 */

export interface HandlerDeps {
  store: EnrolledStore;
  policy(): NodePolicy | undefined;
  /** Request a sync and wait for one that started after the request; rejects when it failed. */
  syncNow(reason: string): Promise<void>;
  /** Whether the last applied desired state holds a pod with this address (read after syncNow). */
  enrolled(ip: string): boolean;
  /** Why pods are not being enrolled right now (no mode works, proxy failing open...), or undefined. */
  notEnrolling(): string | undefined;
  findCgroup(o: { uid: string; netns: string; containerId: string }): { path: string; how: string } | undefined;
  log: Logger;
}

export async function handleCni(req: CniRequest, deps: HandlerDeps): Promise<CniAnswer> {
  const version = req.config.cniVersion;
  try {
    switch (req.command) {
      case 'VERSION':
        return { exitCode: 0, stdout: `${JSON.stringify({ cniVersion: version ?? '1.0.0', supportedVersions: SUPPORTED_VERSIONS })}\n` };
      case 'ADD':
        return await add(req, deps);
      case 'DEL':
        del(req, deps);
        return { exitCode: 0, stdout: '' };
      case 'CHECK':
        return check(req, deps);
      case 'GC':
      case 'STATUS':
        return { exitCode: 0, stdout: '' };
      default:
        throw new CniError(CniCode.invalidEnv, `unknown CNI_COMMAND ${JSON.stringify(req.command)}`, 'expected ADD, DEL, CHECK or VERSION');
    }
  } catch (err) {
    const e = err instanceof CniError ? err : new CniError(CniCode.enrolFailed, 'fsm-node agent failed', errorMessage(err));
    if (req.command === 'DEL') {
      deps.log.warn({ containerId: req.containerId, err: e.message }, 'CNI DEL failed; answered success (a pod must stay deletable)');
      return { exitCode: 0, stdout: '' };
    }
    // Fail-open meshes let the pod start; the policy enrols it when it names it.
    if (req.command === 'ADD' && req.config.failurePolicy === 'fail-open' && e.cniCode !== CniCode.invalidConfig && req.config.prevResult !== undefined) {
      deps.log.warn({ containerId: req.containerId, args: req.args, err: e.message }, 'pod not enrolled at creation; it starts anyway (failurePolicy fail-open) and is enrolled when the policy names it');
      return passThrough(req.config);
    }
    deps.log.warn({ command: req.command, containerId: req.containerId, args: req.args, err: e.message }, 'CNI request refused');
    return errorAnswer(version, e);
  }
}

function requireEnv(req: CniRequest): void {
  if (!req.containerId) throw new CniError(CniCode.invalidEnv, 'CNI_CONTAINERID is not set');
  if (req.command === 'ADD' && !req.netns) throw new CniError(CniCode.invalidEnv, 'CNI_NETNS is not set');
}

async function add(req: CniRequest, deps: HandlerDeps): Promise<CniAnswer> {
  requireEnv(req);
  const answer = passThrough(req.config);
  const ref = podRef(req.args);
  if (!ref) {
    deps.log.info({ containerId: req.containerId }, 'CNI ADD without K8S_POD_NAMESPACE/K8S_POD_NAME: not a Kubernetes pod, passed through');
    return answer;
  }
  const policy = deps.policy();
  if (!policy) throw new CniError(CniCode.tryAgainLater, 'the fsm-node agent has no policy yet, so it cannot tell whether the pod belongs to the mesh', 'controller unreachable and no last good copy');
  const want = wantsEnrolment(policy, ref.namespace, ref.name);
  if (!want.enrol) {
    deps.log.debug({ pod: `${ref.namespace}/${ref.name}`, why: want.why }, 'CNI ADD: not enrolled');
    return answer;
  }
  const ip = podIPv4(req.config.prevResult);
  if (!ip) throw new CniError(CniCode.invalidConfig, 'no IPv4 address in prevResult', 'fsm-node intercepts IPv4: the primary CNI must give the pod an IPv4 address');
  const cg = deps.findCgroup({ uid: ref.uid, netns: req.netns, containerId: req.containerId });
  if (!cg) throw new CniError(CniCode.tryAgainLater, `cannot find the cgroup of pod ${ref.namespace}/${ref.name}`, `no kubelet pod cgroup for uid ${JSON.stringify(ref.uid)} and no process in ${req.netns}`);
  deps.store.add({ containerId: req.containerId, ...ref, ip, cgroupPath: cg.path, netns: req.netns, at: new Date().toISOString() });
  await deps.syncNow(`cni add ${ref.namespace}/${ref.name}`);
  if (!deps.enrolled(ip)) {
    const why = deps.notEnrolling();
    if (why === undefined) throw new CniError(CniCode.enrolFailed, `pod ${ref.namespace}/${ref.name} is not in the applied dataplane state after the sync`);
    // The node does not intercept at all right now (fail-open proxy): the pod is recorded and enrolled when it does.
    if (!why.startsWith('suspended:')) throw new CniError(CniCode.tryAgainLater, `fsm-node cannot enrol pod ${ref.namespace}/${ref.name} now`, why);
  }
  deps.log.info({ pod: `${ref.namespace}/${ref.name}`, ip, cgroup: cg.path, how: cg.how, containerId: req.containerId }, 'CNI ADD: pod enrolled before its containers start');
  return answer;
}

function del(req: CniRequest, deps: HandlerDeps): void {
  requireEnv(req);
  const ref = podRef(req.args);
  const policyIp = ref ? deps.policy()?.pods.find((p) => (ref.uid ? p.uid === ref.uid : p.namespace === ref.namespace && p.name === ref.name))?.ip : undefined;
  const gone = deps.store.remove(req.containerId, ref, policyIp);
  if (gone || policyIp) {
    void deps.syncNow(`cni del ${ref ? `${ref.namespace}/${ref.name}` : req.containerId}`).catch((err: unknown) => deps.log.warn({ err: errorMessage(err) }, 'sync after CNI DEL failed; retried'));
  }
}

function check(req: CniRequest, deps: HandlerDeps): CniAnswer {
  requireEnv(req);
  const ref = podRef(req.args);
  const policy = deps.policy();
  if (!ref || !policy || !wantsEnrolment(policy, ref.namespace, ref.name).enrol) return { exitCode: 0, stdout: '' };
  const ip = podIPv4(req.config.prevResult);
  if (ip && !deps.enrolled(ip) && deps.notEnrolling() === undefined) {
    throw new CniError(CniCode.enrolFailed, `pod ${ref.namespace}/${ref.name} (${ip}) should be enrolled in the mesh but is not`);
  }
  if (req.netns && !existsSync(req.netns)) throw new CniError(CniCode.unknownContainer, `network namespace ${req.netns} is gone`);
  return { exitCode: 0, stdout: '' };
}
