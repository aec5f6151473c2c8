import { NotImplementedError } from '../../errors.js';
import type { Command } from '../command.js';

export const agentCommand: Command = {
  name: 'agent',
  summary: 'run the node agent: interception dataplane, shared proxy supervisor, policy client, HTTP API',
  usage: ['--node NAME --controller URL [--mode auto|ebpf|iptables] [options]'],
  help: `
Runs on every node (the DaemonSet). Pulls the node's policy from the controller
(or starts from the last good copy in --state-dir when the controller is
unreachable), intercepts the TCP traffic of the node's mesh pods with eBPF or
iptables, supervises the shared Pipy proxy and serves /healthz, /readyz,
/metrics and /v1/state on --listen.

SIGTERM stops the agent but leaves the dataplane and the proxy in place, so
traffic keeps flowing; \`fsm-node cleanup\` removes everything.`,
  options: {
    node: { type: 'string', valueName: 'NAME', description: 'Kubernetes node name this agent serves (env NODE_NAME).' },
    controller: { type: 'string', valueName: 'URL', description: 'Controller base URL, e.g. https://fsm-node-controller.fsm-system:15443.' },
    mode: { type: 'string', valueName: 'MODE', default: 'auto', description: 'Interception mode when neither the Node label nor the mesh sets one: auto, ebpf or iptables.' },
    'state-dir': { type: 'string', valueName: 'DIR', default: '/var/lib/fsm-node', description: 'Where the last good policy, the chosen mode and backend are kept.' },
    'bpffs-dir': { type: 'string', valueName: 'DIR', default: '/sys/fs/bpf/fsm-node', description: 'bpffs directory the eBPF dataplane pins its maps, programs and links under.' },
    'pods-cgroup': { type: 'string', valueName: 'PATH', description: 'cgroup v2 directory that contains all pods (default: the kubepods cgroup).' },
    listen: { type: 'string', valueName: 'HOST:PORT', default: '0.0.0.0:15900', description: 'Agent HTTP API (healthz, readyz, metrics, state).' },
    'print-config': { type: 'boolean', description: 'Print the effective configuration and exit.' },
  },
  async run() {
    throw new NotImplementedError('fsm-node agent');
  },
};
