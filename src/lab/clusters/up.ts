import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { stringify } from 'yaml';
import { generateTokens, writeTokensFile } from '../../controller/auth.js';
import { FSMN_MC_API_VERSION } from '../../multicluster/api.js';
import { createClustersetCa, issueClusterIdentity, issueMeshCa } from '../../multicluster/identity.js';
import { MESH_CA_DIR } from '../../identity/providers/builtin.js';
import { writeFileAtomic } from '../../policy/store.js';
import { cgroup2Root, createCgroup } from '../../util/cgroup.js';
import { BPFFS_ROOT, ensureBpffs } from '../bpffs.js';
import {
  AGENT_PORT_BASE,
  assertPortsFree,
  chooseProxy,
  echoScript,
  httpsReady,
  processDied,
  READY_TIMEOUT_MS,
  refuseExisting,
  startAgents,
  waitFor,
  type Say,
  type UpOptions,
} from '../lab.js';
import { ECHO_PORT, LAB_NAMESPACE, podVersion } from '../manifests.js';
import { hostNetworkSnapshot } from '../net-probe.js';
import { startDetached } from '../processes.js';
import { claimLabPointer, LAB_PREFIX, LabError, LabExistsError, labFiles, writeLabState, type LabCluster, type LabState } from '../state.js';
import { labCli, readSupervisorStatus, type SupervisorStatus } from '../supervisor.js';
import { Topology, underlayNetnsName, underlayServicesAddress } from '../topology.js';
import { relayArgv } from './relay.js';
import { readClusterStatus } from './status.js';
import { CLUSTER_SERVICE, gatewayNodes, renderClusterManifests, renderClusterMulticluster } from './manifests.js';
import { clusterName, clusterPrefix, clusterSubnetBase, createRouter, routerAddress, routerNetnsName, underlayCidr, UPLINK_DEV, validateClusterCount } from './net.js';

/**
 * `lab up --clusters N`: N clusters c1..cN in one lab, each with its own
 * nodes and pods (a topology of its own, src/lab/topology.ts), its own
 * controller in manifest mode with its own manifests and multicluster
 * directories and a ClusterSet file (its id, the peers' controller addresses,
 * the lab's clusterset CA and its identity issued by it), joined by a router
 * namespace (net.ts). The agents of every cluster run under the one lab
 * supervisor, each talking to its own cluster's controller. Demo objects:
 * echo exported from every cluster with a FailOver GlobalTrafficPolicy
 * (manifests.ts). `lab down` is the usual one: everything is named under the
 * lab prefix and recorded in lab.json.
 *
 * The controllers run in the host namespace (like the single lab's), so they
 * reach each other over loopback: `lab link` cuts the data path between
 * clusters, not the peers' exchange of exports (which a silent peer's lease
 * of 24 h would outlast anyway).
 */

export const CLUSTER_CONTROLLER_PORT_BASE = 15443;
/** Cluster k: node API on 15443 + 10(k-1), clusterset listener on the port after it. */
export const clusterControllerPort = (k: number): number => CLUSTER_CONTROLLER_PORT_BASE + 10 * (k - 1);
export const clustersetPort = (k: number): number => clusterControllerPort(k) + 1;
/** Where cluster k's controller reaches peer j: its relay's egress port on host loopback (relay.ts). */
export const peerEgressPort = (k: number, j: number): number => clusterControllerPort(k) + 2 + j;
/** The relay of a cluster listens for peers on its underlay bridge's services address, this port. */
export const CLUSTERSET_INGRESS_PORT = 15444;
export const clustersetIngress = (k: number): string => `${underlayServicesAddress(clusterSubnetBase(k))}:${CLUSTERSET_INGRESS_PORT}`;
export const LAB_GATEWAY_PORT = 15005;

export interface ClusterUpOptions extends UpOptions {
  clusters: number;
}

