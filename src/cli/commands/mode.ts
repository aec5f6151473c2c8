import { NotImplementedError } from '../../errors.js';
import { oneOf, type Command } from '../command.js';

export const modeCommand: Command = {
  name: 'mode',
  summary: "get or set a node's interception mode (ebpf, iptables or auto)",
  usage: ['get [--node NAME]', 'set ebpf|iptables|auto [--node NAME]'],
  help: `
In a cluster, \`set\` patches the Node label flomesh.io/interception-mode and the
node's agent switches live (make-before-break); \`get\` shows desired and
effective mode with the reason for any fallback. In the lab it talks to that
node's agent.`,
  options: {
    node: { type: 'string', valueName: 'NAME', description: 'Node to act on (default: this node).' },
  },
  positionals: true,
  async run(_values, positionals) {
    const verb = oneOf('verb', positionals[0], ['get', 'set'] as const);
    if (verb === 'set') oneOf('mode', positionals[1], ['ebpf', 'iptables', 'auto'] as const);
    throw new NotImplementedError(`fsm-node mode ${verb}`);
  },
};
