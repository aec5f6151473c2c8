import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateTokens, writeTokensFile } from '../../src/controller/auth.js';
import { renderManifests } from '../../src/lab/manifests.js';
import { Topology, type TopoNode, type TopoPod } from '../../src/lab/topology.js';
import { eventually } from './eventually.js';
import { uniqueTestPrefix } from './names.js';
import { findPipy } from './pipy.js';
import { waitForOutput } from './traffic.js';

/**
 * A small mesh of real processes for tests of what only shows end to end
 * (certificate expiry and renewal, the proxy's uid): the built controller
 * (manifest mode) and one built agent per node with the Pipy proxy,
 * iptables interception, on a 2-node topology with a test prefix:
 *
 *   n1: p1        n2: p2          p2 -> p1 is cross-node (mTLS tunnel)
 *
 * Unlike the lab it uses no fixed names or ports, so it runs beside the lab
 * and other tests. Everything it starts is stopped by destroy(); the agents
 * leave their proxies running on purpose (as on a node), and the topology's
 * cgroup kill stops those.
 */

const root = fileURLToPath(new URL('../../', import.meta.url));
export const CLI = join(root, 'dist', 'src', 'cli', 'bin.js');
const ECHO = join(root, 'dist', 'src', 'lab', 'echo-server.js');

/** Why a process-mesh test cannot run here (printed as its skip line), or undefined. */
export function processMeshSkipReason(): string | undefined {
  if (!findPipy()) return 'SKIP: no Pipy binary (set PIPY_BIN or put pipy on PATH)';
  if (!existsSync(CLI) || !existsSync(ECHO)) return `SKIP: fsm-node is not built (${CLI} missing): run npm run build:ts`;
  return undefined;
}

/** eventually() for probes that cost a process or a request: at most two a second. */
export const slowly = <T>(probe: () => Promise<T>, ok: (v: T) => boolean, timeoutMs: number): Promise<T> =>
  eventually(
    async () => {
      const v = await probe();
      if (!ok(v)) await new Promise((r) => setTimeout(r, 500));
      return v;
    },
    ok,
    timeoutMs,
  );

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

async function stopProcess(c: ChildProcess | undefined): Promise<void> {
  if (!c || c.exitCode !== null || c.signalCode !== null) return;
  const exited = new Promise((r) => c.once('exit', r));
  c.kill('SIGTERM');
  await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
  if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}

export interface IdentityStatus {
  identity: string;
  state: string;
  notAfter?: string;
  lastError?: string;
  reason?: string;
}

export interface ProcessMeshOptions {
  /** Controller --certificate-lifetime (e.g. "60s"). */
  certificateLifetime?: string;
  /** Agent --proxy-user for every node. */
  proxyUser?: string;
}

export class ProcessMesh {
  readonly children: ChildProcess[] = [];
  controller: ChildProcess | undefined;
  private controllerPort = 0;
  readonly agentUrl = new Map<TopoNode, string>();

  private constructor(
    readonly work: string,
    readonly topo: Topology,
    readonly n1: TopoNode,
    readonly n2: TopoNode,
    readonly p1: TopoPod,
    readonly p2: TopoPod,
    private readonly o: ProcessMeshOptions,
  ) {}

  static async start(o: ProcessMeshOptions = {}): Promise<ProcessMesh> {
    const prefix = uniqueTestPrefix();
    const work = mkdtempSync(join(tmpdir(), `${prefix}-mesh-`));
    // mkdtemp makes it 0700; a proxy with its own uid must traverse it to its state directory.
    chmodSync(work, 0o711);
    const topo = await Topology.create({ prefix, nodes: 2, podsPerNode: 0 });
    try {
      const [n1, n2] = topo.nodes as [TopoNode, TopoNode];
      const mesh = new ProcessMesh(work, topo, n1, n2, await topo.addPod(n1, 'p1'), await topo.addPod(n2, 'p2'), o);
      await mesh.up();
      return mesh;
    } catch (err) {
      await topo.destroy();
      throw err;
    }
  }

  stateDir(n: TopoNode): string {
    return join(this.work, 'nodes', n.name);
  }

  get controllerUrl(): string {
    return `https://127.0.0.1:${this.controllerPort}`;
  }

  /** The controller's serving CA (PEM), as the agents pin it. */
  controllerCa(): string {
    return readFileSync(join(this.work, 'controller', 'ca.crt'), 'utf8');
  }

  /** A node's bearer token. */
  token(n: TopoNode): string {
    return readFileSync(join(this.work, `token-${n.name}`), 'utf8').trim();
  }

  get controllerLog(): string {
    return join(this.work, 'controller.log');
  }

  agentLog(n: TopoNode): string {
    return join(this.work, `agent-${n.name}.log`);
  }

