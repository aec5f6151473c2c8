import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { packageRoot } from '../src/util/paths.js';
import { pipyBinary } from '../src/proxy/pipy.js';
import { intFlag, round } from './util.js';

/**
 * mqtt-guard: what the proxy's MQTT hop (proxy/mqtt.js guard()) costs per
 * message inside Pipy, with no sockets, namespaces or other processes: one
 * Pipy process runs guard() in a pipeline fed from memory, a connection that
 * publishes --messages PUBLISHes (topic bench/dev-1/p0, --payload bytes, QoS
 * --qos) and acknowledges as many deliveries, while a stand-in broker answers
 * each with a PUBACK and delivers a PUBLISH: the four packets a message makes
 * through the broker's node proxy (publisher's PUBLISH and PUBACK,
 * subscriber's PUBLISH and PUBACK; replies go per whole message received,
 * however the hop cuts the bytes). The grant is an MQTTRouteGroup match
 * (every packet judged). The same pipeline without guard() (the stand-in
 * alone, `frame: none`) is the floor subtracted from it.
 *
 * cpu_us_per_msg: the Pipy process's CPU time (utime + stime), guard minus
 * floor, per message: the proxy's own JavaScript and filter work, robust to
 * machine load (median of --rounds runs, each in a fresh process; the wall
 * time is reported too, and is not). bench mqtt measures the
 * whole path with real sockets, broker and tunnels.
 *
 * --baseline DIR measures the program in DIR too (e.g. an older proxy/ from
 * `git archive`), interleaved with this tree's: before/after in one run.
 *
 * --chunks packet feeds every packet as a chunk of its own, both ways (as a
 * socket read gives them when messages are few); default message: a PUBLISH
 * and an acknowledgement per chunk.
 *
 *   npm run bench -- mqtt-guard [--messages 20000] [--payload 64] [--rounds 5] [--baseline DIR] [--chunks message|packet]
 */

const ENTRY = `
import * as mqtt from './mqtt.js'
var o = JSON.decode(pipy.load('bench.json'))
function varint(n) {
  var out = []
  for (var i = 0; i < 4; i++) { var b = n % 128; n = Math.floor(n / 128); if (n > 0) b |= 128; out.push(b); if (n === 0) break }
  return out
}
function pkt(first, body) { return new Data([first].concat(varint(body.size))).push(body) }
function str(s) { var d = new Data(s); return new Data([d.size >> 8, d.size & 255]).push(d) }
function u16(n) { return new Data([n >> 8, n & 255]) }
var v5 = o.version === 5
var props = v5 ? new Data([0]) : new Data
var payload = new Data(new Array(o.payload).fill(120))
var topic = 'bench/dev-1/p0'
var first = 0x30 | (o.qos << 1)
function publish(pid) {
  var body = str(topic)
  if (o.qos > 0) body.push(u16(pid))
  return pkt(first, body.push(props).push(payload))
}
function ack(pid) { return pkt(0x40, v5 ? u16(pid).push(new Data([0])) : u16(pid)) }
var connect = pkt(0x10, str('MQTT').push(new Data([o.version, 2, 0, 60])).push(props).push(str('bench-1')))
var connack = pkt(0x20, new Data(v5 ? [0, 0, 0] : [0, 0]))
// Client: CONNECT, then per message its PUBLISH and (QoS 1) the PUBACK of its
// delivery: chunks of one size, views of one template (packet id 1 throughout:
// the proxy forwards allowed packets whatever their ids), so that building the
// input costs little next to what is measured.
// --chunks packet: every packet a chunk of its own, both ways (what a socket
// read gives at low rates: the hop's cost per call, not per packet).
var perPacket = o.chunks === 'packet'
var tpl = publish(1)
if (o.qos > 0) tpl.push(ack(1))
var pubTpl = publish(1)
var ackTpl = ack(1)
var client = [connect]
for (var i = 1; i <= o.messages; i++) {
  if (!perPacket) client.push(new Data(tpl))
  else {
    client.push(new Data(pubTpl))
    if (o.qos > 0) client.push(new Data(ackTpl))
  }
}
client.push(new StreamEnd)
var chunk = tpl.size
var reply = o.qos > 0 ? ack(1).push(publish(1)) : publish(1)
var grant = { tcp: false, http: [], mqtt: [{ clientIdRe: new RegExp('^(?:bench-.*)$'), publishLevels: [['bench', '#']], subscribeLevels: [['bench', '#']] }] }
var info = () => ({ source: 'bench/pub', broker: 'bench/broker', grant })
// The stand-in broker: CONNACK once the CONNECT is in, then per message received its PUBACK and the delivery.
var $got = 0
var $done = 0
var broker = $=>$.replaceData(d => {
  $got += d.size
  var out = new Data
  if ($done === 0 && $got >= connect.size) { out.push(connack); $done = 1 }
  var n = Math.floor(($got - connect.size) / chunk)
  if (perPacket) {
    var evs = out.size > 0 ? [out] : []
    for (var m = $done; m <= n; m++) {
      if (o.qos > 0) evs.push(new Data(ackTpl))
      evs.push(new Data(pubTpl))
    }
    if (n >= $done) $done = n + 1
    return evs
  }
  for (var k = $done; k <= n; k++) out.push(reply)
  if (n >= $done) $done = n + 1
  return out
})
var out = 0
var layout = o.frame === 'none'
  ? pipeline($=>$.onStart(() => { $got = 0; $done = 0 }).pipe(() => 'b', { b: broker }).handleData(d => { out += d.size }))
  : pipeline($=>$.onStart(() => { $got = 0; $done = 0 }).pipe(() => 'g', { g: mqtt.guard(info, broker) }).handleData(d => { out += d.size }))
var t0 = Date.now()
layout.process(client).then(() => {
  var ms = Date.now() - t0
  console.log('RESULT ' + JSON.stringify({ ms, out }))
  pipy.exit(0)
})
`;

