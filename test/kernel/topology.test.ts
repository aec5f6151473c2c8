import { existsSync, readFileSync, statSync } from 'node:fs';
import { once } from 'node:events';
import { join } from 'node:path';
import { hostNetworkSnapshot, startEchoServer, tcpProbe, type EchoServer } from '../../src/lab/net-probe.js';
import { Topology, matchesSweepPrefix, ownedByTopology, sweep, topologyObjects, type TopoPod } from '../../src/lab/topology.js';
import { cgroup2Root, cgroupId } from '../../src/util/cgroup.js';
import { uniqueTestPrefix } from '../support/names.js';

const PORT = 8080;

function cgroupOf(pid: number): string {
  const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'));
  if (line === undefined) throw new Error(`pid ${pid} has no cgroup v2 line`);
  return join(cgroup2Root(), line.slice(3));
}

/** The netns inode of a process, and of a named netns (its /run/netns bind mount). */
function netnsInodeOfPid(pid: number): bigint {
  return statSync(`/proc/${pid}/ns/net`, { bigint: true }).ino;
}
function netnsInode(name: string): bigint {
  return statSync(`/run/netns/${name}`, { bigint: true }).ino;
}

describe('pod topology (routed, 2 nodes x 2 pods)', () => {
  const prefix = uniqueTestPrefix();
  let hostBefore: string;
  let topo: Topology;
  const servers = new Map<string, EchoServer>();

  beforeAll(async () => {
    hostBefore = await hostNetworkSnapshot();
    topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 2 });
    for (const node of topo.nodes) {
      for (const pod of node.pods) servers.set(pod.name, await startEchoServer(pod, pod.name, PORT));
    }
  });

  afterAll(async () => {
    await topo?.destroy();
  });

  test('lays out names, addresses, cgroups and bpffs dirs as documented', () => {
    const cgRoot = cgroup2Root();
    expect(topo.nodes.map((n) => [n.name, n.netns, n.gateway, n.underlayIp, n.podCidr])).toEqual([
      ['n1', `${prefix}-n1`, '10.77.1.1', '10.78.0.1', '10.77.1.0/24'],
      ['n2', `${prefix}-n2`, '10.77.2.1', '10.78.0.2', '10.77.2.0/24'],
    ]);
    const pods = topo.nodes.flatMap((n) => n.pods);
    expect(pods.map((p) => [p.name, p.node.name, p.netns, p.ip])).toEqual([
      ['p1', 'n1', `${prefix}-n1-p1`, '10.77.1.2'],
      ['p2', 'n1', `${prefix}-n1-p2`, '10.77.1.3'],
      ['p3', 'n2', `${prefix}-n2-p3`, '10.77.2.2'],
      ['p4', 'n2', `${prefix}-n2-p4`, '10.77.2.3'],
    ]);
    for (const node of topo.nodes) {
      expect(node.podsCgroup).toBe(join(cgRoot, node.netns, 'pods'));
      expect(node.proxyCgroup).toBe(join(cgRoot, node.netns, 'proxy'));
      expect(existsSync(node.podsCgroup) && existsSync(node.proxyCgroup)).toBe(true);
      expect(node.bpffsDir).toBe(`/sys/fs/bpf/${node.netns}`);
      expect(existsSync(node.bpffsDir)).toBe(true);
      for (const pod of node.pods) {
        expect(pod.cgroupPath).toBe(join(node.podsCgroup, pod.name));
        expect(pod.cgroupId).toBe(cgroupId(pod.cgroupPath));
        expect(pod.cgroupId).toBeGreaterThan(1n);
      }
    }
    expect(topo.pod('p3').node.name).toBe('n2');
    expect(() => topo.pod('nope')).toThrow(/invalid pod "nope": no such pod/);
  });

  test('every pod reaches every other pod over TCP, same node and across nodes, with its own source address', async () => {
    const pods = topo.nodes.flatMap((n) => n.pods);
    const answers: string[] = [];
    for (const from of pods) {
      for (const to of pods) {
        if (from !== to) answers.push(`${from.name}>${await tcpProbe(from, to.ip, PORT, 'hi')}`);
      }
    }
    const expected = pods.flatMap((from) => pods.filter((to) => to !== from).map((to) => `${from.name}>${to.name} ${from.ip} hi`));
    expect(answers).toEqual(expected);
    expect(answers).toHaveLength(12);
  });

  test('pod processes run in their pod cgroup and netns', () => {
    for (const node of topo.nodes) {
      for (const pod of node.pods) {
        const pid = servers.get(pod.name)!.pid;
        expect(cgroupOf(pid)).toBe(pod.cgroupPath);
        expect(netnsInodeOfPid(pid)).toBe(netnsInode(pod.netns));
      }
    }
  });

  test('node processes run in the node netns, in the proxy cgroup when asked, else in the system cgroup', async () => {
    const node = topo.nodes[0]!;
    const script = "console.log(require('fs').readFileSync('/proc/self/cgroup','utf8').split('\\n').find(l=>l.startsWith('0::')).slice(3)); console.log(require('fs').statSync('/proc/self/ns/net').ino)";
    const inProxy = await node.run(process.execPath, ['-e', script], { inProxyCgroup: true });
    const inSystem = await node.run(process.execPath, ['-e', script]);
    const cgRoot = cgroup2Root();
    const nsIno = String(netnsInode(node.netns));
    expect(inProxy.stdout.trim().split('\n')).toEqual([node.proxyCgroup.slice(cgRoot.length), nsIno]);
    expect(inSystem.stdout.trim().split('\n')).toEqual([node.systemCgroup.slice(cgRoot.length), nsIno]);
    // The node itself reaches its pods and the other node's pods.
    expect(await tcpProbe(node, topo.pod('p2').ip, PORT, 'n')).toBe(`p2 ${node.gateway} n`);
    expect(await tcpProbe(node, topo.pod('p4').ip, PORT, 'n')).toBe(`p4 ${node.underlayIp} n`);
  });

  test('the underlay runs shared services reachable from every node and pod, and reaches the pods', async () => {
    const ul = topo.underlay;
    expect([ul.netns, ul.ip, ul.cgroup]).toEqual([`${prefix}-ul`, '10.78.0.254', join(cgroup2Root(), `${prefix}-ul`)]);
    const server = await startEchoServer(ul, 'ul', PORT);
    try {
      expect(cgroupOf(server.pid)).toBe(ul.cgroup);
      expect(await tcpProbe(topo.pod('p1'), ul.ip, PORT, 'u')).toBe(`ul ${topo.pod('p1').ip} u`);
      expect(await tcpProbe(topo.pod('p4'), ul.ip, PORT, 'u')).toBe(`ul ${topo.pod('p4').ip} u`);
      expect(await tcpProbe(topo.nodes[1]!, ul.ip, PORT, 'u')).toBe(`ul ${topo.nodes[1]!.underlayIp} u`);
      expect(await tcpProbe(ul, topo.pod('p3').ip, PORT, 'u')).toBe(`p3 ${ul.ip} u`);
    } finally {
      await server.stop();
    }
  });

  test('same-node pod traffic is routed through the node and seen by its PREROUTING hook', async () => {
    const node = topo.nodes[0]!;
    const [p1, p2] = [topo.pod('p1'), topo.pod('p2')];
    const rule = ['-t', 'mangle', '-A', 'PREROUTING', '-s', p1.ip, '-d', p2.ip, '-p', 'tcp', '--dport', String(PORT)];
    expect((await node.run('iptables', rule)).code).toBe(0);
    const counted = async (): Promise<number> => {
      const out = (await node.run('iptables', ['-t', 'mangle', '-L', 'PREROUTING', '-v', '-n', '-x'])).stdout;
      const line = out.split('\n').find((l) => l.includes(p1.ip) && l.includes(p2.ip));
      return Number(line?.trim().split(/\s+/)[0]);
    };
    expect(await counted()).toBe(0);
    await tcpProbe(p1, p2.ip, PORT, 'x');
    expect(await counted()).toBeGreaterThan(0);
  });

  test('addPod and removePod: a new pod is reachable, removal frees name, slot and kernel objects', async () => {
    const node2 = topo.nodes[1]!;
    const extra = await topo.addPod(node2, 'extra');
    expect(extra.ip).toBe('10.77.2.4');
    const server = await startEchoServer(extra, 'extra', PORT);
    expect(await tcpProbe(topo.pod('p1'), extra.ip, PORT, 'e')).toBe(`extra ${topo.pod('p1').ip} e`);
    const exited = once(server.child, 'exit');
    await topo.removePod(extra);
    const [, signal] = await exited;
    expect(signal).toBe('SIGKILL');
    expect(existsSync(`/run/netns/${extra.netns}`)).toBe(false);
    expect(existsSync(extra.cgroupPath)).toBe(false);
    expect(node2.pods.map((p) => p.name)).toEqual(['p3', 'p4']);
    // Same slot again: the node-side veth of the removed pod is really gone.
    const again = await topo.addPod(node2);
    expect([again.name, again.ip]).toEqual(['p5', '10.77.2.4']);
    await expect(topo.addPod(node2, 'p5')).rejects.toThrow(/invalid pod name "p5": already used/);
    await expect(topo.addPod(node2, 'Bad_Name')).rejects.toThrow(/invalid pod name "Bad_Name"/);
    await topo.removePod(again);
  });

  test('refuses bad options and a prefix that is in use, and leaves nothing behind', async () => {
    await expect(Topology.create({ prefix: 'Bad Prefix', nodes: 1 })).rejects.toThrow(/invalid prefix "Bad Prefix"/);
    await expect(Topology.create({ prefix: `${prefix}z`, nodes: 0 })).rejects.toThrow(/invalid nodes 0/);
    await expect(Topology.create({ prefix: `${prefix}z`, nodes: 1, subnetBase: 254 })).rejects.toThrow(/invalid subnetBase 254/);
    await expect(Topology.create({ prefix, nodes: 1 })).rejects.toThrow(/already in use/);
    expect(await topologyObjects(`${prefix}z`)).toEqual([]);
    // The refused duplicate must not have damaged the live topology.
    expect(await tcpProbe(topo.pod('p1'), topo.pod('p4').ip, PORT, 'still')).toBe(`p4 ${topo.pod('p1').ip} still`);
  });

  test('destroy kills what it started, removes everything, is idempotent, and the host is unchanged', async () => {
    const server = servers.get('p1')!;
    const exited = once(server.child, 'exit');
    expect(await topologyObjects(prefix)).not.toEqual([]);
    await topo.destroy();
    await topo.destroy();
    const [, signal] = await exited;
    expect(signal).toBe('SIGKILL');
    expect(await topologyObjects(prefix)).toEqual([]);
    expect(() => topo.nodes[0]!.exec('true', [])).toThrow(/topology .* is destroyed/);
    expect(await hostNetworkSnapshot()).toBe(hostBefore);
  });
});

