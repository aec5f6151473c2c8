import { existsSync } from 'node:fs';
import { InvalidInputError } from '../../errors.js';
import { rootLogger } from '../../util/log.js';
import { intFlag, oneOf, type Command, type ParsedValues } from '../command.js';

const verbs = ['up', 'status', 'check', 'exec', 'pod', 'fault', 'link', 'down', 'selfcheck', 'supervise'] as const;
const say = (line: string): void => void process.stdout.write(`${line}\n`);

async function up(values: ParsedValues): Promise<number> {
  const { labUp, renderSummary, agentModes } = await import('../../lab/lab.js');
  const { DEFAULT_LAB_DIR, LAB_POINTER, LabExistsError } = await import('../../lab/state.js');
  const opts = {
    dir: (values.dir as string | undefined) ?? DEFAULT_LAB_DIR,
    nodes: intFlag('nodes', values.nodes ?? '2', 1, 20),
    podsPerNode: intFlag('pods-per-node', values['pods-per-node'] ?? '2', 1, 50),
    mode: oneOf('mode', values.mode ?? 'auto', ['auto', 'ebpf', 'iptables'] as const),
    proxy: oneOf('proxy', values.proxy ?? 'auto', ['auto', 'pipy', 'passthrough'] as const),
  };
  try {
    if (values.clusters !== undefined) {
      // Clusters joined into a clusterset (src/lab/clusters/).
      const { labUpClusters, renderClusterSummary } = await import('../../lab/clusters/up.js');
      const { MAX_CLUSTERS } = await import('../../lab/clusters/net.js');
      const state = await labUpClusters({ ...opts, clusters: intFlag('clusters', values.clusters, 2, MAX_CLUSTERS) }, say);
      say('');
      for (const line of renderClusterSummary(state, await agentModes(state))) say(line);
      return 0;
    }
    const state = await labUp(opts, say);
    say('');
    for (const line of renderSummary(state, await agentModes(state))) say(line);
    return 0;
  } catch (err) {
    // Refused before anything started (another lab, busy port): just the reason.
    if (err instanceof LabExistsError || !existsSync(LAB_POINTER)) throw err;
    // Whatever started is recorded in the lab state: `lab down` removes it.
    process.stderr.write(`fsm-node lab up failed: ${(err as Error).message}\nTo remove what was started: fsm-node lab down\n`);
    return 1;
  }
}

async function check(values: ParsedValues): Promise<number> {
  const { labCheck, renderCheck } = await import('../../lab/check.js');
  const state = await runningLab(values);
  const report = state.clusters ? await (await import('../../lab/clusters/check.js')).clusterCheck(state) : await labCheck(state, { resilience: values['no-resilience'] !== true });
  if (values.json) say(JSON.stringify(report, null, 2));
  else for (const line of renderCheck(report)) say(line);
  return report.ok ? 0 : 1;
}

async function status(values: ParsedValues): Promise<number> {
  const { gatherLabStatus, renderLabStatus } = await import('../../lab/status.js');
  const s = await gatherLabStatus(await runningLab(values));
  if (values.json) say(JSON.stringify(s, null, 2));
  else for (const line of renderLabStatus(s)) say(line);
  return s.ok ? 0 : 1;
}

/** The lab supervisor itself (started by `lab up`, not by hand): runs the agents until SIGTERM. */
async function supervise(values: ParsedValues): Promise<number> {
  if (typeof values.dir !== 'string') throw new InvalidInputError('--dir', values.dir, 'required: the lab directory (lab up starts the supervisor with it)');
  // Its log is the history of the agents' restarts: keep the info lines, unless told otherwise.
  if (process.env.FSMN_LOG_LEVEL === undefined) rootLogger.level = 'info';
  const { runSupervisor } = await import('../../lab/supervisor.js');
  const stop = new AbortController();
  for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => stop.abort(sig));
  await runSupervisor(values.dir, { signal: stop.signal });
  return 0;
}

async function exec(values: ParsedValues, positionals: string[]): Promise<number> {
  const { labExec } = await import('../../lab/lab.js');
  const [pod, ...cmd] = positionals;
  return labExec(await runningLab(values), pod, cmd);
}

