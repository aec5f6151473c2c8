import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { Agent } from '../../agent/agent.js';
import { listFields, loadAgentConfig, proxyRunAs, type AgentConfig } from '../../agent/config.js';
import { probe } from '../../agent/probe.js';
import { createDataplane } from '../../dataplane/index.js';
import { controllerIssuer, IdentityManager } from '../../identity/agent-certs.js';
import { unreachableFor } from '../../identity/key-files.js';
import { InvalidInputError } from '../../errors.js';
import { PolicyClient } from '../../policy/client.js';
import { cgroupResolver, desiredState } from '../../policy/desired.js';
import { renderProxyConfig } from '../../proxy/config.js';
import { writeGatewayCertificates } from '../../gateway/certificates.js';
import { ProxySupervisor } from '../../proxy/supervisor.js';
import { DEFAULT_TRUST, type NodePolicy } from '../../policy/schema.js';
import { cgroup2Root } from '../../util/cgroup.js';
import { logger } from '../../util/log.js';
import type { Command, ParsedValues } from '../command.js';

const log = logger('cli.agent');

const notConfig = new Set(['help', 'print-config', 'config', 'no-fast-path']);

/** Flags (kebab-case) -> config fields (camelCase); only the ones given. */
function flagsToConfig(values: ParsedValues): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(values)) {
    if (v === undefined || notConfig.has(k)) continue;
    const field = k.replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase());
    out[field] = listFields.has(field) && typeof v === 'string' ? v.split(',').filter(Boolean) : v;
  }
  if (values['no-fast-path']) out.fastPath = false;
  return out;
}

export function buildAgent(config: AgentConfig): Agent {
  const site = { stateDir: config.stateDir, bpffsDir: config.bpffsDir, podsCgroup: config.podsCgroup, proxyCgroup: config.proxyCgroup, fastPath: config.fastPath, ...(config.netns ? { netns: config.netns } : {}) };
  const facts = {
    proxy: { address: config.proxyAddress, outboundPort: config.outboundPort, inboundPort: config.inboundPort, cgroupPath: config.proxyCgroup },
    nodeAddresses: config.nodeAddresses,
    cgroupPathFor: cgroupResolver(cgroup2Root()),
  };
  const ca = readFileSync(config.caFile);
  const client = new PolicyClient({ url: config.controller, node: config.node, ca, tokenFile: config.tokenFile, stateDir: config.stateDir });
  const issuer = controllerIssuer({ url: config.controller, node: config.node, ca, token: () => readFileSync(config.tokenFile, 'utf8').trim() });
  // The proxy's config renders from the agent's IdentityManager, made inside the Agent.
  let identities: IdentityManager | undefined;
  // A proxy with its own uid reads its keys as their owner (0600), nobody else can.
  const runAs = proxyRunAs(config);
  const blocked = runAs && unreachableFor(config.stateDir, runAs);
  if (blocked) {
    throw new InvalidInputError('--proxy-user / FSMN_PROXY_USER', config.proxyUser, `the proxy's user cannot reach --state-dir ${config.stateDir}: ${blocked.dir} is mode ${blocked.mode} (it needs to traverse it to read its configuration and keys; chmod o+x ${blocked.dir}, or leave the setting out)`);
  }
  const agent: Agent = new Agent(config, {
    policy: client,
    reportMode: (status) => client.reportStatus(status),
    identities: (o) => (identities = new IdentityManager({ stateDir: config.stateDir, issuer, ...(runAs ? { owner: runAs } : {}), ...o })),
    probe: () => probe(config.netns ? { netns: config.netns } : {}),
    dataplane: (mode) => createDataplane(mode, site),
    render: (policy) => desiredState(policy, facts),
    proxy: new ProxySupervisor({
      kind: config.proxy,
      stateDir: config.stateDir,
      cgroup: config.proxyCgroup,
      address: config.proxyAddress,
      outboundPort: config.outboundPort,
      inboundPort: config.inboundPort,
      failurePolicy: config.failurePolicy,
      ...(runAs ? { runAs } : {}),
      ...(config.proxy === 'pipy'
        ? { pipy: { threadCap: config.proxyThreadCap, ...(config.proxyInstances !== undefined ? { instances: config.proxyInstances } : {}), ...(config.proxyReload ? { reload: config.proxyReload } : {}) } }
        : {}),
      ...(config.proxyDrainSeconds !== undefined ? { drainMs: config.proxyDrainSeconds * 1000 } : {}),
      ...(config.netns ? { netns: config.netns } : {}),
    }),
    ...(config.proxy === 'pipy'
      ? {
          // Tunnels are always mutual TLS (an empty bundle refuses them): trust from the policy, keys by path.
          proxyConfig: (policy: NodePolicy) =>
            renderProxyConfig(policy, {
              outboundPort: config.outboundPort,
              inboundPort: config.inboundPort,
              trust: policy.trust ?? DEFAULT_TRUST,
              identities: Object.fromEntries(identities?.snapshot() ?? []),
              gatewayCertificates: writeGatewayCertificates(join(config.stateDir, 'gateway-certs'), policy),
            }),
        }
      : {}),
  });
  return agent;
}

