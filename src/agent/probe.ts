import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { errorMessage } from '../errors.js';
import { run } from '../util/exec.js';
import { bpfObjectDir } from '../util/paths.js';
import type { ModeSupport } from './mode.js';

/**
 * What this node can do, found by trying rather than by version guessing: the
 * project's own BPF objects are loaded into the kernel (and closed again), the
 * iptables and ipset tools are run read-only. The report is shown by
 * `fsm-node status`, exported as metrics, and decides the interception mode.
 */
export interface ProbeCheck {
  name: string;
  ok: boolean;
  detail: string;
  /** Which mode needs this check to pass. */
  neededBy: Array<'ebpf' | 'iptables'>;
}

export interface ProbeReport {
  platform: { arch: string; kernel: string; distro: string; release: string; cpus: number; memTotalBytes: number };
  checks: ProbeCheck[];
  support: ModeSupport;
  probedAt: string;
}

export interface ProbeOptions {
  /** Network namespace to run the iptables checks in (the lab's node); host when absent. */
  netns?: string;
  /** Directory of the BPF objects to probe-load (default: bpf/build). */
  objectDir?: string;
  /** Mount table to read (tests pass a fixture). */
  procMounts?: string;
}

export async function probe(opts: ProbeOptions = {}): Promise<ProbeReport> {
  // Loaded on use: the agent probes rarely and should not carry the module's ~10 MiB between probes.
  const { default: si } = await import('systeminformation');
  const [os, cpu, mem] = await Promise.all([si.osInfo(), si.cpu(), si.mem()]);
  const mounts = opts.procMounts ?? readFileSync('/proc/mounts', 'utf8');
  const checks: ProbeCheck[] = [
    mountCheck('cgroup2', mounts, 'cgroup2', 'cgroup v2 is not mounted (the eBPF dataplane attaches to cgroup v2 directories)'),
    mountCheck('bpffs', mounts, 'bpf', 'no bpffs mount (mount -t bpf bpf /sys/fs/bpf) to pin maps, programs and links'),
    {
      name: 'btf',
      neededBy: [],
      ok: existsSync('/sys/kernel/btf/vmlinux'),
      detail: existsSync('/sys/kernel/btf/vmlinux') ? '/sys/kernel/btf/vmlinux' : 'kernel BTF absent (not required: the programs use only UAPI contexts)',
    },
    ...(await bpfLoadChecks(opts.objectDir ?? bpfObjectDir())),
    await toolCheck('iptables', opts.netns, ['iptables', '--version']),
    await toolCheck('ipset', opts.netns, ['ipset', 'list', '-n']),
  ];
  return {
    platform: { arch: os.arch, kernel: os.kernel, distro: os.distro, release: os.release, cpus: cpu.cores, memTotalBytes: mem.total },
    checks,
    support: supportFrom(checks),
    probedAt: new Date().toISOString(),
  };
}

/** The first failing check each mode needs, as the reason that mode cannot run. */
export function supportFrom(checks: ProbeCheck[]): ModeSupport {
  const support: ModeSupport = {};
  for (const mode of ['ebpf', 'iptables'] as const) {
    const failed = checks.find((c) => !c.ok && c.neededBy.includes(mode));
    if (failed) support[mode] = `${failed.name}: ${failed.detail}`;
  }
  return support;
}

export function mountCheck(name: string, mounts: string, fsType: string, missing: string): ProbeCheck {
  const points = mounts
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[2] === fsType)
    .map((f) => f[1]!);
  return { name, neededBy: ['ebpf'], ok: points.length > 0, detail: points.length ? points.join(', ') : missing };
}

/** Load every project BPF object (all program and map types the dataplane uses), then close it. */
async function bpfLoadChecks(dir: string): Promise<ProbeCheck[]> {
  const objects = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.o')).sort() : [];
  if (objects.length === 0) {
    return [{ name: 'bpf-objects', neededBy: ['ebpf'], ok: false, detail: `no BPF objects in ${dir} (run npm run build:bpf)` }];
  }
  let ObjectSpec: typeof import('../ebpf/index.js').ObjectSpec;
  try {
    ({ ObjectSpec } = await import('../ebpf/index.js'));
  } catch (err) {
    return [{ name: 'bpf-objects', neededBy: ['ebpf'], ok: false, detail: `libbpf addon unavailable: ${errorMessage(err)}` }];
  }
  return objects.map((file): ProbeCheck => {
    const name = `bpf-load:${file.replace(/\.o$/, '')}`;
    try {
      const spec = ObjectSpec.fromFile(join(dir, file));
      const programs = [...spec.programs.values()].map((p) => p.section);
      spec.load().close();
      return { name, neededBy: ['ebpf'], ok: true, detail: `loaded ${programs.join(', ')}` };
    } catch (err) {
      return { name, neededBy: ['ebpf'], ok: false, detail: errorMessage(err).split('\n')[0]! };
    }
  });
}

async function toolCheck(name: string, netns: string | undefined, argv: string[]): Promise<ProbeCheck> {
  const [cmd, args] = netns ? ['ip', ['netns', 'exec', netns, ...argv]] : [argv[0]!, argv.slice(1)];
  try {
    const r = await run(cmd, args);
    return { name, neededBy: ['iptables'], ok: true, detail: (r.stdout.split('\n')[0] || 'ok').trim() };
  } catch (err) {
    return { name, neededBy: ['iptables'], ok: false, detail: errorMessage(err).split('\n')[0]! };
  }
}
