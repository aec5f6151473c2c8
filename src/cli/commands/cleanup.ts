import { NotImplementedError } from '../../errors.js';
import type { Command } from '../command.js';

export const cleanupCommand: Command = {
  name: 'cleanup',
  summary: 'remove everything fsm-node installed on this node (BPF links, maps, pins, chains, sets, proxy)',
  usage: ['[--bpffs-dir DIR] [--state-dir DIR] [--dry-run]'],
  help: `
The explicit way to take a node out of the mesh: detaches and unpins every
BPF object under --bpffs-dir, removes every iptables chain, jump rule and ipset
with the fsm-node prefix, stops the shared proxy, and prints what it removed.
Nothing of anyone else's is touched. Run it from the uninstall Job.`,
  options: {
    'bpffs-dir': { type: 'string', valueName: 'DIR', default: '/sys/fs/bpf/fsm-node', description: 'bpffs directory of the eBPF dataplane.' },
    'state-dir': { type: 'string', valueName: 'DIR', default: '/var/lib/fsm-node', description: 'Agent state directory.' },
    'dry-run': { type: 'boolean', description: 'Only list what would be removed.' },
  },
  async run() {
    throw new NotImplementedError('fsm-node cleanup');
  },
};
