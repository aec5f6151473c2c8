import { once } from 'node:events';
import { appendFileSync, readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { changeAndConverge, markNotReady, notReadyPods, podsOf, restartServers, restoreReady, setClusterPolicy } from '../src/lab/clusters/check.js';
import { applyClusterLink } from '../src/lab/clusters/link.js';
import { defaultTrafficPolicy } from '../src/lab/clusters/manifests.js';
import { readClusterStatus } from '../src/lab/clusters/status.js';
import { clusterControllerArgv } from '../src/lab/clusters/up.js';
import { httpsReady, processDied, waitFor } from '../src/lab/lab.js';
import { ECHO_PORT } from '../src/lab/manifests.js';
import { isOurs, spawnInside, startDetached, stopProcess } from '../src/lab/processes.js';
import { labFiles, readLabState, resolveLabDir, writeLabState, type LabCluster, type LabPod, type LabState } from '../src/lab/state.js';
import { RATE_LOAD, summarize, type LoadRun } from './failover.js';
import { intFlag, round } from './util.js';

/**
 * failover-lab: bench/failover.ts's faults on a running two-cluster lab
 * (`fsm-node lab up --clusters 2 --proxy pipy`), so the numbers come from the
 * lab's own controllers, agents, relays and router rather than from sites the
 * benchmark wires itself. GETs at --rate/s from the client cluster's first pod
 * (c2-p1) to echo's clusterset IP through each fault:
 *
 *   local-gone         FailOver c2 > c1: c2's echo servers stop (still listed),
 *                      2 s later c2's pods go not ready (out of the Service);
 *   link-cut           ActiveActive: c1's uplink is cut (data and control path);
 *   link-restored      how long until c1 serves again once the link is back;
 *   controller-killed  ActiveActive: c1's controller stops (restarted after).
 *
 * One JSON line per case (failed, recoveryMs, p50/p99 around the fault, the
 * answers by pod, the load average). Everything is put back after each case.
 * Run it under the lab lock, like the lab itself:
 *   flock /tmp/fsm-lab.lock npm run bench -- failover-lab [--rate 100] [--seconds 10] [--cases local-gone,link-cut,controller-killed] [--records FILE]
 * (link-restored comes with link-cut.)
 */

function lab(): { state: LabState; client: LabCluster; remote: LabCluster; pod: LabPod; url: string } {
  const state = readLabState(resolveLabDir(undefined));
  if (!state?.clusters || state.clusters.length < 2) throw new Error('no cluster lab runs: start one with `fsm-node lab up --clusters 2 --proxy pipy`');
  if (state.proxy !== 'pipy') throw new Error(`the lab runs the ${state.proxy} proxy: the clusterset data path needs Pipy (lab up --proxy pipy)`);
  const client = state.clusters[state.clusters.length - 1]!;
  const remote = state.clusters[0]!;
  const pod = podsOf(state, client)[0];
  const ip = readClusterStatus(client)?.imports.find((i) => i.name === 'echo')?.ips[0];
  if (!pod || !ip) throw new Error(`cluster ${client.name} has no pod or no clusterset IP for echo yet`);
  return { state, client, remote, pod, url: `http://${ip}:${ECHO_PORT}/` };
}

/** The load generator of bench/failover.ts, inside the client pod; `during` runs alongside. */
async function load(pod: LabPod, url: string, rate: number, seconds: number, during?: () => Promise<void>): Promise<LoadRun> {
  const child = spawnInside(pod.cgroupPath, pod.netns, [process.execPath, '-e', RATE_LOAD, url, String(rate), String(seconds)], ['ignore', 'pipe', 'pipe']);
  let out = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = once(child, 'exit');
  if (during) await during();
  await exited;
  try {
    return JSON.parse(out.trim().split('\n').pop() ?? '') as LoadRun;
  } catch {
    throw new Error(`load generator printed no result: ${out.slice(0, 300)}`);
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function byCluster(state: LabState, run: LoadRun): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of run.records) {
    if (r[2] !== 200) continue;
    const c = state.nodes.find((n) => n.name === state.pods.find((p) => p.name === r[3])?.node)?.cluster ?? '?';
    out[c] = (out[c] ?? 0) + 1;
  }
  return out;
}

export async function* run(flags: Record<string, string | boolean>): AsyncIterable<object> {
  const rate = intFlag(flags, 'rate', 100);
  const seconds = intFlag(flags, 'seconds', 10);
  const cases = typeof flags.cases === 'string' ? flags.cases.split(',') : ['local-gone', 'link-cut', 'controller-killed'];
  const unknown = cases.filter((c) => !['local-gone', 'link-cut', 'controller-killed'].includes(c));
  if (unknown.length) throw new Error(`--cases: unknown case ${unknown.join(', ')} (local-gone, link-cut, controller-killed)`);
  const { state, client, remote, pod, url } = lab();
  // --records FILE: every request of each case (start ms from t0, ms, status, pod or error), for lining failures up with proxy logs.
  const records = typeof flags.records === 'string' ? flags.records : undefined;
  const keep = (kase: string, r: LoadRun, at: number) => records && appendFileSync(records, JSON.stringify({ case: kase, t0: r.t0, faultAt: at, records: r.records }) + '\n');
  const row = (kase: string, r: LoadRun, at: number, extra: object = {}) => (keep(kase, r, at), { bench: 'failover-lab', case: kase, rate, ...summarize(r, at - r.t0), clusters: byCluster(state, r), ...extra, loadavg: loadavg().map((x) => round(x, 2)) });
  const localPods = podsOf(state, client);
  let linkCut = false;
  try {
    // 1. FailOver: c2's endpoints fail (servers stopped, still listed), then leave the Service (not ready).
    let at = 0;
    let r: LoadRun;
    if (cases.includes('local-gone')) {
      await setClusterPolicy(state, client, defaultTrafficPolicy(client.name, state.clusters!.map((c) => c.name)));
      r = await load(pod, url, rate, seconds, async () => {
        await sleep(2000);
        at = Date.now();
        for (const p of localPods) await stopProcess(p.server);
        await sleep(2000);
        await changeAndConverge(state, client, 'pods not ready', () => markNotReady(client, localPods));
      });
      yield row('local-gone', r, at);
      await restartServers(state, localPods);
      await changeAndConverge(state, client, 'pods ready again', () => restoreReady(client, localPods));
    }

    // 2. ActiveActive: c1's uplink is cut.
    await setClusterPolicy(state, client, { mode: 'ActiveActive' });
    if (cases.includes('link-cut')) {
      r = await load(pod, url, rate, seconds, async () => {
        await sleep(2000);
        at = Date.now();
        await applyClusterLink(state, remote.name, { kind: 'down' });
        linkCut = true;
      });
      yield row('link-cut', r, at);
      // 3. The link comes back: time until c1 answers again.
      const back = Date.now();
      await applyClusterLink(state, remote.name, { kind: 'up' });
      linkCut = false;
      let backMs = -1;
      while (Date.now() - back < 60_000) {
        const probe = await load(pod, url, 20, 1);
        if ((byCluster(state, probe)[remote.name] ?? 0) > 0) {
          backMs = Date.now() - back;
          break;
        }
      }
      yield { bench: 'failover-lab', case: 'link-restored', servingAgainMs: backMs, loadavg: loadavg().map((x) => round(x, 2)) };
    }

    // 4. ActiveActive: c1's controller stops; then it is started again as lab up started it.
    if (cases.includes('controller-killed')) {
      r = await load(pod, url, rate, seconds, async () => {
        await sleep(2000);
        at = Date.now();
        await stopProcess(remote.controller.process);
      });
      yield row('controller-killed', r, at);
    }
  } finally {
    if (linkCut) await applyClusterLink(state, remote.name, { kind: 'up' }).catch(() => undefined);
    if (!localPods.every((p) => p.server && isOurs(p.server))) await restartServers(state, localPods).catch(() => undefined);
    if (notReadyPods(client, localPods)) restoreReady(client, localPods);
    if (!remote.controller.process || !isOurs(remote.controller.process)) {
      remote.controller.process = startDetached(join(state.controllerCgroupRoot, `controller-${remote.name}`), undefined, clusterControllerArgv(remote), join(labFiles(state.dir).logs, `controller-${remote.name}.log`));
      if (remote.index === 1) state.controller = remote.controller;
      writeLabState(state);
      await waitFor(`controller of ${remote.name}`, 30_000, processDied(remote.controller.process), () => httpsReady(remote.controller.url, readFileSync(remote.controller.caFile, 'utf8')));
    }
    await setClusterPolicy(state, client, defaultTrafficPolicy(client.name, state.clusters!.map((c) => c.name))).catch(() => undefined);
  }
}