async function fault(values: ParsedValues, positionals: string[]): Promise<number> {
  const { podFaultFromFlags, faultFile, writePodFault, describePodFault } = await import('../../lab/faults.js');
  const { findPod } = await import('../../lab/lab.js');
  if (positionals.length !== 1) throw new InvalidInputError('lab fault POD', positionals.join(' ') || '(none)', 'name exactly one pod (see fsm-node lab status)');
  const f = podFaultFromFlags({ status: values.status as string | undefined, hang: values.hang as boolean | undefined, close: values.close as boolean | undefined, clear: values.clear as boolean | undefined });
  const state = await runningLab(values);
  const pod = findPod(state, positionals[0]);
  writePodFault(faultFile(state.dir, pod.name), f);
  say(`${pod.name}: ${describePodFault(f)}`);
  return 0;
}

/** lab link NODE|CLUSTER ...: a node's underlay link (src/lab/faults.ts) or, in a cluster lab, a cluster's uplink (src/lab/clusters/link.ts). */
async function link(values: ParsedValues, positionals: string[]): Promise<number> {
  const { linkActionFromFlags, applyLinkAction } = await import('../../lab/faults.js');
  if (positionals.length !== 1) throw new InvalidInputError('lab link NODE|CLUSTER', positionals.join(' ') || '(none)', 'name exactly one node or cluster (see fsm-node lab status)');
  const action = linkActionFromFlags({ delay: values.delay as string | undefined, loss: values.loss as string | undefined, down: values.down as boolean | undefined, up: values.up as boolean | undefined, clear: values.clear as boolean | undefined });
  const state = await runningLab(values);
  // In a cluster lab a name that is no node is taken as a cluster (whose errors list the clusters).
  if (state.clusters && !state.nodes.some((n) => n.name === positionals[0])) {
    const { applyClusterLink } = await import('../../lab/clusters/link.js');
    say(await applyClusterLink(state, positionals[0], action));
  } else {
    say(await applyLinkAction(state, positionals[0], action));
  }
  return 0;
}

/** lab pod add NAME --node N [--namespace NS] [--no-mesh] [-- CMD...] | lab pod rm NAME (src/lab/pods.ts). */
async function pod(values: ParsedValues, rest: string[]): Promise<number> {
  const { podAdd, podRm } = await import('../../lab/pods.js');
  const { LAB_NAMESPACE } = await import('../../lab/manifests.js');
  const [action, name, ...cmd] = rest;
  const state = await runningLab(values);
  if (state.clusters) throw new InvalidInputError('lab pod', action, 'is not available in a cluster lab (lab up --clusters) yet: its pods are made by lab up');
  if (action === 'add') {
    if (!name) throw new InvalidInputError('lab pod add', '', 'usage: fsm-node lab pod add NAME --node NODE [--namespace NS] [--no-mesh] [-- CMD...]');
    if (typeof values.node !== 'string') throw new InvalidInputError('--node', values.node, 'required: the lab node the pod runs on (e.g. n1)');
    await podAdd(state, { name, node: values.node, namespace: typeof values.namespace === 'string' ? values.namespace : LAB_NAMESPACE, mesh: !values['no-mesh'], cmd }, say);
    return 0;
  }
  if (action === 'rm') {
    if (!name || cmd.length) throw new InvalidInputError('lab pod rm', rest.slice(1).join(' '), 'usage: fsm-node lab pod rm NAME');
    await podRm(state, name, say);
    return 0;
  }
  throw new InvalidInputError('lab pod', action, 'expected add or rm');
}

async function down(values: ParsedValues): Promise<number> {
  const { labDown } = await import('../../lab/lab.js');
  const report = await labDown(values.dir as string | undefined, say);
  if (!report.existed) {
    say('no lab to remove (no lab state, no fsmlab network namespaces, cgroups or bpffs directories)');
    return 0;
  }
  for (const n of report.notes) say(`note: ${n}`);
  if (report.leftovers.length > 0) {
    say(`lab down FAILED: still present:\n  ${report.leftovers.join('\n  ')}`);
    return 1;
  }
  say(`lab down: removed ${report.removed.length} objects; verified none left (network namespaces, cgroups, bpffs pins, processes, cgroup BPF attachments)`);
  return 0;
}

