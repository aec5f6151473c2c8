import { uninstall as uninstallCni } from '../../cni/install.js';
import { createDataplane } from '../../dataplane/index.js';
import { errorMessage } from '../../errors.js';
import { ProxySupervisor } from '../../proxy/supervisor.js';
import type { Command } from '../command.js';

export const cleanupCommand: Command = {
  name: 'cleanup',
  summary: 'remove everything fsm-node installed on this node (BPF links, maps, pins, chains, sets, proxy)',
  usage: ['[--bpffs-dir DIR] [--state-dir DIR] [--proxy-cgroup PATH] [--cni-conf-dirs DIR,DIR --cni-bin-dir DIR] [--netns NAME]'],
  help: `
The explicit way to take a node out of the mesh: detaches and unpins every
BPF object under --bpffs-dir, removes every iptables chain, jump rule and ipset
with the fsm-node prefix, stops the shared proxy (when --proxy-cgroup names its
cgroup, which proves the pid in the state directory is ours), takes the
fsm-node-cni plugin out of the CNI chain in --cni-conf-dirs (every conflist
left byte for byte as before the install) and its binary out of --cni-bin-dir,
and prints what it removed. Nothing of anyone else's is touched. Run it from the uninstall Job.
Exit 1 when something could not be removed.`,
  options: {
    'bpffs-dir': { type: 'string', valueName: 'DIR', default: '/sys/fs/bpf/fsm-node', description: 'bpffs directory of the eBPF dataplane.' },
    'state-dir': { type: 'string', valueName: 'DIR', default: '/var/lib/fsm-node', description: 'Agent state directory.' },
    'proxy-cgroup': { type: 'string', valueName: 'PATH', description: "The proxy's cgroup v2 directory (to stop the proxy)." },
    'cni-conf-dirs': { type: 'string', valueName: 'DIR,DIR', description: 'CNI conf directories to take the fsm-node-cni plugin out of (as given to the agent).' },
    'cni-bin-dir': { type: 'string', valueName: 'DIR', default: '/opt/cni/bin', description: 'Where the agent installed the plugin binary.' },
    netns: { type: 'string', valueName: 'NAME', description: 'Lab only: network namespace that plays the node.' },
  },
  async run(values) {
    const site = {
      stateDir: String(values['state-dir']),
      bpffsDir: String(values['bpffs-dir']),
      podsCgroup: '',
      proxyCgroup: String(values['proxy-cgroup'] ?? ''),
      ...(values.netns ? { netns: String(values.netns) } : {}),
    };
    let failed = false;
    for (const mode of ['ebpf', 'iptables'] as const) {
      const dp = createDataplane(mode, site);
      try {
        const report = await dp.cleanup();
        for (const r of report.removed) console.log(`${mode}: removed ${r}`);
        if (report.removed.length === 0) console.log(`${mode}: nothing installed`);
      } catch (err) {
        failed = true;
        console.error(`${mode}: cleanup failed: ${errorMessage(err)}`);
      } finally {
        await dp.close();
      }
    }
    if (typeof values['cni-conf-dirs'] === 'string') {
      // Before the proxy: from here on new pods are created without the plugin.
      try {
        const removed = uninstallCni({ confDirs: values['cni-conf-dirs'].split(',').filter(Boolean), binDir: String(values['cni-bin-dir']) });
        for (const r of removed) console.log(`cni: removed ${r}`);
        if (removed.length === 0) console.log('cni: nothing installed');
      } catch (err) {
        failed = true;
        console.error(`cni: uninstall failed: ${errorMessage(err)}`);
      }
    }
    if (values['proxy-cgroup']) {
      const proxy = new ProxySupervisor({ kind: 'passthrough', stateDir: site.stateDir, cgroup: site.proxyCgroup, address: '0.0.0.0', outboundPort: 15001, inboundPort: 15003 });
      console.log((await proxy.stop()) ? 'proxy: stopped' : 'proxy: not running');
    }
    return failed ? 1 : 0;
  },
};
