import { Socket, connect as tcpConnect } from 'node:net';
import { pathToFileURL } from 'node:url';

/**
 * A small MQTT 3.1.1 / 5 client over node:net, for the lab's checks, the
 * MQTT tests and `bench mqtt`: it says exactly which reason code came back
 * (mosquitto_pub/sub print most of them, not all, and not the SUBACK order)
 * and can send bytes no well-behaved client sends (the fuzz run). Not a
 * general client: no reconnects, no session state, no flow control beyond
 * what a test needs.
 *
 * Also a command run inside a pod: `mqtt-client.js scenario HOST PORT JSON`,
 * `... bench HOST PORT JSON`, `... bench-sub ...`, `... bench-pub ...`, `... fuzz HOST PORT JSON`;
 * each prints one JSON line (bench-sub a ready line first).
 */

export type MqttVersion = 4 | 5;

export interface Packet {
  type: number;
  flags: number;
  body: Buffer;
}

export const PacketType = { CONNECT: 1, CONNACK: 2, PUBLISH: 3, PUBACK: 4, PUBREC: 5, PUBREL: 6, PUBCOMP: 7, SUBSCRIBE: 8, SUBACK: 9, UNSUBSCRIBE: 10, UNSUBACK: 11, PINGREQ: 12, PINGRESP: 13, DISCONNECT: 14 } as const;

function varint(n: number): Buffer {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 128;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

const str = (s: string | Buffer): Buffer => {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  const len = Buffer.alloc(2);
  len.writeUInt16BE(b.length);
  return Buffer.concat([len, b]);
};
const u16 = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};

export function packet(first: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([first]), varint(body.length), body]);
}

export interface ConnectOptions {
  version: MqttVersion;
  clientId: string;
  keepAlive?: number;
  will?: { topic: string; payload: string; qos?: number; retain?: boolean };
}

export function encodeConnect(o: ConnectOptions): Buffer {
  let flags = 0x02; // clean start
  if (o.will) flags |= 0x04 | ((o.will.qos ?? 0) << 3) | (o.will.retain ? 0x20 : 0);
  const parts = [str('MQTT'), Buffer.from([o.version, flags]), u16(o.keepAlive ?? 60)];
  if (o.version === 5) parts.push(varint(0));
  parts.push(str(o.clientId));
  if (o.will) {
    if (o.version === 5) parts.push(varint(0));
    parts.push(str(o.will.topic), str(o.will.payload));
  }
  return packet(0x10, Buffer.concat(parts));
}

export function encodePublish(version: MqttVersion, topic: string, payload: Buffer | string, qos: number, pid: number, retain = false): Buffer {
  const parts = [str(topic)];
  if (qos > 0) parts.push(u16(pid));
  if (version === 5) parts.push(varint(0));
  parts.push(typeof payload === 'string' ? Buffer.from(payload) : payload);
  return packet(0x30 | (qos << 1) | (retain ? 1 : 0), Buffer.concat(parts));
}

export function encodeSubscribe(version: MqttVersion, pid: number, filters: { filter: string; qos: number }[]): Buffer {
  const parts = [u16(pid)];
  if (version === 5) parts.push(varint(0));
  for (const f of filters) parts.push(str(f.filter), Buffer.from([f.qos]));
  return packet(0x82, Buffer.concat(parts));
}

/** Splits a byte stream into packets (no limit: the client trusts its broker). */
export class Framer {
  private buf: Buffer = Buffer.alloc(0);
  push(chunk: Buffer): Packet[] {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    const out: Packet[] = [];
    for (;;) {
      if (this.buf.length < 2) break;
      let len = 0;
      let mul = 1;
      let i = 1;
      let done = false;
      for (; i < this.buf.length && i <= 4; i++) {
        const b = this.buf[i]!;
        len += (b & 127) * mul;
        mul *= 128;
        if (!(b & 128)) {
          done = true;
          i++;
          break;
        }
      }
      if (!done || this.buf.length < i + len) break;
      const first = this.buf[0]!;
      out.push({ type: first >> 4, flags: first & 15, body: this.buf.subarray(i, i + len) });
      this.buf = this.buf.subarray(i + len);
    }
    return out;
  }
}

export interface Message {
  topic: string;
  qos: number;
  retain: boolean;
  payload: Buffer;
}

