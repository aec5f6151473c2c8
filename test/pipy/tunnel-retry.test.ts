import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { policy } from '../../bench/mesh.js';
import { IptablesDataplane } from '../../src/dataplane/iptables/index.js';
import { noExclusions } from '../../src/dataplane/types.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { renderProxyConfig } from '../../src/proxy/config.js';
import { uniqueTestPrefix } from '../support/names.js';
import { findPipy, metricValue, pipySkipReason, startNodeProxy, writeCodebase, type NodeProxy } from '../support/pipy.js';
import { eventually } from '../support/eventually.js';

/**
 * proxy/tunnel.js: a tunnel whose stream fails before the far side answered
 * its CONNECT is retried once, on a new peer connection; one that was
 * answered is never retried. Deterministic, with no kill timing: the far
 * "node proxy" is a small Pipy script on n2's :15003 that closes its FIRST
 * connection as soon as the client's first bytes arrive (as a far instance
 * killed -9 under a live connection does, seen from the client), and on
 * every later connection answers CONNECT 200 and then the request inside:
 * `far-ok`, or for /break nothing (it ends the tunnel after its 200).
 *
 *   n1: pod a, the project's program (iptables interception)     n2: the script
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const OUT = 15001;
const IN = 15003;

// Logs "conn N" per connection and "tunnel N <target>" per CONNECT it answers.
const FAR_PROXY = `
var count = 0
var $conn
pipy.listen(${IN}, $=>$
  .onStart(() => { $conn = ++count; console.log('conn ' + $conn) })
  .pipe(() => $conn === 1 ? 'die' : 'serve', {
    die: $=>$.replaceData(() => new StreamEnd('ConnectionReset')),
    serve: $=>$.demuxHTTP().to($=>$
      .acceptHTTPTunnel(req => { console.log('tunnel ' + $conn + ' ' + req.head.path); return new Message({ status: 200 }) }).to($=>$
        .demuxHTTP().to($=>$
          .replaceMessage(msg => { console.log('request ' + $conn + ' ' + msg.head.path); return msg.head.path === '/break' ? new StreamEnd : new Message({ status: 200 }, 'far-ok\\n') })
        )
      )
    ),
  })
)
`;

maybe('tunnel set-up failures before the far side answers are retried once', () => {
  let topo: Topology;
  let a: TopoPod;
  let c: TopoPod;
  let n2: TopoNode;
  let dp: IptablesDataplane | undefined;
  let proxy: NodeProxy | undefined;
  let far: ChildProcess | undefined;
  let farLog = '';
  let work: string;

  beforeAll(async () => {
    const pipy = findPipy()!;
    work = mkdtempSync(join(tmpdir(), 'fsmn-tunnel-retry-'));
    topo = await Topology.create({ prefix: uniqueTestPrefix(), nodes: 2, podsPerNode: 0 });
    const n1 = topo.nodes[0]!;
    n2 = topo.nodes[1]!;
    a = await topo.addPod(n1, 'a');
    c = await topo.addPod(n2, 'c');
    writeFileSync(join(work, 'far.js'), FAR_PROXY);
    far = n2.exec(pipy, ['--log-level=warn', '--log-local=stdout', join(work, 'far.js')], { stdio: ['ignore', 'pipe', 'pipe'] });
    far.stdout!.setEncoding('utf8').on('data', (d: string) => (farLog += d));
    far.stderr!.setEncoding('utf8').on('data', (d: string) => (farLog += d));
    for (let i = 0; ; i++) {
      if ((await n2.run('ss', ['-Hltn', `sport = :${IN}`])).stdout.trim() !== '') break;
      if (i > 100 || far.exitCode !== null) throw new Error(`the far script did not listen: ${farLog}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    // Plaintext tunnels: the retry is the same code with or without TLS (tls.connectPeer only wraps the connection).
    const config = renderProxyConfig(policy(n1.name, [n1.underlayIp, n1.gateway], [a], [{ pod: c, node: n2.name, address: n2.underlayIp }]), { outboundPort: OUT, inboundPort: IN });
    proxy = await startNodeProxy(n1, pipy, writeCodebase(join(work, 'n1'), config), config);
    dp = new IptablesDataplane({ netns: n1.netns });
    await dp.apply({
      proxy: { address: n1.gateway, outboundPort: OUT, inboundPort: IN, cgroupPath: n1.proxyCgroup },
      nodeAddresses: [n1.gateway, n1.underlayIp],
      proxySources: topo.nodes.flatMap((n) => [n.gateway, n.underlayIp]),
      mesh: noExclusions(),
      pods: [{ uid: 'uid-a', namespace: 'bench', name: 'a', ip: a.ip, cgroupPath: a.cgroupPath, inbound: 'permissive', exclusions: noExclusions() }],
    });
  }, 120_000);

  afterAll(async () => {
    await dp?.cleanup().catch(() => undefined);
    await proxy?.stop().catch(() => undefined);
    far?.kill('SIGKILL');
    await topo?.destroy();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 60_000);

  const get = (path: string) => a.run('curl', ['-s', '-o', '-', '-w', '\n%{http_code}', '--max-time', '5', `http://${c.ip}:8080${path}`]);
  const retries = async () => metricValue(await proxy!.metrics(), 'fsmn_proxy_tunnel_retries_total', { source: 'bench/a', destination: 'bench/c' });
  // The far script's log lines of one kind ("conn", "tunnel", "request"), without Pipy's time and level prefix.
  const lines = (kind: string) => [...farLog.matchAll(new RegExp(`\\[INF\\] (${kind} .*)$`, 'gm'))].map((m) => m[1]!);

  test('the peer connection dies before the CONNECT is answered: the request goes again on a new connection and succeeds', async () => {
    const r = await get('/');
    expect({ out: r.stdout, far: farLog }).toEqual({ out: 'far-ok\n\n200', far: expect.any(String) });
    // The first connection died under the tunnel; the retry opened a second one and was answered there.
    await eventually(async () => lines('request').length, (n) => n >= 1);
    expect(lines('conn')).toEqual(['conn 1', 'conn 2']);
    expect(lines('tunnel')).toEqual([`tunnel 2 ${c.ip}:8080`]);
    expect(lines('request')).toEqual(['request 2 /']);
    expect(await retries()).toBe(1);
  }, 30_000);

  test('a tunnel the far side answered is not retried when it breaks: the request fails, sent once', async () => {
    const before = lines('tunnel').length;
    const r = await get('/break');
    expect(r.stdout.endsWith('200')).toBe(false);
    await eventually(async () => lines('request').length, (n) => n >= 2);
    expect(lines('request').slice(1)).toEqual(['request 2 /break']);
    expect(lines('tunnel').length - before).toBe(1);
    expect(await retries()).toBe(1);
    // And the next request is fine again.
    expect((await get('/')).stdout).toBe('far-ok\n\n200');
  }, 30_000);
});