interface GuardRun {
  ms: number;
  out: number;
  /** CPU time of the whole Pipy process (user + system, 10 ms ticks), start to report. */
  cpuMs: number;
}

function cpuMsOf(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) * 10;
}

/**
 * One measurement in a fresh Pipy process. Pipy 1.5.18 does not always exit
 * on pipy.exit() after such a run (it idles on, seen for tens of seconds), so
 * the process is killed once it has reported.
 */
async function runOnce(pipy: string, programDir: string, o: { messages: number; payload: number; qos: number; version: number; frame: string; chunks: string }): Promise<GuardRun> {
  const dir = mkdtempSync(join(tmpdir(), 'fsmbench-mqttguard-'));
  try {
    for (const f of readdirSync(programDir)) if (f.endsWith('.js') && f !== 'main.js') copyFileSync(join(programDir, f), join(dir, f));
    writeFileSync(join(dir, 'config.json'), '{}');
    writeFileSync(join(dir, 'bench.json'), JSON.stringify(o));
    writeFileSync(join(dir, 'main.js'), ENTRY);
    const child = spawn(pipy, ['--log-level=info', '--admin-port-off', join(dir, 'main.js')], { stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    const line = await new Promise<string | undefined>((res) => {
      const timer = setTimeout(() => res(undefined), 120_000);
      const take = (d: Buffer): void => {
        text += d.toString('utf8');
        const l = text.split('\n').find((x) => x.includes('RESULT ') && x.trimEnd().endsWith('}'));
        if (l) {
          clearTimeout(timer);
          res(l);
        }
      };
      child.stdout.on('data', take);
      child.stderr.on('data', take);
      child.on('exit', () => {
        clearTimeout(timer);
        res(undefined);
      });
    });
    const cpuMs = line && child.exitCode === null ? cpuMsOf(child.pid!) : NaN;
    child.kill('SIGKILL');
    if (!line) throw new Error(`pipy did not report: ${text.slice(-2000)}`);
    return { ...(JSON.parse(line.slice(line.indexOf('RESULT ') + 7)) as { ms: number; out: number }), cpuMs };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export async function* run(flags: Record<string, string | boolean>): AsyncGenerator<object> {
  const pipy = pipyBinary();
  if (!pipy) throw new Error('no Pipy binary: set PIPY_BIN or put pipy on PATH');
  const messages = intFlag(flags, 'messages', 20000);
  const payload = intFlag(flags, 'payload', 64);
  const rounds = Math.max(1, intFlag(flags, 'rounds', 5));
  const chunks = flags.chunks ?? 'message';
  if (chunks !== 'message' && chunks !== 'packet') throw new Error(`--chunks ${JSON.stringify(chunks)}: message (a PUBLISH and an acknowledgement per chunk) or packet (a chunk per packet)`);
  const programs: Array<[string, string]> = [['current', join(packageRoot(), 'proxy')]];
  if (typeof flags.baseline === 'string') {
    const dir = resolve(flags.baseline);
    if (!existsSync(join(dir, 'mqtt.js'))) throw new Error(`--baseline ${JSON.stringify(flags.baseline)}: no mqtt.js there`);
    programs.unshift(['baseline', dir]);
  } else if (flags.baseline !== undefined) throw new Error('--baseline takes a directory');
  for (const version of [5, 4]) {
    for (const qos of [0, 1]) {
      const base = { messages, payload, qos, version, chunks };
      const floor: GuardRun[] = [];
      const runs = new Map<string, GuardRun[]>(programs.map(([name]) => [name, []]));
      const out = new Map<string, number>();
      for (let r = 0; r < rounds; r++) {
        floor.push(await runOnce(pipy, programs[0]![1], { ...base, frame: 'none' }));
        for (const [name, dir] of r % 2 ? [...programs].reverse() : programs) {
          const g = await runOnce(pipy, dir, { ...base, frame: 'guard' });
          runs.get(name)!.push(g);
          out.set(name, g.out);
        }
      }
      for (const [name] of programs) {
        const rs = runs.get(name)!;
        const cpu = median(rs.map((r) => r.cpuMs));
        const cpuFloor = median(floor.map((r) => r.cpuMs));
        yield {
          bench: 'mqtt-guard',
          program: name,
          case: `v${version === 5 ? 5 : '3.1.1'}/qos${qos}`,
          chunks,
          messages,
          payload_bytes: payload,
          rounds,
          cpu_us_per_msg: round(((cpu - cpuFloor) * 1000) / messages, 2),
          wall_us_per_msg: round(((median(rs.map((r) => r.ms)) - median(floor.map((r) => r.ms))) * 1000) / messages, 2),
          cpu_ms_median: cpu,
          floor_cpu_ms_median: cpuFloor,
          bytes_out: out.get(name),
          loadavg_1m: round(loadavg()[0]!, 2),
        };
      }
    }
  }
}