export function decodePublish(version: MqttVersion, p: Packet): Message & { pid: number } {
  const qos = (p.flags >> 1) & 3;
  let off = 0;
  const tlen = p.body.readUInt16BE(off);
  const topic = p.body.subarray(2, 2 + tlen).toString('utf8');
  off = 2 + tlen;
  let pid = 0;
  if (qos > 0) {
    pid = p.body.readUInt16BE(off);
    off += 2;
  }
  if (version === 5) {
    let plen = 0;
    let mul = 1;
    for (;;) {
      const b = p.body[off++]!;
      plen += (b & 127) * mul;
      mul *= 128;
      if (!(b & 128)) break;
    }
    off += plen;
  }
  return { topic, qos, retain: (p.flags & 1) === 1, payload: p.body.subarray(off), pid };
}

/** One MQTT connection; every answer it waits for has a timeout. */
export class MqttConnection {
  readonly packets: Packet[] = [];
  readonly messages: Message[] = [];
  closed = false;
  private readonly framer = new Framer();
  private waiters: { want: (p: Packet) => boolean; resolve: (p: Packet | null) => void }[] = [];
  private closeWaiters: (() => void)[] = [];
  private nextPid = 1;
  onMessage: ((m: Message) => void) | undefined;

  private constructor(
    readonly socket: Socket,
    readonly version: MqttVersion,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => {
      for (const p of this.framer.push(d)) this.take(p);
    });
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters) w.resolve(null);
      this.waiters = [];
      for (const c of this.closeWaiters) c();
    });
    socket.on('error', () => undefined);
  }

  static open(host: string, port: number, version: MqttVersion, timeoutMs = 5000): Promise<MqttConnection> {
    return new Promise((resolve, reject) => {
      const s = tcpConnect({ host, port });
      const t = setTimeout(() => {
        s.destroy();
        reject(new Error(`connect to ${host}:${port} timed out`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(t);
        resolve(new MqttConnection(s, version));
      });
      s.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  private take(p: Packet): void {
    this.packets.push(p);
    if (p.type === PacketType.PUBLISH) {
      const m = decodePublish(this.version, p);
      this.messages.push(m);
      this.onMessage?.(m);
      if (m.qos === 1) this.send(packet(0x40, u16(m.pid)));
      if (m.qos === 2) this.send(packet(0x50, u16(m.pid)));
    }
    if (p.type === PacketType.PUBREL) this.send(packet(0x70, p.body.subarray(0, 2)));
    const i = this.waiters.findIndex((w) => w.want(p));
    if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(p);
  }

  send(b: Buffer): void {
    if (!this.closed) this.socket.write(b);
  }

  /** The next packet `want` accepts, or null when the connection closes or `timeoutMs` passes. */
  wait(want: (p: Packet) => boolean, timeoutMs = 5000): Promise<Packet | null> {
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => {
      const w = { want, resolve: (p: Packet | null) => (clearTimeout(t), resolve(p)) };
      const t = setTimeout(() => {
        this.waiters = this.waiters.filter((x) => x !== w);
        resolve(null);
      }, timeoutMs);
      this.waiters.push(w);
    });
  }

  whenClosed(timeoutMs = 5000): Promise<boolean> {
    if (this.closed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), timeoutMs);
      this.closeWaiters.push(() => (clearTimeout(t), resolve(true)));
    });
  }

  /** CONNECT; the CONNACK's reason code (3.1.1 return code), or null (closed without one). */
  async connect(o: Omit<ConnectOptions, 'version'>): Promise<number | null> {
    this.send(encodeConnect({ ...o, version: this.version }));
    const ack = await this.wait((p) => p.type === PacketType.CONNACK);
    return ack ? ack.body[1]! : null;
  }

  /** SUBSCRIBE; the SUBACK's codes in order, or null. */
  async subscribe(filters: { filter: string; qos: number }[]): Promise<number[] | null> {
    const pid = this.nextPid++;
    this.send(encodeSubscribe(this.version, pid, filters));
    const ack = await this.wait((p) => p.type === PacketType.SUBACK && p.body.readUInt16BE(0) === pid);
    if (!ack) return null;
    let off = 2;
    if (this.version === 5) off += 1 + ack.body[2]!; // property length < 128 from mosquitto
    return [...ack.body.subarray(off)];
  }

  /**
   * PUBLISH; QoS 0: 0 once written; QoS 1: the PUBACK's reason (0 under 3.1.1);
   * QoS 2: the PUBREC's reason, and PUBREL/PUBCOMP completed when it is a success. null: no answer.
   */
  async publish(topic: string, payload: Buffer | string, qos: number, retain = false, timeoutMs = 5000): Promise<number | null> {
    const pid = qos > 0 ? this.nextPid++ : 0;
    this.send(encodePublish(this.version, topic, payload, qos, pid, retain));
    if (qos === 0) return 0;
    const ack = await this.wait((p) => p.type === (qos === 1 ? PacketType.PUBACK : PacketType.PUBREC) && p.body.readUInt16BE(0) === pid, timeoutMs);
    if (!ack) return null;
    const reason = ack.body.length > 2 ? ack.body[2]! : 0;
    if (qos === 2 && reason < 0x80) {
      this.send(packet(0x62, u16(pid)));
      const comp = await this.wait((p) => p.type === PacketType.PUBCOMP && p.body.readUInt16BE(0) === pid, timeoutMs);
      if (!comp) return null;
    }
    return reason;
  }

  /** The next delivered message matching `topic` (or any), or null. */
  async message(topic?: string, timeoutMs = 5000): Promise<Message | null> {
    const have = this.messages.find((m) => topic === undefined || m.topic === topic);
    if (have) {
      this.messages.splice(this.messages.indexOf(have), 1);
      return have;
    }
    const p = await this.wait((x) => x.type === PacketType.PUBLISH && (topic === undefined || decodePublish(this.version, x).topic === topic), timeoutMs);
    if (!p) return null;
    const m = decodePublish(this.version, p);
    const i = this.messages.findIndex((x) => x.topic === m.topic && x.payload.equals(m.payload));
    if (i >= 0) this.messages.splice(i, 1);
    return m;
  }

  disconnect(): void {
    this.send(packet(0xe0, this.version === 5 ? Buffer.from([0]) : Buffer.alloc(0)));
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }
}

