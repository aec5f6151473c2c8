import { spawn } from 'node:child_process';
import { copyFileSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findPipy, pipySkipReason } from '../support/pipy.js';

/**
 * proxy/mqtt.js guard() inside Pipy, fed from memory (no sockets): one Pipy
 * process builds the hop's pipeline once and runs whole connections through
 * it one after another, with a stand-in broker that records what reaches it
 * and answers a CONNECT with a CONNACK. What a real broker and real clients
 * cannot show on demand:
 *
 * - Connections a pipeline serves one after another, after one that ended
 *   between packets or inside a PUBLISH: each reads its own first byte. (Pipy
 *   1.5.18's deframe handed the buffer of an unfinished read to the next
 *   connection; the guard no longer uses deframe, and this still holds it to
 *   that.)
 * - The same packets cut into chunks of every size (the guard scans chunks
 *   itself: fixed headers, topics and properties cut anywhere), MQTT 5 topic
 *   aliases, a two-byte remaining length.
 * - The topic label bound: at most maxTopics values per worker, the rest
 *   counted under (other), whatever topics clients use.
 * - Packets cut at any byte, and topics named like the methods of a plain
 *   object ('constructor': PipyJS objects answer it).
 * - The proxy's own answers to denied PUBLISHes (MQTT 5), byte for byte,
 *   including the PUBCOMP for a denied QoS 2 flow's PUBREL, which a
 *   well-behaved client never sends after a failed PUBREC.
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const programDir = fileURLToPath(new URL('../../proxy/', import.meta.url));

const ENTRY = `
import * as mqtt from './mqtt.js'
import * as metrics from './metrics.js'
function varint(n) {
  var out = []
  for (var i = 0; i < 4; i++) { var b = n % 128; n = Math.floor(n / 128); if (n > 0) b |= 128; out.push(b); if (n === 0) break }
  return out
}
function pkt(first, body) { return new Data([first].concat(varint(body.size))).push(body) }
function str(s) { var d = new Data(s); return new Data([d.size >> 8, d.size & 255]).push(d) }
var connect = pkt(0x10, str('MQTT').push(new Data([5, 2, 0, 60, 0])).push(str('dev-1')))
function publish(topic, pid, payload) { return pkt(0x32, str(topic).push(new Data([pid >> 8, pid & 255, 0])).push(new Data(payload))) }
var grant = { tcp: false, http: [], mqtt: [{ clientIdRe: null, publishLevels: [['#']], subscribeLevels: [] }] }
var info = () => ({ source: 'iot/device', broker: 'iot/broker', grant })
var $atBroker
var $toClient
var $ended
var $skip
var broker = $=>$
  .handleData(d => { $atBroker.push(d) })
  .replaceData(d => {
    // CONNACK for a CONNECT, PINGRESP for a PINGREQ (the proxy sends one per answer of its own), however the proxy
    // groups packets into chunks: the stand-in follows packet boundaries across chunks ($skip: bytes of the current
    // packet still to come; the proxy never cuts a fixed header, and lengths here are under 16 KiB).
    var b = d.toArray()
    var r = new Data
    var i = $skip
    for (var g = 0; i < b.length; g++) {
      var len = b[i + 1] & 127
      var hl = 2
      if (b[i + 1] & 128) { len += b[i + 2] * 128; hl = 3 }
      if (b[i] === 0x10) r.push(pkt(0x20, new Data([0, 0, 0])))
      if (b[i] === 0xc0) r.push(new Data([0xd0, 0]))
      i += hl + len
    }
    $skip = i - b.length
    return r
  })
var layout = pipeline($=>$
  .onStart(() => { $atBroker = new Data; $toClient = new Data; $ended = false; $skip = 0 })
  .pipe(() => 'guard', { guard: mqtt.guard(info, broker) })
  .handleData(d => { $toClient.push(d) })
  // Once per connection: when the proxy closes a connection, the client's own end follows its StreamEnd (a real
  // connect() ignores it; this stand-in passes it on).
  .handleStreamEnd(() => { if (!$ended) results.push({ broker: $atBroker.toArray().join(','), client: $toClient.toArray().join(',') }); $ended = true })
)
var results = []
var expected = []
var steps = []
function session(chunks, want) {
  steps.push(() => {
    expected.push(want)
    return layout.process(chunks.concat([new StreamEnd]))
  })
}
var full = connect.toArray().concat(publish('devices/dev-1/t', 1, 'hello').toArray())
var half = publish('devices/dev-1/t', 2, 'a longer payload, cut short').toArray()
var one = { broker: full.join(','), client: pkt(0x20, new Data([0, 0, 0])).toArray().join(',') }
// A connection that stops between packets, then one that stops inside a PUBLISH, each followed by a whole one.
session([new Data(full)], one)
session([new Data(full)], one)
session([new Data(connect.toArray().concat(half.slice(0, 9)))], { broker: connect.toArray().join(','), client: one.client })
session([new Data(full)], one)
// One byte at a time: the fixed header and the PUBLISH read across chunks.
session(full.map(b => new Data([b])), one)
// Topic labels: maxTopics (3 in this config.json) values, then (other).
var topics = ['a/1', 'b/1', 'c/1', 'd/1', 'e/1']
var many = new Data(connect)
topics.forEach((t, i) => many.push(publish(t, i + 1, 'x')))
session([many], null)
// Topics named like the methods of a plain object are topics like any other.
var odd = connect.toArray().concat(publish('constructor', 3, 'x').toArray()).concat(publish('valueOf', 4, 'y').toArray())
session([new Data(odd)], { broker: odd.join(','), client: one.client })
// Denied ('#' does not reach $-topics), MQTT 5: QoS 0 dropped; QoS 1 and 2 answered 0x87 by the proxy, and the
// PUBREL of the QoS 2 one with PUBCOMP; the broker sees a PINGREQ in place of each answered packet, nothing else.
function q(first, topic, pid) { return pkt(first, str(topic).push(new Data(pid ? [pid >> 8, pid & 255, 0] : [0])).push(new Data('x'))) }
var denied = new Data(connect).push(q(0x30, '$SYS/a', 0)).push(q(0x32, '$SYS/b', 5)).push(q(0x34, '$SYS/c', 7)).push(new Data([0x62, 2, 0, 7]))
session([denied], {
  broker: connect.toArray().concat([0xc0, 0, 0xc0, 0, 0xc0, 0]).join(','),
  client: [32, 3, 0, 0, 0, 0x40, 3, 0, 5, 0x87, 0x50, 3, 0, 7, 0x87, 0x70, 2, 0, 7].join(','),
})
// MQTT 5 topic aliases: an allowed PUBLISH sets alias 1 and the next names its topic by the alias alone; a PUBLISH
// setting alias 2 on a denied topic is answered 0x87 (and the alias is not learnt).
function pa(topic, pid, props, payload) { return pkt(0x32, str(topic).push(new Data([pid >> 8, pid & 255, props.length].concat(props))).push(new Data(payload))) }
var connack = [32, 3, 0, 0, 0]
var aliasSet = pa('devices/dev-1/a', 1, [35, 0, 1], 'x')
var aliasUse = pa('', 2, [35, 0, 1], 'y')
session([new Data(connect).push(aliasSet).push(aliasUse).push(pa('$SYS/z', 3, [35, 0, 2], 'z'))], {
  broker: connect.toArray().concat(aliasSet.toArray(), aliasUse.toArray(), [0xc0, 0]).join(','),
  client: connack.concat([0x40, 3, 0, 3, 0x87]).join(','),
})
// An empty topic with an alias never set is malformed: the connection closes, nothing of it reaches the broker.
session([new Data(connect).push(pa('', 1, [35, 0, 9], 'x'))], { broker: connect.toArray().join(','), client: '' })
// The same allowed packets cut into chunks of every size from 1 byte: aliases, a user property, a PUBLISH with a
// two-byte remaining length, an acknowledgement between them. The broker gets exactly the client's bytes.
var big = pa('devices/dev-1/big', 5, [], new Array(300).fill(120))
var mixed = connect.toArray().concat(aliasSet.toArray(), aliasUse.toArray(), big.toArray(), [0x40, 2, 0, 9], pa('devices/dev-1/b', 6, [38, 0, 1, 107, 0, 1, 118], 'w').toArray())
;[1, 2, 3, 5, 7, 64].forEach(size => {
  var chunks = []
  for (var i = 0; i < mixed.length; i += size) chunks.push(new Data(mixed.slice(i, i + size)))
  session(chunks, { broker: mixed.join(','), client: connack.join(',') })
})
// A denied PUBLISH whose payload runs over several chunks is dropped to its last byte, the allowed one after it
// goes through whole, however the bytes are cut.
var deniedBig = pa('$SYS/big', 8, [], new Array(300).fill(120))
var after = pa('devices/dev-1/after', 9, [], 'ok')
var mixedDenied = connect.toArray().concat(deniedBig.toArray(), after.toArray())
;[1, 2, 3, 7, 64, 100000].forEach(size => {
  var chunks = []
  for (var i = 0; i < mixedDenied.length; i += size) chunks.push(new Data(mixedDenied.slice(i, i + size)))
  session(chunks, { broker: connect.toArray().concat([0xc0, 0], after.toArray()).join(','), client: connack.concat([0x40, 3, 0, 8, 0x87]).join(',') })
})
// Random streams, cut at random: allowed and denied PUBLISHes of every QoS (payloads up to 300 bytes: one- and
// two-byte lengths, some with a user property) and acknowledgements, in chunks of 1 to 50 bytes. The broker gets
// exactly the allowed packets and a PINGREQ per answered one; the client gets the answers in order.
var seed = 20261204
function rnd(n) { seed = (seed * 16807) % 2147483647; return seed % n }
for (var sn = 0; sn < 40; sn++) {
  var stream = connect.toArray()
  var toBroker = connect.toArray()
  var toClient = connack.slice(0)
  for (var k = 1; k <= 15; k++) {
    var kind = rnd(7)
    if (kind === 6) {
      var ack = [0x40, 2, 0, k]
      stream = stream.concat(ack)
      toBroker = toBroker.concat(ack)
    } else {
      var qos = kind % 3
      var denied = kind >= 3
      var payload = new Array(rnd(301)).fill(97)
      var props = rnd(3) === 0 ? [38, 0, 1, 107, 0, 1, 118] : []
      var topic = denied ? '$SYS/r' + k : 'devices/dev-1/r' + k
      var body = str(topic)
      if (qos > 0) body.push(new Data([0, k]))
      var p = pkt(0x30 | (qos << 1), body.push(new Data([props.length].concat(props))).push(new Data(payload))).toArray()
      stream = stream.concat(p)
      if (!denied) toBroker = toBroker.concat(p)
      else if (qos > 0) {
        toBroker = toBroker.concat([0xc0, 0])
        toClient = toClient.concat([qos === 1 ? 0x40 : 0x50, 3, 0, k, 0x87])
      }
    }
  }
  var cuts = []
  for (var at = 0; at < stream.length; at += cuts[cuts.length - 1].size) cuts.push(new Data(stream.slice(at, at + 1 + rnd(50))))
  session(cuts, { broker: toBroker.join(','), client: toClient.join(',') })
}
function run(i) {
  if (i === steps.length) return finish()
  steps[i]().then(() => run(i + 1))
}
function labels(m, depth) {
  if (depth === 0) return [m.label]
  return m.submetrics().flatMap(s => labels(s, depth - 1).map(l => (depth === 1 ? l : s.label + '|' + l)))
}
function finish() {
  var topicLabels = labels(metrics.mqttMessages, 5).map(l => l.split('|').pop())
  console.log('RESULT ' + JSON.stringify({ results, expected, topicLabels }))
  pipy.exit(0)
}
run(0)
`;

interface Outcome {
  results: { broker: string; client: string }[];
  expected: ({ broker: string; client: string } | null)[];
  topicLabels: string[];
}

maybe('MQTT guard() in Pipy, connections fed from memory', () => {
  let out: Outcome;

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmt-mqtt-guard-'));
    try {
      for (const f of readdirSync(programDir)) if (f.endsWith('.js') && f !== 'main.js') copyFileSync(join(programDir, f), join(dir, f));
      writeFileSync(join(dir, 'config.json'), JSON.stringify({ mqtt: { topicLevels: 1, maxTopics: 3, maxPacketBytes: 1048576 } }));
      writeFileSync(join(dir, 'main.js'), ENTRY);
      // Pipy 1.5.18 does not always exit on pipy.exit() (it idles on, seen for tens of seconds): the result line is
      // taken as soon as it is printed and the process killed.
      const child = spawn(findPipy()!, ['--log-level=warn', '--admin-port-off', join(dir, 'main.js')], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
      let text = '';
      const line = await new Promise<string | undefined>((res) => {
        const timer = setTimeout(() => res(undefined), 20_000);
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
          res(text.split('\n').find((x) => x.includes('RESULT ')));
        });
      });
      child.kill('SIGKILL');
      if (!line) throw new Error(`pipy printed no result: ${text}`);
      out = JSON.parse(line.slice(line.indexOf('RESULT ') + 7)) as Outcome;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);

  test('every connection a pipeline serves reads its own first byte, after one that ended between packets or inside a PUBLISH; odd topic names pass; denied PUBLISHes are answered per QoS; topic aliases; any chunking; random streams cut at random', () => {
    const judged = out.expected.flatMap((want, i) => (want ? [i] : []));
    expect(judged.length).toBe(61);
    expect(judged.map((i) => out.results[i])).toEqual(judged.map((i) => out.expected[i]));
  });

  test('topic labels stop at maxTopics per worker; the rest count under (other)', () => {
    // devices/dev-1/t (the earlier connections), a/1 and b/1 take the three values; c/1, d/1, e/1 and the last connection's find none left.
    expect([...new Set(out.topicLabels)].sort()).toEqual(['(other)', 'a/#', 'b/#', 'devices/#']);
  });
});