/** The ClusterSet file of cluster k (paths relative to it: the CA one level up, its identity beside it). */
export function renderClusterSet(k: number, clusters: number): string {
  const peers = Array.from({ length: clusters }, (_v, i) => i + 1)
    .filter((j) => j !== k)
    .map((j) => ({ clusterId: clusterName(j), url: `https://127.0.0.1:${peerEgressPort(k, j)}` }));
  return stringify({
    apiVersion: FSMN_MC_API_VERSION,
    kind: 'ClusterSet',
    spec: {
      clusterId: clusterName(k),
      listen: `127.0.0.1:${clustersetPort(k)}`,
      peers,
      caFile: '../ca.crt',
      certFile: 'cluster.crt',
      keyFile: 'cluster.key',
      clustersetCidr: '241.0.0.0/16',
      lease: '24h',
      gatewayPort: LAB_GATEWAY_PORT,
    },
  });
}

export function clusterControllerArgv(c: LabCluster): string[] {
  return [process.execPath, labCli(), 'controller', '--manifests', c.manifests, '--listen', c.controller.url.replace(/^https:\/\//, ''), '--state-dir', c.controller.stateDir, '--tokens', c.tokens, '--clusterset', c.clustersetFile, '--multicluster-dir', c.multiclusterDir];
}

export async function labUpClusters(opts: ClusterUpOptions, say: Say): Promise<LabState> {
  const started = Date.now();
  const count = validateClusterCount(opts.clusters);
  if (!existsSync(labCli()) || !existsSync(echoScript())) throw new LabError(`fsm-node is not built (${labCli()} missing): run npm run build:ts`);
  const proxy = chooseProxy(opts.proxy);
  refuseExisting(opts.dir);
  const ks = Array.from({ length: count }, (_v, i) => i + 1);
  const controlPorts = ks.flatMap((k) => [clusterControllerPort(k), clustersetPort(k), ...ks.filter((j) => j !== k).map((j) => peerEgressPort(k, j))]);
  const agentPorts = Array.from({ length: count * opts.nodes }, (_v, i) => AGENT_PORT_BASE + 1 + i);
  await assertPortsFree([...controlPorts, ...agentPorts], `${controlPorts.join(', ')} for the controllers and their clusterset relays and ${agentPorts[0]}-${agentPorts[agentPorts.length - 1]} for the agents`);
  if (!claimLabPointer(opts.dir)) throw new LabExistsError('another `lab up` claimed the lab at the same moment: run `fsm-node lab down` first');
  const f = labFiles(opts.dir);
  for (const d of [f.manifests, f.logs, f.controller, f.nodes, f.clusters]) rmSync(d, { recursive: true, force: true });
  for (const d of [f.logs, f.nodes, f.clusters]) mkdirSync(d, { recursive: true });
  if (proxy.kind === 'passthrough' && opts.proxy === 'auto') say(`!! ${proxy.note}; the cross-cluster data path needs Pipy, its checks are skipped`);
  else say(`proxy: ${proxy.note}`);
  if (await ensureBpffs()) say(`mounted bpffs at ${BPFFS_ROOT}`);
  writeFileSync(join(opts.dir, 'host-network.before'), await hostNetworkSnapshot());

  // Topologies, one per cluster, then the router joining their underlays.
  const topos: Topology[] = [];
  for (const k of ks) {
    const topo = await Topology.create({ prefix: clusterPrefix(LAB_PREFIX, k), nodes: opts.nodes, podsPerNode: 0, subnetBase: clusterSubnetBase(k) });
    topos.push(topo);
    let m = 0;
    for (const node of topo.nodes) for (let i = 0; i < opts.podsPerNode; i++) await topo.addPod(node, `${clusterName(k)}-p${++m}`);
  }
  const router = await createRouter(LAB_PREFIX, topos.map((t, i) => ({ index: i + 1, nodeNetns: t.nodes.map((n) => n.netns) })));
  say(`topology: ${count} clusters x ${opts.nodes} nodes x ${opts.podsPerNode} pods; underlays ${ks.map((k) => `${clusterName(k)} ${underlayCidr(clusterSubnetBase(k))}`).join(', ')} joined by router ${router.netns}`);

  const ctlRoot = join(cgroup2Root(), `${LAB_PREFIX}-ctl`);
  const clusters: LabCluster[] = ks.map((k) => {
    const name = clusterName(k);
    const dir = join(f.clusters, name);
    const base = clusterSubnetBase(k);
    const nodes = topos[k - 1]!.nodes.map((n) => `${name}-${n.name}`);
    return {
      name,
      index: k,
      subnetBase: base,
      underlayCidr: underlayCidr(base),
      routerIp: routerAddress(base),
      uplink: { netns: underlayNetnsName(clusterPrefix(LAB_PREFIX, k)), dev: UPLINK_DEV, routerNetns: routerNetnsName(LAB_PREFIX), routerDev: name },
      dir,
      manifests: join(dir, 'manifests'),
      multiclusterDir: join(dir, 'multicluster'),
      clustersetFile: join(dir, 'clusterset.yaml'),
      tokens: join(dir, 'tokens.json'),
      clustersetUrl: `https://127.0.0.1:${clustersetPort(k)}`,
      controller: { url: `https://127.0.0.1:${clusterControllerPort(k)}`, stateDir: join(dir, 'controller'), caFile: join(dir, 'controller', 'ca.crt') },
      nodes,
      gateways: gatewayNodes(nodes.map((n) => ({ name: n }))),
    };
  });
  let agentIndex = 0;
  const state: LabState = {
    version: 1,
    prefix: LAB_PREFIX,
    dir: opts.dir,
    createdAt: new Date().toISOString(),
    mode: opts.mode,
    proxy: proxy.kind,
    proxyNote: proxy.note,
    controllerCgroupRoot: ctlRoot,
    controller: clusters[0]!.controller,
    nodes: topos.flatMap((t, i) =>
      t.nodes.map((n) => {
        const name = `${clusters[i]!.name}-${n.name}`;
        return {
          name,
          index: n.index,
          netns: n.netns,
          gateway: n.gateway,
          underlayIp: n.underlayIp,
          podCidr: n.podCidr,
          podsCgroup: n.podsCgroup,
          proxyCgroup: n.proxyCgroup,
          bpffsDir: n.bpffsDir,
          stateDir: join(f.nodes, name, 'state'),
          tokenFile: join(f.nodes, name, 'token'),
          agentUrl: `http://127.0.0.1:${AGENT_PORT_BASE + 1 + agentIndex++}`,
          cluster: clusters[i]!.name,
        };
      }),
    ),
    pods: topos.flatMap((t, i) => t.nodes.flatMap((n) => n.pods.map((p, j) => ({ name: p.name, node: `${clusters[i]!.name}-${n.name}`, ip: p.ip, netns: p.netns, cgroupPath: p.cgroupPath, version: podVersion(j) })))),
    clusters,
    router,
  };
  writeLabState(state);

  // The clusterset: a CA made by the lab (in a real clusterset its key stays off the clusters) and one identity per cluster.
  const ca = await createClustersetCa('fsm-node lab clusterset');
  await writeFileAtomic(join(f.clusters, 'ca.key'), ca.keyPem, 0o600);
  await writeFileAtomic(join(f.clusters, 'ca.crt'), ca.certPem, 0o644);
  const ids = clusters.map((c) => c.name);
  for (const c of clusters) {
    const id = await issueClusterIdentity(ca, c.name);
    mkdirSync(c.dir, { recursive: true });
    await writeFileAtomic(join(c.dir, 'cluster.key'), id.keyPem, 0o600);
    await writeFileAtomic(join(c.dir, 'cluster.crt'), id.certPem, 0o644);
    // The cluster's mesh CA, an intermediate of the clusterset CA limited to its trust domain, where
    // the controller's built-in provider finds it: gateways of other clusters then trust its workloads.
    const meshCa = await issueMeshCa(ca, c.name);
    const meshCaDir = join(c.controller.stateDir, MESH_CA_DIR);
    mkdirSync(meshCaDir, { recursive: true });
    await writeFileAtomic(join(meshCaDir, 'ca.key'), meshCa.keyPem, 0o600);
    await writeFileAtomic(join(meshCaDir, 'ca.crt'), meshCa.certPem, 0o644);
    await writeFileAtomic(join(meshCaDir, 'trust.crt'), ca.certPem, 0o644);
    writeFileSync(c.clustersetFile, renderClusterSet(c.index, count));
    const nodes = state.nodes.filter((n) => n.cluster === c.name);
    const pods = state.pods.filter((p) => nodes.some((n) => n.name === p.node));
    const files = [
      ...[...renderClusterManifests({ cluster: c.name, clusters: ids, mode: opts.mode, nodes: nodes.map((n) => ({ name: n.name, address: n.underlayIp })), pods })].map(([p, t]) => [join(c.manifests, p), t] as const),
      ...[...renderClusterMulticluster({ cluster: c.name, clusters: ids })].map(([p, t]) => [join(c.multiclusterDir, p), t] as const),
    ];
    for (const [path, text] of files) {
      mkdirSync(dirname(path), { recursive: true });
      writeFileSync(path, text);
    }
    const tokens = generateTokens(nodes.map((n) => n.name));
    await writeTokensFile(c.tokens, tokens);
    for (const n of nodes) {
      mkdirSync(dirname(n.tokenFile), { recursive: true });
      writeFileSync(n.tokenFile, `${tokens[n.name]}\n`, { mode: 0o600 });
    }
  }
  say(`clusterset: CA ${join(f.clusters, 'ca.crt')}; per cluster a ClusterSet file, manifests and multicluster/ (${CLUSTER_SERVICE.name}.${LAB_NAMESPACE} exported from every cluster, GlobalTrafficPolicy FailOver) in ${f.clusters}/<cluster>`);

  for (const pod of state.pods) {
    pod.server = startDetached(pod.cgroupPath, pod.netns, [process.execPath, echoScript(), 'serve', '--name', pod.name, '--port', String(ECHO_PORT)], join(f.logs, `pod-${pod.name}.log`));
  }
  writeLabState(state);
  await Promise.all(state.pods.map((pod) => waitFor(`echo server in pod ${pod.name}`, 10_000, processDied(pod.server), async () => (readFileSync(pod.server!.log, 'utf8').includes('"listening"') ? true : undefined))));
  say(`workloads: ${state.pods.length} echo servers on :${ECHO_PORT} (${state.pods.map((p) => `${p.name}@${p.node}=${p.ip}`).join(' ')})`);

  // The clusterset's control path over the uplinks: one relay per cluster (relay.ts), then one controller per cluster.
  await createCgroup(ctlRoot);
  for (const c of clusters) {
    const cg = join(ctlRoot, `relay-${c.name}`);
    await createCgroup(cg);
    const egress = ks.filter((j) => j !== c.index).map((j) => `${peerEgressPort(c.index, j)}=${clustersetIngress(j)}`);
    c.relay = startDetached(cg, undefined, relayArgv({ netns: c.uplink.netns, ingress: clustersetIngress(c.index), controllerPort: clustersetPort(c.index), egress }), join(f.logs, `relay-${c.name}.log`));
  }
  writeLabState(state);
  await Promise.all(clusters.map((c) => waitFor(`clusterset relay of ${c.name}`, 10_000, processDied(c.relay), async () => (readFileSync(c.relay!.log, 'utf8').includes('"ready"') ? true : undefined))));
  for (const c of clusters) {
    const cg = join(ctlRoot, `controller-${c.name}`);
    await createCgroup(cg);
    c.controller.process = startDetached(cg, undefined, clusterControllerArgv(c), join(f.logs, `controller-${c.name}.log`));
  }
  state.controller = clusters[0]!.controller;
  writeLabState(state);
  await Promise.all(
    clusters.map((c) =>
      waitFor(`controller of ${c.name}`, READY_TIMEOUT_MS, processDied(c.controller.process), async () => (existsSync(c.controller.caFile) ? httpsReady(c.controller.url, readFileSync(c.controller.caFile, 'utf8')) : undefined)),
    ),
  );
  for (const c of clusters) say(`controller ${c.name}: ${c.controller.url} (pid ${c.controller.process?.pid}), clusterset ${c.clustersetUrl} (peers reach it at ${clustersetIngress(c.index)} over the uplink), watching ${c.manifests} and ${c.multiclusterDir}`);

  const supervisor = await startAgents(state, ctlRoot);
  say(`agents: ${state.nodes.length} ready, run by the lab supervisor (pid ${supervisor.pid})`);

  // The clusterset has formed when every cluster imports echo from every cluster.
  await Promise.all(
    clusters.map((c) =>
      waitFor(`cluster ${c.name} to import ${CLUSTER_SERVICE.name}.${LAB_NAMESPACE} from every cluster`, READY_TIMEOUT_MS, processDied(c.controller.process), async () => {
        const imp = readClusterStatus(c)?.imports.find((i) => i.name === CLUSTER_SERVICE.name && i.namespace === LAB_NAMESPACE);
        return imp && ids.every((id) => imp.clusters.includes(id)) && imp.ips.length > 0 ? true : undefined;
      }),
    ),
  );
  say(`clusterset: ${clusters.map((c) => `${c.name} imports ${CLUSTER_SERVICE.name}.${LAB_NAMESPACE} at ${readClusterStatus(c)?.imports.find((i) => i.name === CLUSTER_SERVICE.name)?.ips[0] ?? '?'}`).join(', ')}`);
  say(`lab up in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return state;
}

/** The table after `lab up --clusters N`: one row per node, then one line per cluster. */
export function renderClusterSummary(state: LabState, modes: Record<string, string>, supervisor: SupervisorStatus | undefined = readSupervisorStatus(state.dir)): string[] {
  const rows = [['CLUSTER', 'NODE', 'MODE', 'GATEWAY', 'PODS', 'AGENT', 'RESTARTS']];
  for (const n of state.nodes) {
    const c = state.clusters?.find((x) => x.name === n.cluster);
    const pods = state.pods.filter((p) => p.node === n.name).map((p) => `${p.name}=${p.ip}`).join(' ');
    rows.push([n.cluster ?? '-', n.name, modes[n.name] ?? '?', c?.gateways.includes(n.name) ? `yes (${n.underlayIp}:${LAB_GATEWAY_PORT})` : 'no', pods || '-', n.agentUrl, String(supervisor?.agents[n.name]?.restarts ?? '?')]);
  }
  const widths = rows[0]!.map((_c, i) => Math.max(...rows.map((r) => r[i]!.length)));
  const lines = rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd());
  lines.push('');
  for (const c of state.clusters ?? []) {
    const imp = readClusterStatus(c)?.imports.find((i) => i.name === CLUSTER_SERVICE.name && i.namespace === LAB_NAMESPACE);
    lines.push(
      `${c.name}: underlay ${c.underlayCidr} (uplink to ${c.uplink.routerNetns} at ${c.routerIp}); controller ${c.controller.url}, clusterset ${c.clustersetUrl}; ${CLUSTER_SERVICE.name}.${LAB_NAMESPACE} clusterset IP ${imp?.ips[0] ?? '-'} tiers ${imp ? imp.tiers.map((t) => t.join('+')).join(' > ') : '-'}`,
    );
  }
  const client = state.pods.find((p) => p.node.startsWith(`${state.clusters?.[state.clusters.length - 1]?.name}-`)) ?? state.pods[0];
  const ip = state.clusters?.length ? readClusterStatus(state.clusters[state.clusters.length - 1]!)?.imports[0]?.ips[0] : undefined;
  lines.push(
    '',
    `proxy: ${state.proxy}${state.proxy === 'passthrough' ? ' (L4, no policy: the cross-cluster data path needs Pipy)' : ''}; logs in ${labFiles(state.dir).logs}`,
    'next:',
    '  fsm-node lab check                     each cluster\'s service, then cross-cluster policies and failover',
    '  fsm-node lab status --json             clusters, nodes, pods, services, imports with their clusterset IPs',
    `  fsm-node lab exec ${client?.name ?? 'c2-p1'} -- node ${echoScript()} get http://${ip ?? '<clusterset IP>'}:${ECHO_PORT}/`,
    `  edit ${labFiles(state.dir).clusters}/<cluster>/multicluster/policy.yaml (Locality, ActiveActive, FailOver)`,
    '  fsm-node lab link c1 --down            cut c1\'s uplink (--up restores it)',
    '  fsm-node lab down                      stop everything and verify nothing is left',
  );
  return lines;
}