// ---- bench: publish-to-deliver through one broker ------------------------------

export interface MqttBenchOptions {
  version: MqttVersion;
  qos: number;
  messages: number;
  /** PUBLISHes outstanding at a time per publisher (QoS 1: waiting for PUBACK). */
  window: number;
  payloadBytes: number;
  /** Publisher connections (default 1), each on its own topic; the messages are shared among them. */
  publishers?: number;
}

export interface MqttBenchResult {
  messages: number;
  delivered: number;
  msgs_per_s: number;
  p50_ms: number;
  p99_ms: number;
  /** Wall time of the measurement and this client process's CPU time in it (user + system). */
  seconds: number;
  client_cpu_ms: number;
}

/** A subscriber and `publishers` publishers; each payload carries its send time (hrtime ns). */
export async function benchPublishDeliver(host: string, port: number, o: MqttBenchOptions): Promise<MqttBenchResult> {
  const id = `bench-${process.pid}-${Date.now()}`;
  const nPub = Math.max(1, o.publishers ?? 1);
  const sub = await MqttConnection.open(host, port, o.version);
  const pubs: MqttConnection[] = [];
  try {
    for (let i = 0; i < nPub; i++) pubs.push(await MqttConnection.open(host, port, o.version));
    if ((await sub.connect({ clientId: `${id}-sub` })) !== 0) throw new Error('subscriber refused');
    for (const [i, pub] of pubs.entries()) if ((await pub.connect({ clientId: `${id}-pub${i}` })) !== 0) throw new Error('publisher refused');
    // One level per publisher under bench/<id>/: the subscriber takes them all with one filter.
    if ((await sub.subscribe([{ filter: `bench/${id}/+`, qos: o.qos }]))?.[0] !== o.qos) throw new Error('subscription refused');
    const lat: number[] = [];
    let delivered = 0;
    let lastAt = 0n;
    let done: () => void = () => undefined;
    const all = new Promise<void>((r) => (done = r));
    sub.onMessage = (m) => {
      lat.push(Number(process.hrtime.bigint() - m.payload.readBigUInt64BE(0)) / 1e6);
      sub.messages.length = 0;
      sub.packets.length = 0;
      lastAt = process.hrtime.bigint();
      if (++delivered === o.messages) done();
    };
    const pad = Buffer.alloc(Math.max(0, o.payloadBytes - 8));
    const cpu0 = process.cpuUsage();
    const started = process.hrtime.bigint();
    let sent = 0;
    const worker = async (pub: MqttConnection, topic: string): Promise<void> => {
      while (sent < o.messages) {
        sent++;
        const head = Buffer.alloc(8);
        head.writeBigUInt64BE(process.hrtime.bigint());
        const r = await pub.publish(topic, Buffer.concat([head, pad]), o.qos, false, 10_000);
        pub.packets.length = 0;
        if (o.qos > 0 && r !== 0) throw new Error(`publish answered ${r}`);
        if (o.qos === 0 && sent % o.window === 0) await new Promise((res) => setImmediate(res));
      }
    };
    await Promise.all(pubs.flatMap((pub, i) => Array.from({ length: o.qos === 0 ? 1 : o.window }, () => worker(pub, `bench/${id}/p${i}`))));
    await Promise.race([all, new Promise((r) => setTimeout(r, 10_000))]);
    // Up to the last delivery: a message the broker dropped must not add the 10 s wait to the rate (`delivered` says it).
    const seconds = Number((delivered === o.messages || lastAt === 0n ? process.hrtime.bigint() : lastAt) - started) / 1e9;
    return benchResult(o.messages, delivered, seconds, lat, process.cpuUsage(cpu0));
  } finally {
    for (const pub of pubs) pub.destroy();
    sub.destroy();
  }
}

