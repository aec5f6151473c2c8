import { join } from 'node:path';
import { AttachType, ObjectSpec, codecs, type Collection, type Link } from '../../src/ebpf/index.js';
import { MapName, configCodec, podCodec } from '../../src/dataplane/ebpf/abi.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { run } from '../../src/util/exec.js';
import { bpfObjectDir } from '../../src/util/paths.js';
import { bpfObjectsLeft, type BpfObjectRef } from '../support/bpf-objects.js';
import { uniqueTestPrefix } from '../support/names.js';
import { echo, startEchoServer } from '../support/traffic.js';

/**
 * The whole stack in one test (issue 2): the project's connect4 object,
 * loaded through src/ebpf and the addon, attached with a bpf_link to one
 * pod's cgroup, redirects that pod's connection to a listener in the node;
 * after detach the pod connects directly again and no link, program or map
 * of ours is left.
 */

const PORT = 8080;
const FAKE_PROXY_PORT = 15001;

describe('connect4 through src/ebpf redirects a pod (issue 2 proof)', () => {
  const prefix = uniqueTestPrefix();
  let topo: Topology;
  let node: TopoNode;
  let a: TopoPod;
  let b: TopoPod;

  beforeAll(async () => {
    topo = await Topology.create({ prefix, nodes: 1, podsPerNode: 2 });
    node = topo.nodes[0]!;
    [a, b] = node.pods as [TopoPod, TopoPod];
    await startEchoServer(b, 'pod-b', PORT);
    // Stands in for the node proxy: answers with its own name, so the client sees where it landed.
    await startEchoServer(node, 'node-listener', FAKE_PROXY_PORT);
  }); // the configured testTimeout: 60 s here, 180 s in the arm64 VM (TCG emulation on a busy host)

  afterAll(async () => {
    await topo?.destroy();
  });

  test('attach to the pod cgroup, connection redirected; detach, direct again, nothing left', async () => {
    expect(await echo(a, b.ip, PORT)).toMatchObject({ outcome: 'ok', banner: `pod-b ${a.ip}` });

    let coll: Collection | undefined;
    let link: Link | undefined;
    const ours: BpfObjectRef[] = [];
    try {
      const spec = ObjectSpec.fromFile(join(bpfObjectDir(), 'connect4.o'));
      coll = spec.load();
      const config = coll.map(MapName.config, codecs.u32, configCodec);
      config.update(0, { proxyIp4: node.gateway, outboundPort: FAKE_PROXY_PORT, inboundPort: 15003, proxyCgroupId: 0n, flags: 0 });
      coll.map(MapName.pods, codecs.u64, podCodec).update(a.cgroupId, { flags: 0, uid: 'pod-a' });
      const prog = coll.program('fsm_connect4');
      link = prog.attachCgroup(a.cgroupPath, AttachType.CgroupInet4Connect);
      ours.push({ kind: 'link', id: link.info().id }, { kind: 'prog', id: prog.id, name: prog.name });
      for (const m of Object.values(coll.maps)) ours.push({ kind: 'map', id: m.id, name: m.name });
      expect(link.info()).toMatchObject({ progId: prog.id, cgroupId: a.cgroupId });

      expect(await echo(a, b.ip, PORT)).toMatchObject({ outcome: 'ok', intact: true, banner: `node-listener ${a.ip}` });

      link.detach();
    } finally {
      link?.close();
      coll?.close();
    }

    expect(await echo(a, b.ip, PORT)).toMatchObject({ outcome: 'ok', banner: `pod-b ${a.ip}` });
    const attached = await run('bpftool', ['-j', 'cgroup', 'show', a.cgroupPath]);
    expect(JSON.parse(attached.stdout.trim() || '[]')).toEqual([]);
    // Each recorded object asked for in its own kind (ids of links, programs
    // and maps are separate counters), after the kernel's deferred free.
    expect(ours.length).toBeGreaterThan(2);
    expect(await bpfObjectsLeft(ours)).toEqual([]);
  });
});
