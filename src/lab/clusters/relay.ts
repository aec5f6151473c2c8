import { spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { errorMessage, InvalidInputError } from '../../errors.js';

/**
 * The clusterset's control path through the lab's router. The controllers
 * run in the host namespace (their agents reach them there), but two sites
 * talk over their uplinks: cut one and its peers lose it. One relay process
 * per cluster carries that:
 *
 *   c2's controller --> 127.0.0.1:<egress port> [relay c2, host side]
 *       --> (inside fsmlab-c2-ul) --> router --> 10.78.0.254:15444
 *       [relay c1, inside fsmlab-c1-ul] --> (host side) --> 127.0.0.1:<c1's clusterset listener>
 *
 * A process has sockets in one network namespace only, so each relay is two
 * processes: this one in the host namespace, and a child started inside the
 * cluster's underlay namespace (nsenter) that it shares connections with
 * over the IPC channel (Node passes socket handles). The child listens on
 * the underlay for peers (ingress) and dials peers for the host side
 * (egress); the host side listens for the controller's outgoing calls and
 * dials the controller for incoming ones. Bytes are piped, never read: TLS
 * runs end to end between the controllers.
 *
 *   node relay.js --netns NS --ingress ADDR:PORT --controller PORT [--egress LOCALPORT=ADDR:PORT ...]
 */

interface Egress {
  localPort: number;
  target: { host: string; port: number };
}

function hostPort(v: string, flag: string): { host: string; port: number } {
  const m = /^(\d+\.\d+\.\d+\.\d+):(\d+)$/.exec(v);
  const port = Number(m?.[2]);
  if (!m || !(port > 0 && port < 65536)) throw new InvalidInputError(flag, v, 'expected IPv4:PORT');
  return { host: m[1]!, port };
}

export function parseEgress(v: string): Egress {
  const [local, target] = v.split('=');
  const localPort = Number(local);
  if (!Number.isInteger(localPort) || localPort < 1 || localPort > 65535 || target === undefined) throw new InvalidInputError('--egress', v, 'expected LOCALPORT=IPv4:PORT');
  return { localPort, target: hostPort(target, '--egress') };
}

/** The relay's command line (lab up starts it detached in its own lab cgroup). */
export function relayArgv(o: { netns: string; ingress: string; controllerPort: number; egress: string[] }): string[] {
  return [process.execPath, fileURLToPath(import.meta.url), '--netns', o.netns, '--ingress', o.ingress, '--controller', String(o.controllerPort), ...o.egress.flatMap((e) => ['--egress', e])];
}

function pipe(a: Socket, b: Socket): void {
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
  a.pipe(b);
  b.pipe(a);
}

const say = (event: string, extra: Record<string, unknown> = {}): void => void process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), event, ...extra })}\n`);

/** The host side: egress listeners, and the controller dialled for each ingress connection the child hands over. */
async function hostSide(netns: string, ingress: string, controllerPort: number, egress: Egress[]): Promise<void> {
  const child: ChildProcess = spawn('nsenter', [`--net=${join('/run/netns', netns)}`, '--', process.execPath, fileURLToPath(import.meta.url), '--side', 'underlay', '--ingress', ingress], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  child.on('exit', (code, signal) => {
    say('underlay side exited', { code, signal });
    process.exit(1);
  });
  child.on('message', (msg: { kind?: string }, handle: unknown) => {
    if (msg.kind === 'ready') say('ready', { netns, ingress, controllerPort, egress });
    if (msg.kind !== 'ingress' || !handle) return;
    const inbound = handle as Socket;
    pipe(inbound, connect({ host: '127.0.0.1', port: controllerPort }));
  });
  const servers: Server[] = [];
  for (const e of egress) {
    const srv = createServer({ pauseOnConnect: true }, (sock) => {
      // Handed to the underlay side, which dials the peer from inside the cluster's underlay.
      child.send({ kind: 'egress', host: e.target.host, port: e.target.port }, sock);
    });
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(e.localPort, '127.0.0.1', () => resolve());
    });
    servers.push(srv);
  }
  const stop = (): void => {
    for (const s of servers) s.close();
    child.kill('SIGTERM');
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

/** The underlay side: the ingress listener, and peers dialled for the host side's egress connections. */
function underlaySide(ingress: { host: string; port: number }): void {
  const srv = createServer({ pauseOnConnect: true }, (sock) => process.send?.({ kind: 'ingress' }, sock));
  srv.listen(ingress.port, ingress.host, () => process.send?.({ kind: 'ready' }));
  srv.on('error', (err) => {
    process.stderr.write(`relay: cannot listen on ${ingress.host}:${ingress.port}: ${errorMessage(err)}\n`);
    process.exit(1);
  });
  process.on('message', (msg: { kind?: string; host?: string; port?: number }, handle: unknown) => {
    if (msg.kind !== 'egress' || !handle || !msg.host || !msg.port) return;
    const outbound = connect({ host: msg.host, port: msg.port });
    pipe(handle as Socket, outbound);
    (handle as Socket).resume();
  });
  // The host side owns this process: when it goes, so does this one.
  process.on('disconnect', () => process.exit(0));
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { side: { type: 'string' }, netns: { type: 'string' }, ingress: { type: 'string' }, controller: { type: 'string' }, egress: { type: 'string', multiple: true } }, strict: true });
  if (!values.ingress) throw new InvalidInputError('--ingress', values.ingress, 'required: ADDR:PORT on the cluster underlay');
  const ingress = hostPort(values.ingress, '--ingress');
  if (values.side === 'underlay') return underlaySide(ingress);
  if (!values.netns) throw new InvalidInputError('--netns', values.netns, "required: the cluster's underlay namespace");
  const controllerPort = Number(values.controller);
  if (!Number.isInteger(controllerPort) || controllerPort < 1 || controllerPort > 65535) throw new InvalidInputError('--controller', values.controller, "must be the port of the cluster controller's clusterset listener");
  await hostSide(values.netns, values.ingress, controllerPort, (values.egress ?? []).map(parseEgress));
}

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`relay: ${errorMessage(err)}\n`);
    process.exit(2);
  });
}