/** One bench result from the deliveries' latencies (ms, sorted here) and the client's CPU. */
function benchResult(messages: number, delivered: number, seconds: number, lat: number[], cpu: NodeJS.CpuUsage): MqttBenchResult {
  lat.sort((a, b) => a - b);
  const q = (p: number) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))]! : NaN);
  return {
    messages,
    delivered,
    msgs_per_s: Math.round(delivered / seconds),
    p50_ms: Math.round(q(0.5) * 1000) / 1000,
    p99_ms: Math.round(q(0.99) * 1000) / 1000,
    seconds: Math.round(seconds * 1000) / 1000,
    client_cpu_ms: Math.round((cpu.user + cpu.system) / 1000),
  };
}

// ---- bench in several processes: one subscriber, publishers apart ---------------
//
// One Node process running the subscriber and every publisher can come close
// to a core of its own on the direct path; then the client, not the broker or
// the mesh, sets the rate. `bench-sub` and `bench-pub` split it: the bench
// starts the subscriber, waits for its ready line, then runs the publishers as
// processes of their own. Send stamps are process.hrtime (CLOCK_MONOTONIC),
// one clock for every process of the machine.

export interface MqttSplitOptions {
  version: MqttVersion;
  qos: number;
  /** Shared by every process of one measurement: the topics are bench/<id>/p<index>. */
  id: string;
}

/** Subscribes, prints `{"ready":true}`, then takes `messages` deliveries (or stops 10 s after the last one). */
export async function benchSubscriber(host: string, port: number, o: MqttSplitOptions & { messages: number }): Promise<MqttBenchResult> {
  const sub = await MqttConnection.open(host, port, o.version);
  try {
    if ((await sub.connect({ clientId: `${o.id}-sub` })) !== 0) throw new Error('subscriber refused');
    if ((await sub.subscribe([{ filter: `bench/${o.id}/+`, qos: o.qos }]))?.[0] !== o.qos) throw new Error('subscription refused');
    const lat: number[] = [];
    let delivered = 0;
    let firstSent = 0n;
    let lastAt = 0n;
    let done: () => void = () => undefined;
    const all = new Promise<void>((r) => (done = r));
    sub.onMessage = (m) => {
      const now = process.hrtime.bigint();
      const sent = m.payload.readBigUInt64BE(0);
      if (firstSent === 0n || sent < firstSent) firstSent = sent;
      lat.push(Number(now - sent) / 1e6);
      lastAt = now;
      sub.messages.length = 0;
      sub.packets.length = 0;
      if (++delivered === o.messages) done();
    };
    // Not a timer per message: a check each second for 10 s without a delivery (60 s before the first).
    const startedAt = process.hrtime.bigint();
    const idle = setInterval(() => {
      const since = process.hrtime.bigint() - (lastAt === 0n ? startedAt : lastAt);
      if (since > (lastAt === 0n ? 60_000_000_000n : 10_000_000_000n)) done();
    }, 1000);
    const cpu0 = process.cpuUsage();
    console.log(JSON.stringify({ ready: true }));
    await all;
    clearInterval(idle);
    const cpu = process.cpuUsage(cpu0);
    // From the first message sent to the last one delivered.
    const seconds = delivered > 0 ? Number(lastAt - firstSent) / 1e9 : NaN;
    return benchResult(o.messages, delivered, seconds, lat, cpu);
  } finally {
    sub.destroy();
  }
}

