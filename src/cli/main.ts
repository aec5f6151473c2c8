import { FsmNodeError, InvalidInputError, errorMessage } from '../errors.js';
import { parseCommandArgs, renderHelp, type Command } from './command.js';
import { agentCommand } from './commands/agent.js';
import { cleanupCommand } from './commands/cleanup.js';
import { clustersetCommand } from './commands/clusterset.js';
import { controllerCommand } from './commands/controller.js';
import { labCommand } from './commands/lab.js';
import { modeCommand } from './commands/mode.js';
import { statusCommand } from './commands/status.js';

export const commands: Command[] = [agentCommand, controllerCommand, labCommand, statusCommand, modeCommand, cleanupCommand, clustersetCommand];

export function topHelp(): string {
  const width = Math.max(...commands.map((c) => c.name.length)) + 2;
  return [
    'fsm-node — node-level service-mesh data plane for edge Kubernetes',
    '',
    'Usage: fsm-node <command> [options]      fsm-node <command> --help',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    '',
    'One agent per node intercepts mesh pods with eBPF or iptables (chosen per node)',
    'and sends their TCP traffic through one shared Pipy proxy; a small controller',
    'serves each node its policy. Start with `fsm-node lab up` to see it work.',
    '',
  ].join('\n');
}

/** Exit codes: 0 ok, 1 the command failed, 2 bad usage, 3 not implemented yet. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(topHelp());
    return name === undefined ? 2 : 0;
  }
  const cmd = commands.find((c) => c.name === name);
  try {
    if (!cmd) throw new InvalidInputError('command', name, `unknown; one of ${commands.map((c) => c.name).join(', ')} (fsm-node --help)`);
    const { values, positionals } = parseCommandArgs(cmd, rest);
    if (values.help) {
      process.stdout.write(renderHelp(cmd));
      return 0;
    }
    return await cmd.run(values, positionals);
  } catch (err) {
    process.stderr.write(`fsm-node: ${errorMessage(err)}\n`);
    if (err instanceof FsmNodeError) {
      if (err.code === 'FSMN_ERR_INVALID_INPUT') return 2;
      if (err.code === 'FSMN_ERR_NOT_IMPLEMENTED') return 3;
    }
    return 1;
  }
}
