import { NotImplementedError } from '../../errors.js';
import type { Command } from '../command.js';

export const statusCommand: Command = {
  name: 'status',
  summary: "show the local agent's mode (and why), probe report, enrolled pods, policy version and proxy state",
  usage: ['[--agent URL] [--json]'],
  help: `
Asks the agent on this node (its /v1/state endpoint on loopback) and prints a
summary table, or the raw state with --json for scripts. Says so clearly when
no agent answers.`,
  options: {
    agent: { type: 'string', valueName: 'URL', default: 'http://127.0.0.1:15900', description: 'Agent HTTP API to ask.' },
    json: { type: 'boolean', description: 'Print machine-readable JSON.' },
  },
  async run() {
    throw new NotImplementedError('fsm-node status');
  },
};