/** One publisher connection: `messages` PUBLISHes to bench/<id>/p<index>, `window` in flight at QoS 1. */
export async function benchPublisher(
  host: string,
  port: number,
  o: MqttSplitOptions & { messages: number; window: number; payloadBytes: number; index: number },
): Promise<{ sent: number; client_cpu_ms: number }> {
  const pub = await MqttConnection.open(host, port, o.version);
  try {
    if ((await pub.connect({ clientId: `${o.id}-pub${o.index}` })) !== 0) throw new Error('publisher refused');
    const topic = `bench/${o.id}/p${o.index}`;
    const pad = Buffer.alloc(Math.max(0, o.payloadBytes - 8));
    const cpu0 = process.cpuUsage();
    let sent = 0;
    const worker = async (): Promise<void> => {
      while (sent < o.messages) {
        sent++;
        const head = Buffer.alloc(8);
        head.writeBigUInt64BE(process.hrtime.bigint());
        const r = await pub.publish(topic, Buffer.concat([head, pad]), o.qos, false, 10_000);
        pub.packets.length = 0;
        if (o.qos > 0 && r !== 0) throw new Error(`publish answered ${r}`);
        if (o.qos === 0 && sent % o.window === 0) await new Promise((res) => setImmediate(res));
      }
    };
    await Promise.all(Array.from({ length: o.qos === 0 ? 1 : o.window }, worker));
    // QoS 0: the bytes are written when the socket has drained.
    if (pub.socket.writableLength > 0) await new Promise((res) => pub.socket.once('drain', res));
    const cpu = process.cpuUsage(cpu0);
    return { sent, client_cpu_ms: Math.round((cpu.user + cpu.system) / 1000) };
  } finally {
    pub.disconnect();
  }
}

// ---- fuzz: malformed packets ---------------------------------------------------

export interface FuzzResult {
  connections: number;
  /** Connections the far side closed (or reset) after our garbage. */
  closed: number;
  /** Connections still open when we gave up waiting (the proxy must not hang on garbage forever, but may wait for more bytes). */
  open: number;
}

/** xorshift32: the same seed, the same bytes. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** The malformed inputs: each a first packet or a CONNECT followed by something broken. */
export function fuzzCase(r: () => number, version: MqttVersion): Buffer {
  const connect = encodeConnect({ version, clientId: `fuzz-${r() % 1000}` });
  const junk = (n: number) => Buffer.from(Array.from({ length: n }, () => r() & 255));
  switch (r() % 8) {
    case 0: return junk(1 + (r() % 64)); // random bytes
    case 1: return Buffer.from([0x10, 0xff, 0xff, 0xff, 0xff, 0x01]); // remaining length of 5 bytes
    case 2: return Buffer.from([0x30, 0xff, 0xff, 0xff, 0x7f]); // 256 MB announced
    case 3: return Buffer.concat([connect, Buffer.from([0x32, 0x03, 0x00, 0x09, 0x61])]); // topic longer than the packet
    case 4: return Buffer.concat([connect, Buffer.from([0x82, 0x02, 0x00, 0x01])]); // SUBSCRIBE without filters
    case 5: return Buffer.concat([connect, encodePublish(version, 'a/+/b', 'x', 1, 1)]); // wildcard in a topic name
    case 6: return Buffer.concat([connect, connect]); // a second CONNECT
    default: {
      const p = encodeConnect({ version, clientId: 'x' });
      const cut = p.subarray(0, 2 + (r() % (p.length - 2)));
      return Buffer.concat([Buffer.from([0x10, cut.length - 2]), cut.subarray(2), junk(r() % 8)]); // a truncated CONNECT body
    }
  }
}