describe('sweep', () => {
  test('removes a topology whose object was lost, with the processes inside it', async () => {
    const prefix = uniqueTestPrefix();
    let lost: Topology | undefined = await Topology.create({ prefix, nodes: 2, podsPerNode: 1, subnetBase: 91 });
    const pod: TopoPod = lost.pod('p1');
    // Detached and unreferenced: as if the creating process had crashed.
    const orphan = pod.exec('/bin/sh', ['-c', 'echo ready; exec sleep 1000'], { stdio: ['ignore', 'pipe', 'ignore'], detached: true });
    const exited = once(orphan, 'exit');
    await once(orphan.stdout!, 'data'); // in its cgroup and netns by now
    orphan.unref();
    lost = undefined;
    expect(lost).toBeUndefined();

    const removed = await sweep(prefix);
    expect(removed).toEqual(
      expect.arrayContaining([`netns ${prefix}-n1`, `netns ${prefix}-n1-p1`, `netns ${prefix}-n2-p2`, `netns ${prefix}-ul`, `bpffs /sys/fs/bpf/${prefix}-n1`]),
    );
    const [, signal] = await exited;
    expect(signal).toBe('SIGKILL');
    expect(await topologyObjects(prefix)).toEqual([]);
    expect(await sweep(prefix)).toEqual([]);
  });

  test('never matches another run whose id extends the prefix, nor another topology', () => {
    expect(matchesSweepPrefix('fsmt12x3-n1', 'fsmt12')).toBe(true);
    expect(matchesSweepPrefix('fsmt123-n1', 'fsmt12')).toBe(false);
    expect(ownedByTopology('fsmlab-n1-p1', 'fsmlab')).toBe(true);
    expect(ownedByTopology('fsmlab-selfcheck-n1', 'fsmlab')).toBe(false);
  });
});