async function runningLab(values: ParsedValues) {
  const { readLabState, resolveLabDir, LabError } = await import('../../lab/state.js');
  const dir = resolveLabDir(values.dir as string | undefined);
  const state = readLabState(dir);
  if (!state) throw new LabError(`no lab in ${dir}: start one with \`fsm-node lab up\``);
  return state;
}

export const labCommand: Command = {
  name: 'lab',
  summary: 'a real multi-node mesh in a box: network namespaces as nodes and pods, real agents and proxies',
  usage: [
    'up [--clusters N] [--nodes N] [--pods-per-node M] [--mode auto|ebpf|iptables] [--proxy auto|pipy|passthrough] [--dir DIR]',
    'status [--json]',
    'check [--json] [--no-resilience]',
    'exec POD|outside -- CMD...',
    'pod add NAME --node NODE [--namespace NS] [--no-mesh] [-- CMD...]',
    'pod rm NAME',
    'fault POD (--status CODE | --hang | --close | --clear)',
    'link NODE|CLUSTER [--delay MS] [--loss PCT] | --down | --up | --clear',
    'down',
    'selfcheck',
  ],
  help: `
Needs root, cgroup v2 and bpffs, and a built tree (npm run build). Every object
the lab makes is named with the prefix "fsmlab" (network namespaces, cgroups,
bpffs directories); one lab per machine.

  up         builds the nodes and pods, writes example manifests into DIR/manifests,
             starts an echo server in every pod, the controller and the lab
             supervisor, which runs one agent per node and restarts a dead one
             with backoff (as kubelet restarts a DaemonSet pod); waits until all
             are ready and prints what runs where.
  status     nodes (mode, agent pid, up or down, restarts and last exit, proxy),
             pods, controller and supervisor; --json for scripts. Exit 0 when
             everything is up.
  check      real HTTP requests from every pod to every other pod: each must be
             answered by the target and, when the manifests enrol the client, go
             through its node's proxy (same-node hops stay on the node). Cases
             that need Pipy (services, split, allow/deny, MQTT, resilience) are
             skipped with the passthrough proxy. With Pipy, one case per
             resilience policy (Retry, request timeout, outlier detection, local
             rate limit) faults an echo endpoint, writes the policy into the
             manifests, checks, and puts both back (about a minute;
             --no-resilience leaves them out). Exit 0 only when every other
             case passes.
  exec       runs a command inside a pod (its network namespace and cgroup), or
             as the outside client (10.78.0.200, off the mesh) with POD "outside";
             the outside server is 10.78.0.201 (HTTP :80, TLS :443 as outside.lab).
  pod add    creates a pod live the way a node does: the lab plays the runtime and the
             primary CNI (netns, address, sandbox process), then runs the node's CNI
             chain, where the agent installed fsm-node-cni, with the environment and
             stdin a runtime gives it; CMD runs as the pod's first process, already
             intercepted when the pod's namespace is monitored (default namespace demo;
             --no-mesh opts the pod out). Exit 1 with the plugin's CNI error when ADD
             fails (nothing is left half-made).
  pod rm     runs CNI DEL for the pod and removes it.
  fault      makes a pod's echo server misbehave until --clear: answer every
             request with --status CODE (e.g. 503), --hang (accept, never
             answer) or --close (close the connection unanswered). Takes effect
             at the next request; the test bed for timeouts, retries and
             outlier detection.
  link       shapes or cuts a node's underlay link (tc netem on both ends, so
             --delay 50 is 50 ms each way; --loss 5 drops 5 % each way). On a
             kernel without netem, --loss alone is made with iptables' statistic
             match in the node's namespace (the output says which method) and
             --delay is refused; --down cuts the cable (the node keeps its
             addresses and routes), --up restores it, --clear removes shaping
             and sets it up. Only the lab's namespaces are touched.
             In a cluster lab (lab up --clusters N), link CLUSTER does the same to
             that cluster's uplink, the cable between its underlay and the
             router (the cluster's nodes still reach each other; netem only).
  down       stops everything, runs every node's cleanup, removes the topology and
             verifies nothing is left; also after a crash.
  selfcheck  builds 2 nodes x 2 pods, checks TCP between every pair (same node
             and across nodes), tears it down and verifies nothing is left.
  supervise  the lab supervisor itself (lab up starts it with --dir; not for use by hand).

With --clusters N (2-4), up builds clusters c1..cN instead: each with its own
nodes (c1-n1 ...), pods (c1-p1 ...), controller, manifests and multicluster
directories (DIR/clusters/<cluster>/), joined into a clusterset (a lab-made
clusterset CA, mutual TLS between the controllers) and by a router namespace
between their underlays. echo.demo is exported from every cluster with a
FailOver GlobalTrafficPolicy; check adds cross-cluster and failover cases
(docs/lab.md, docs/multicluster.md).

Editing DIR/manifests changes the mesh live: the controller watches it.
--dir is only needed for \`up\`; the other verbs find the running lab.`,
  options: {
    clusters: { type: 'string', valueName: 'N', description: 'lab up: build N clusters (2-4) joined into a clusterset, each with --nodes nodes.' },
    nodes: { type: 'string', valueName: 'N', description: 'Number of nodes (lab up; default 2; per cluster with --clusters).' },
    'pods-per-node': { type: 'string', valueName: 'M', description: 'Pods per node (lab up; default 2).' },
    mode: { type: 'string', valueName: 'MODE', description: 'Interception mode of every node: auto, ebpf or iptables (default auto).' },
    proxy: { type: 'string', valueName: 'PROXY', description: 'auto (Pipy when found), pipy, or passthrough (L4 test proxy, no policy) (default auto).' },
    dir: { type: 'string', valueName: 'DIR', description: 'Lab directory: manifests, state, logs (default /var/tmp/fsm-node-lab).' },
    json: { type: 'boolean', description: 'Machine-readable output (lab status, lab check).' },
    'no-resilience': { type: 'boolean', description: 'lab check: leave out the resilience cases (faults and policies, about a minute).' },
    node: { type: 'string', valueName: 'NODE', description: 'lab pod add: the node the pod runs on.' },
    namespace: { type: 'string', valueName: 'NS', description: 'lab pod add: the pod\'s namespace (default demo, monitored by the mesh).' },
    'no-mesh': { type: 'boolean', description: 'lab pod add: the pod opts out of the mesh (flomesh.io/sidecar-injection: disabled).' },
    status: { type: 'string', valueName: 'CODE', description: 'lab fault: answer every request with this HTTP status.' },
    hang: { type: 'boolean', description: 'lab fault: accept requests and never answer.' },
    close: { type: 'boolean', description: 'lab fault: close connections without an answer.' },
    clear: { type: 'boolean', description: 'lab fault / lab link: remove the fault.' },
    delay: { type: 'string', valueName: 'MS', description: 'lab link: added delay each way, in milliseconds.' },
    loss: { type: 'string', valueName: 'PCT', description: 'lab link: packet loss each way, in percent.' },
    down: { type: 'boolean', description: 'lab link: cut the node\'s underlay link (or a cluster\'s uplink).' },
    up: { type: 'boolean', description: 'lab link: restore a cut link.' },
  },
  positionals: true,
  async run(values, positionals) {
    const verb = oneOf('verb', positionals[0], verbs);
    // The lab talks in progress lines; module logs (JSON) only for warnings, unless asked for.
    // Set before the lab modules are imported: their child loggers take the level at creation.
    if (process.env.FSMN_LOG_LEVEL === undefined) rootLogger.level = 'warn';
    const rest = positionals.slice(1);
    if (!['exec', 'pod', 'fault', 'link'].includes(verb) && rest.length > 0) throw new InvalidInputError(`lab ${verb}`, rest.join(' '), 'takes no arguments');
    switch (verb) {
      case 'selfcheck': {
        const { topologySelfCheck } = await import('../../lab/selfcheck.js');
        const result = await topologySelfCheck();
        for (const line of result.lines) say(line);
        return result.ok ? 0 : 1;
      }
      case 'up':
        return up(values);
      case 'status':
        return status(values);
      case 'check':
        return check(values);
      case 'supervise':
        return supervise(values);
      case 'exec':
        return exec(values, rest);
      case 'pod':
        return pod(values, rest);
      case 'fault':
        return fault(values, rest);
      case 'link':
        return link(values, rest);
      case 'down':
        return down(values);
    }
  },
};