export async function fuzz(host: string, port: number, o: { seconds: number; seed: number; version: MqttVersion }): Promise<FuzzResult> {
  const r = rng(o.seed);
  const end = Date.now() + o.seconds * 1000;
  const out: FuzzResult = { connections: 0, closed: 0, open: 0 };
  while (Date.now() < end) {
    const batch = await Promise.all(
      Array.from({ length: 8 }, async () => {
        const c = await MqttConnection.open(host, port, o.version);
        c.send(fuzzCase(r, o.version));
        const closed = await c.whenClosed(1000);
        c.destroy();
        return closed;
      }),
    );
    for (const closed of batch) {
      out.connections++;
      if (closed) out.closed++;
      else out.open++;
    }
  }
  return out;
}

// ---- scenario: steps from JSON, for tests and lab checks run inside a pod ----

export type Step =
  | { op: 'connect'; clientId: string; will?: ConnectOptions['will'] }
  | { op: 'subscribe'; filters: { filter: string; qos: number }[] }
  | { op: 'publish'; topic: string; payload: string; qos: number; retain?: boolean }
  | { op: 'message'; topic?: string; timeoutMs?: number }
  | { op: 'closed'; timeoutMs?: number }
  | { op: 'received' }
  | { op: 'sleep'; ms: number }
  | { op: 'kill' }
  | { op: 'disconnect' };

/** Runs the steps on one connection; one result per step (a code, codes, a message, a boolean). */
export async function scenario(host: string, port: number, version: MqttVersion, steps: Step[]): Promise<unknown[]> {
  const c = await MqttConnection.open(host, port, version);
  const out: unknown[] = [];
  try {
    for (const s of steps) {
      switch (s.op) {
        case 'connect': out.push(await c.connect({ clientId: s.clientId, will: s.will })); break;
        case 'subscribe': out.push(await c.subscribe(s.filters)); break;
        case 'publish': out.push(await c.publish(s.topic, s.payload, s.qos, s.retain ?? false, 3000)); break;
        case 'message': {
          const m = await c.message(s.topic, s.timeoutMs ?? 3000);
          out.push(m && { topic: m.topic, payload: m.payload.toString(), qos: m.qos, retain: m.retain });
          break;
        }
        case 'closed': out.push(await c.whenClosed(s.timeoutMs ?? 3000)); break;
        // The topics of messages delivered and not yet taken by a 'message' step.
        case 'received': out.push(c.messages.map((m) => m.topic)); break;
        case 'sleep': await new Promise((r) => setTimeout(r, s.ms)); out.push(null); break;
        case 'kill': c.destroy(); out.push(null); break;
        case 'disconnect': c.disconnect(); out.push(null); break;
      }
    }
  } finally {
    c.destroy();
  }
  return out;
}

async function main(argv: string[]): Promise<void> {
  const [mode, host, port, json] = argv;
  if (!mode || !host || !port || json === undefined) throw new Error('usage: mqtt-client scenario|bench|bench-sub|bench-pub|fuzz HOST PORT JSON');
  const o = JSON.parse(json) as Record<string, unknown>;
  const version = (o.version === 4 ? 4 : 5) as MqttVersion;
  let result: unknown;
  if (mode === 'scenario') result = await scenario(host, Number(port), version, o.steps as Step[]);
  else if (mode === 'bench') result = await benchPublishDeliver(host, Number(port), { version, qos: Number(o.qos ?? 1), messages: Number(o.messages ?? 2000), window: Number(o.window ?? 16), payloadBytes: Number(o.payloadBytes ?? 64), publishers: Number(o.publishers ?? 1) });
  else if (mode === 'bench-sub') result = await benchSubscriber(host, Number(port), { version, qos: Number(o.qos ?? 1), id: String(o.id), messages: Number(o.messages ?? 2000) });
  else if (mode === 'bench-pub')
    result = await benchPublisher(host, Number(port), { version, qos: Number(o.qos ?? 1), id: String(o.id), messages: Number(o.messages ?? 2000), window: Number(o.window ?? 16), payloadBytes: Number(o.payloadBytes ?? 64), index: Number(o.index ?? 0) });
  else if (mode === 'fuzz') result = await fuzz(host, Number(port), { version, seconds: Number(o.seconds ?? 3), seed: Number(o.seed ?? 1) });
  else throw new Error(`unknown mode ${JSON.stringify(mode)}: scenario, bench, bench-sub, bench-pub or fuzz`);
  console.log(JSON.stringify(result));
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main(process.argv.slice(2)).then(
    () => process.exit(0),
    (err: unknown) => {
      console.log(JSON.stringify({ error: (err as Error).message }));
      process.exit(1);
    },
  );
}