  private async up(): Promise<void> {
    for (const p of [this.p1, this.p2]) {
      const s = p.exec(process.execPath, [ECHO, 'serve', '--name', p.name, '--port', '8080'], { stdio: ['ignore', 'pipe', 'pipe'] });
      this.children.push(s);
      await waitForOutput(s, 'listening');
    }
    const files = renderManifests({
      mode: 'iptables',
      nodes: this.topo.nodes.map((n) => ({ name: n.name, address: n.underlayIp })),
      // p2 first: the example denies its last pod -> its first, so p2 -> p1 stays allowed.
      pods: [this.p2, this.p1].map((p) => ({ name: p.name, node: p.node.name, ip: p.ip, cgroupPath: p.cgroupPath, version: 'v1' as const })),
    });
    for (const [name, text] of files) {
      mkdirSync(dirname(join(this.work, 'manifests', name)), { recursive: true });
      writeFileSync(join(this.work, 'manifests', name), text);
    }
    const tokens = generateTokens(this.topo.nodes.map((n) => n.name));
    await writeTokensFile(join(this.work, 'tokens.json'), tokens);
    this.controllerPort = await freePort();
    this.startController();
    await this.controllerReady();
    for (const n of this.topo.nodes) {
      mkdirSync(this.stateDir(n), { recursive: true, mode: 0o755 });
      writeFileSync(join(this.work, `token-${n.name}`), `${tokens[n.name]}\n`, { mode: 0o600 });
      const port = await freePort();
      this.agentUrl.set(n, `http://127.0.0.1:${port}`);
      const out = openSync(this.agentLog(n), 'a');
      const argv = [
        CLI, 'agent',
        '--node', n.name,
        '--controller', `https://127.0.0.1:${this.controllerPort}`,
        '--ca-file', join(this.work, 'controller', 'ca.crt'),
        '--token-file', join(this.work, `token-${n.name}`),
        '--mode', 'iptables',
        '--state-dir', this.stateDir(n),
        '--bpffs-dir', n.bpffsDir,
        '--pods-cgroup', n.podsCgroup,
        '--proxy-cgroup', n.proxyCgroup,
        '--listen', `127.0.0.1:${port}`,
        '--netns', n.netns,
        '--proxy', 'pipy',
        '--proxy-instances', '1',
        '--proxy-address', n.gateway,
        '--node-addresses', `${n.gateway},${n.underlayIp}`,
        ...(this.o.proxyUser ? ['--proxy-user', this.o.proxyUser] : []),
      ];
      this.children.push(spawn(process.execPath, argv, { stdio: ['ignore', out, out], env: { ...process.env, PIPY_BIN: findPipy() ?? '', FSMN_LOG_FORMAT: 'json' } }));
    }
    for (const n of this.topo.nodes) {
      const ready = await slowly(async () => (await fetch(`${this.agentUrl.get(n)}/readyz`).catch(() => undefined))?.status, (s) => s === 200, 60_000);
      if (ready !== 200) throw new Error(`the agent of ${n.name} is not ready after 60 s; its log:\n${readFileSync(this.agentLog(n), 'utf8').slice(-3000)}`);
    }
  }

  startController(): ChildProcess {
    const out = openSync(this.controllerLog, 'a');
    const lifetime = this.o.certificateLifetime ? ['--certificate-lifetime', this.o.certificateLifetime] : [];
    this.controller = spawn(process.execPath, [CLI, 'controller', '--manifests', join(this.work, 'manifests'), '--tokens', join(this.work, 'tokens.json'), '--listen', `127.0.0.1:${this.controllerPort}`, '--state-dir', join(this.work, 'controller'), ...lifetime], {
      stdio: ['ignore', out, out],
      env: { ...process.env, FSMN_LOG_FORMAT: 'json', FSMN_LOG_LEVEL: 'info' },
    });
    this.children.push(this.controller);
    return this.controller;
  }

  async stopController(): Promise<void> {
    await stopProcess(this.controller);
  }

  /** Until the controller answers /readyz 200 over HTTPS with its own CA. */
  async controllerReady(): Promise<void> {
    const ca = join(this.work, 'controller', 'ca.crt');
    const status = await slowly(
      async () => {
        if (!existsSync(ca)) return 0;
        return new Promise<number>((resolve) => {
          const req = httpsRequest(`https://127.0.0.1:${this.controllerPort}/readyz`, { ca: readFileSync(ca), timeout: 2000 }, (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          });
          req.on('timeout', () => req.destroy());
          req.on('error', () => resolve(0));
          req.end();
        });
      },
      (s) => s === 200,
      30_000,
    );
    if (status !== 200) throw new Error(`the controller is not ready after 30 s; its log:\n${readFileSync(this.controllerLog, 'utf8').slice(-3000)}`);
  }

  /** The agent's /v1/state. */
  async state(n: TopoNode): Promise<Record<string, unknown>> {
    const r = await fetch(`${this.agentUrl.get(n)}/v1/state`, { signal: AbortSignal.timeout(20_000) });
    return (await r.json()) as Record<string, unknown>;
  }

  async identity(n: TopoNode, id: string): Promise<IdentityStatus | undefined> {
    return ((await this.state(n)).identities as IdentityStatus[] | undefined)?.find((i) => i.identity === id);
  }

  async metrics(n: TopoNode): Promise<string> {
    return (await fetch(`${this.agentUrl.get(n)}/metrics`, { signal: AbortSignal.timeout(20_000) })).text();
  }

  /** One GET from `from` to p1's echo server; status 0 when no HTTP answer came. */
  async get(from: TopoPod): Promise<{ status: number; pod?: string; body: string }> {
    const r = await from.run(process.execPath, [ECHO, 'get', `http://${this.p1.ip}:8080/`]);
    const res = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { status?: number; body?: string; error?: string };
    if (res.status === undefined) return { status: 0, body: res.error ?? r.stderr };
    let pod: string | undefined;
    try {
      pod = (JSON.parse(res.body ?? '') as { pod?: string }).pod;
    } catch {
      // the proxy's own answers are plain text
    }
    return { status: res.status, pod, body: res.body ?? '' };
  }

  async destroy(): Promise<void> {
    for (const c of [...this.children].reverse()) await stopProcess(c);
    await this.topo.destroy();
    if (!process.env.FSMN_KEEP_TEST_DIR) rmSync(this.work, { recursive: true, force: true });
  }
}