export const agentCommand: Command = {
  name: 'agent',
  summary: 'run the node agent: interception dataplane, shared proxy supervisor, policy client, HTTP API',
  usage: ['--node NAME --controller URL --ca-file PEM --token-file FILE --pods-cgroup PATH --proxy-cgroup PATH --proxy-address IP [options]'],
  help: `
Runs on every node (the DaemonSet). Pulls the node's policy from the controller
(or starts from the last good copy in --state-dir when the controller is
unreachable), intercepts the TCP traffic of the node's mesh pods with eBPF or
iptables, supervises the shared proxy and serves /healthz, /readyz, /metrics
and /v1/state on --listen.

Every option can also come from the environment (FSMN_<OPTION>, e.g.
FSMN_POD_CGROUP... see --print-config) or a YAML file (--config); flags win
over the environment, which wins over the file. NODE_NAME fills --node.

SIGTERM stops the agent but leaves the dataplane and the proxy in place, so
traffic keeps flowing; \`fsm-node cleanup\` removes everything.`,
  options: {
    config: { type: 'string', valueName: 'FILE', description: 'YAML or JSON file with agent settings (camelCase keys).' },
    node: { type: 'string', valueName: 'NAME', description: 'Kubernetes node name this agent serves (env NODE_NAME).' },
    controller: { type: 'string', valueName: 'URL', description: 'Controller base URL, e.g. https://fsm-node-controller.fsm-system:15443.' },
    'ca-file': { type: 'string', valueName: 'PEM', description: "CA certificate that signed the controller's serving certificate." },
    'token-file': { type: 'string', valueName: 'FILE', description: 'Bearer token binding this agent to its node (re-read before every request).' },
    mode: { type: 'string', valueName: 'MODE', description: 'Interception mode when neither the Node label nor the mesh sets one: auto, ebpf or iptables (default auto).' },
    'state-dir': { type: 'string', valueName: 'DIR', description: 'Last good policy, chosen mode and backend, proxy pid (default /var/lib/fsm-node).' },
    'bpffs-dir': { type: 'string', valueName: 'DIR', description: 'bpffs directory for pinned maps, programs and links (default /sys/fs/bpf/fsm-node).' },
    'pods-cgroup': { type: 'string', valueName: 'PATH', description: 'cgroup v2 directory containing all pods (the kubepods cgroup).' },
    'proxy-cgroup': { type: 'string', valueName: 'PATH', description: 'cgroup v2 directory the shared proxy runs in (never intercepted).' },
    'proxy-address': { type: 'string', valueName: 'IP', description: 'Node address pods reach the proxy on.' },
    'node-addresses': { type: 'string', valueName: 'IP,IP', description: "The node's own addresses (never redirected)." },
    'outbound-port': { type: 'string', valueName: 'PORT', description: 'Proxy outbound listener (default 15001).' },
    'inbound-port': { type: 'string', valueName: 'PORT', description: 'Proxy inbound/tunnel listener (default 15003).' },
    proxy: { type: 'string', valueName: 'KIND', description: 'pipy (default) or passthrough (L4 test proxy, no policy).' },
    'no-fast-path': { type: 'boolean', description: 'Do not use the sockmap/sk_msg same-node fast path.' },
    'failure-policy': { type: 'string', valueName: 'POLICY', description: 'While the proxy crash-loops: fail-closed (default; keep redirecting, connections fail — right for strict meshes) or fail-open (stop redirecting until it is back — permissive meshes).' },
    'proxy-thread-cap': { type: 'string', valueName: 'N', description: 'At most N Pipy worker threads in all (default 4; one per CPU below that), split among the proxy instances.' },
    'proxy-instances': { type: 'string', valueName: 'N', description: 'Pipy processes sharing the proxy ports with SO_REUSEPORT (default 2): a crash of one fails no new connection while it is restarted; 1 saves one Pipy (about 14 MB).' },
    'proxy-reload': { type: 'string', valueName: 'MODE', description: 'How a policy change reaches the proxy: handover (default; new Pipy instances with the new config beside the old, which answer the requests they have in flight, then exit) or signal (SIGHUP, in place, no process start, but Pipy resets requests in flight).' },
    'proxy-drain-seconds': { type: 'string', valueName: 'N', description: 'How long a retiring proxy instance may answer what it has in flight before its connections are closed (hand-over, upgrade, node shutdown; default 10). Long-lived connections (MQTT, TCP) are closed at this deadline.' },
    'proxy-user': { type: 'string', valueName: 'UID[:GID]', description: 'Run the proxy as this user with only CAP_NET_ADMIN (FSM uses 1500); key files become that uid\'s, mode 0600. Default: as the agent runs.' },
    'cni-socket': { type: 'string', valueName: 'PATH', description: 'Enrol pods at creation: unix socket the fsm-node-cni plugin relays CNI requests to (the DaemonSet: /run/fsm-node-cni/cni.sock; docs/deploy.md).' },
    'cni-spool': { type: 'string', valueName: 'DIR', description: 'Where the plugin leaves requests while the agent is away; replayed when it is back (default /run/fsm-node-cni/spool).' },
    'cni-failure-policy': { type: 'string', valueName: 'POLICY', description: 'The plugin when the agent is unreachable: fail-closed (pod creation fails, kubelet retries), fail-open (the pod starts, enrolled later) or auto (default: fail-closed in strict meshes).' },
    'cni-conf-dirs': { type: 'string', valueName: 'DIR,DIR', description: 'CNI conf directories to chain the plugin into and keep it there, e.g. /etc/cni/net.d,/var/lib/rancher/k3s/agent/etc/cni/net.d (default: none).' },
    'cni-bin-dir': { type: 'string', valueName: 'DIR', description: 'Where the plugin binary is installed (default /opt/cni/bin).' },
    netns: { type: 'string', valueName: 'NAME', description: 'Lab only: network namespace that plays the node.' },
    listen: { type: 'string', valueName: 'HOST:PORT', description: 'Agent HTTP API (default 0.0.0.0:15900).' },
    'print-config': { type: 'boolean', description: 'Print the effective configuration and exit.' },
  },
  async run(values) {
    const config = loadAgentConfig(flagsToConfig(values), process.env, values.config as string | undefined);
    if (values['print-config']) {
      process.stdout.write(JSON.stringify(config, null, 2) + '\n');
      return 0;
    }
    const agent = buildAgent(config);
    await agent.start();
    await new Promise<void>((resolve) => {
      const stop = (sig: string) => {
        log.info({ signal: sig }, 'stopping');
        resolve();
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });
    await agent.stop();
    return 0;
  },
};
