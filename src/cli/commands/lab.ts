import { NotImplementedError } from '../../errors.js';
import { oneOf, type Command } from '../command.js';

const verbs = ['up', 'check', 'exec', 'down', 'selfcheck'] as const;

export const labCommand: Command = {
  name: 'lab',
  summary: 'a real multi-node mesh in a box: network namespaces as nodes and pods, real agents and proxies',
  usage: [
    'up [--nodes N] [--pods-per-node M] [--mode auto|ebpf|iptables] [--proxy auto|pipy|passthrough] [--dir DIR]',
    'check [--json]',
    'exec POD -- CMD...',
    'down',
    'selfcheck',
  ],
  help: `
Needs root, cgroup v2 and bpffs. Every object the lab makes is named with the
prefix "fsmlab" (network namespaces, cgroups, bpffs directories) and \`lab down\`
removes them all, also after a crash.

  selfcheck  builds 2 nodes x 2 pods, checks TCP between every pair (same node
             and across nodes), tears it down and verifies nothing is left.`,
  options: {
    nodes: { type: 'string', valueName: 'N', default: '2', description: 'Number of nodes (lab up).' },
    'pods-per-node': { type: 'string', valueName: 'M', default: '2', description: 'Pods per node (lab up).' },
    mode: { type: 'string', valueName: 'MODE', default: 'auto', description: 'Interception mode of every node: auto, ebpf or iptables.' },
    proxy: { type: 'string', valueName: 'PROXY', default: 'auto', description: 'auto (Pipy when found), pipy, or passthrough (L4 test proxy, no policy).' },
    dir: { type: 'string', valueName: 'DIR', default: '/var/tmp/fsm-node-lab', description: 'Lab directory: manifests, state, logs.' },
    json: { type: 'boolean', description: 'Machine-readable output (lab check).' },
  },
  positionals: true,
  async run(_values, positionals) {
    const verb = oneOf('verb', positionals[0], verbs);
    if (verb === 'selfcheck') {
      const { topologySelfCheck } = await import('../../lab/selfcheck.js');
      const result = await topologySelfCheck();
      for (const line of result.lines) console.log(line);
      return result.ok ? 0 : 1;
    }
    throw new NotImplementedError(`fsm-node lab ${verb}`);
  },
};
