// MQTT 3.1.1 and 5 access control and metrics for a broker pod of this node:
// the hop that delivers a connection to the broker (main.js, local hop of the
// outbound side and the inbound tunnel side alike) runs it in front of
// connect(). Its decisions use the source identity the hop proved (the pod
// table for a same-node client, the client certificate of the tunnel for a
// remote one) and the MQTTRouteGroup matches of the TrafficTargets
// (config.access[].mqtt, see access.js grant).
//
// Why our own framing rather than decodeMQTT/encodeMQTT (Pipy 1.5.18,
// src/filters/mqtt.cpp): the decoder parses every packet but CONNECT as MQTT 5
// (protocolLevel defaults to 5 per packet), so a 3.1.1 PUBLISH is misread and
// silently dropped; packets it cannot parse vanish without a trace (we must
// close and count); the encoder drops will properties and subscription options
// (no local, retain as published, retain handling), folds duplicate user
// properties; and the decoder buffers a packet of any announced length. So the
// proxy reads only the fixed header and the few fields it judges (topic,
// packet id, topic alias, filters, client id, will topic) with a deframe state
// machine, bounded by maxPacketBytes, and forwards the packets it allows byte
// for byte (a SUBSCRIBE with denied filters is rebuilt from the client's own
// bytes minus those filters).
//
// Cost: every packet of a busy connection passes here, so the hot path (a
// PUBLISH, either way; the acks) is kept to a few JavaScript calls: the fixed
// header is read as two bytes at once, a PUBLISH as one read of its first
// PUBLISH_PREFIX bytes (topic, packet id, properties; for small messages the
// whole packet), whatever follows is passed through without a call, and what
// a connection learns about a topic (allowed, metric label, counters) is kept
// for the connection. docs/mqtt.md has the numbers.
//
// Answering the client: the pipeline is linear (client -> broker -> client),
// so an answer of ours (PUBACK/PUBREC "not authorized", the SUBACK of a
// SUBSCRIBE whose every filter was denied, the PUBCOMP of a denied QoS 2
// flow) is sent to the broker as a PINGREQ in place of the denied packet: the
// broker answers PINGREQs in order with PINGRESP, and the PINGRESP that comes
// back is replaced by our answer (a FIFO per connection tells which PINGRESP
// is whose). A denied CONNECT never reaches the broker: the client gets the
// CONNACK and the connection closes.

import config from './config.js'
import * as topics from './mqtt-topic.js'
import * as metrics from './metrics.js'

var CONNECT = 1
var CONNACK = 2
var PUBLISH = 3
var PUBREL = 6
var SUBSCRIBE = 8
var SUBACK = 9
var PINGREQ = 12
var PINGRESP = 13

// Reason codes (MQTT 5) and CONNACK return codes (3.1.1).
var V5_NOT_AUTHORIZED = 0x87
var V3_CONNACK_NOT_AUTHORIZED = 5
var V3_SUBACK_FAILURE = 0x80

var settings = config.mqtt

// Per connection
var $info // { source, broker, grant } from main.js
var $fr // per direction framing state
var $level // protocol level of the CONNECT (4 = 3.1.1, 5 = MQTT 5)
var $connected // a CONNECT was seen
var $refused // the CONNACK refusing the client, when the CONNECT is denied
var $all // every packet allowed (TCPRoute grant or permissive policy)
var $pub // allowed PUBLISH filters (levels), placeholders filled in
var $sub // allowed SUBSCRIBE filters (levels)
var $pings // FIFO: per PINGREQ sent to the broker, null (the client's own) or our answer (Data)
var $subs // packet id -> per-filter allowed mask of a SUBSCRIBE sent with filters removed
var $q2 // packet ids of denied QoS 2 PUBLISHes: their PUBREL is answered by us
var $aliasIn // MQTT 5 topic aliases client -> broker: alias -> topic
var $aliasOut // broker -> client
var $closed // the connection is being closed: nothing more is read
var $topics // per direction: topic -> { allowed, label, counters by QoS } (devices repeat their topics)

// ---- metrics ---------------------------------------------------------------

// Topic label values seen by this worker: at most settings.maxTopics, the
// rest counted under '(other)', whatever clients send.
var topicLabels = {}
var topicCount = 0

function topicLabel(topic) {
  var t = topics.foldTopic(topic, settings.topicLevels)
  if (topicLabels[t] === true) return t
  if (topicCount >= settings.maxTopics) return '(other)'
  topicLabels[t] = true
  topicCount++
  return t
}

// What this connection knows about a topic, worked out once: whether it is a
// valid topic name, whether it may publish it, its metric label and its
// message and byte counters per QoS. At most settings.maxTopics entries per
// connection, then no more caching.
function topicInfo(side, topic) {
  var t = $topics[side]
  var info = t.map[topic]
  // (A plain object answers 'constructor' and 'valueOf' with its own methods: topics can be named so.)
  if (typeof info === 'object') return info
  var valid = topics.validTopicName(topic)
  info = { valid, allowed: valid && (side !== 'publish' || canPublish(topic)), label: valid ? topicLabel(topic) : '', counters: [] }
  if (t.size < settings.maxTopics) {
    t.map[topic] = info
    t.size++
  }
  return info
}

// The message and byte counters of a topic's messages of one QoS, made once per connection.
function counters(side, info, qos) {
  var q = String(qos)
  return (info.counters[qos] = [
    metrics.mqttMessages.withLabels($info.source, $info.broker, side, q, info.label),
    metrics.mqttBytes.withLabels($info.source, $info.broker, side, q, info.label),
  ])
}

function count(kind, extra, n) {
  var m = metrics[kind]
  var c = extra.length === 1 ? m.withLabels($info.source, $info.broker, extra[0])
    : extra.length === 2 ? m.withLabels($info.source, $info.broker, extra[0], extra[1])
    : m.withLabels($info.source, $info.broker, extra[0], extra[1], extra[2])
  c.increase(n === undefined ? 1 : n)
}

// ---- bytes -----------------------------------------------------------------

function varint(n) {
  var out = []
  // At most 4 bytes: lengths are bounded by maxPacketBytes (< 256 MB).
  for (var i = 0; i < 4; i++) {
    var b = n % 128
    n = Math.floor(n / 128)
    if (n > 0) b |= 128
    out.push(b)
    if (n === 0) break
  }
  return out
}

function packet(first, body) {
  var d = new Data([first].concat(varint(body ? body.size : 0)))
  if (body) d.push(body)
  return d
}

function u16(n) {
  return [(n >> 8) & 255, n & 255]
}

// Reading a packet body: from a copy (the original is forwarded untouched).
// Every read checks bounds; a short packet throws, which the framer turns
// into a 'malformed' close.
function take(d, n) {
  if (n > d.size) throw new Error('malformed')
  return d.shift(n)
}
function u8(d) {
  return take(d, 1).toArray()[0]
}
function u16of(d) {
  var b = take(d, 2).toArray()
  return b[0] * 256 + b[1]
}
function readVarint(d) {
  var n = 0
  var mul = 1
  for (var i = 0; i < 4; i++) {
    var b = u8(d)
    n += (b & 127) * mul
    if (!(b & 128)) return n
    mul *= 128
  }
  throw new Error('malformed')
}
function str(d) {
  return take(d, u16of(d)).toString()
}

// Property 35 (topic alias) in an MQTT 5 property block, or 0.
function u16at(b, i) {
  return i + 1 < b.length ? b[i] * 256 + b[i + 1] : 0
}

// The length of the value of property `id` at b[i] (MQTT 5, 2.2.2.2).
function propertyLength(id, b, i) {
  if (id === 1 || id === 23 || id === 25 || id === 36 || id === 37 || id === 40 || id === 41 || id === 42) return 1
  if (id === 19 || id === 33 || id === 34 || id === 35) return 2
  if (id === 2 || id === 17 || id === 24 || id === 39) return 4
  if (id === 11) return (b[i] & 128) ? ((b[i + 1] & 128) ? ((b[i + 2] & 128) ? 4 : 3) : 2) : 1
  if (id === 3 || id === 8 || id === 9 || id === 18 || id === 21 || id === 22 || id === 26 || id === 28 || id === 31) return 2 + u16at(b, i)
  if (id === 38) return 4 + u16at(b, i) + u16at(b, i + 2 + u16at(b, i))
  throw new Error('malformed')
}

// The topic alias (property 35) in the MQTT 5 property block b[i..end), or 0.
function topicAlias(b, i, end) {
  // Property ids are one-byte varints; every property takes at least 2 bytes.
  for (var k = 0; i < end && k < end; k++) {
    if (b[i] === 35) return u16at(b, i + 1)
    i += 1 + propertyLength(b[i], b, i + 1)
  }
  if (i > end) throw new Error('malformed')
  return 0
}

// The variable header of a PUBLISH from `d`, which holds the first bytes of
// its body (or all of it): { topic, pid, alias }, the number of body bytes
// needed to read it when `d` is too short, or null when it is malformed. Read from a copy
// (d is forwarded as it is), through short pieces: a toArray() of the whole
// prefix costs more than the rest of the packet's handling.
function publishHead(d, qos) {
  var c = new Data(d)
  var t = c.shift(2).toArray()
  var tl = t[0] * 256 + t[1]
  var fixed = 2 + tl + (qos > 0 ? 2 : 0)
  if (d.size < fixed + ($level >= 5 ? 1 : 0)) return fixed + ($level >= 5 ? 4 : 0)
  var topic = tl === 0 ? '' : c.shift(tl).toString()
  // 3.1.1: nothing else to read (a denied PUBLISH closes the connection; no packet id needed).
  if ($level < 5) return { topic, pid: 0, alias: 0 }
  // Packet id and up to 4 bytes of property length.
  var want = (qos > 0 ? 2 : 0) + 4
  var b = c.shift(c.size < want ? c.size : want).toArray()
  var pid = qos > 0 ? b[0] * 256 + b[1] : 0
  var p = qos > 0 ? 2 : 0
  var n = 0
  var mul = 1
  var more = true
  for (var k = 0; more && k < 4; k++) {
    if (p >= b.length) return fixed + 4
    more = (b[p] & 128) !== 0
    n += (b[p++] & 127) * mul
    mul *= 128
  }
  if (more) return null
  var start = fixed + p - (qos > 0 ? 2 : 0)
  if (n === 0) return { topic, pid, alias: 0 }
  if (d.size < start + n) return start + n
  // Properties (rare on the hot path): the block as an array.
  var props = new Data(d)
  props.shift(start)
  try {
    return { topic, pid, alias: topicAlias(props.shift(n).toArray(), 0, n) }
  } catch (e) {
    return null
  }
}

// ---- decisions -------------------------------------------------------------

function canPublish(topic) {
  return $all || $pub.some(f => topics.topicMatches(f, topic))
}

function canSubscribe(filter) {
  if ($all) return true
  var eff = topics.effectiveFilter(filter)
  if (eff === null || !topics.validFilter(eff)) return false
  var l = topics.levels(eff)
  return $sub.some(a => topics.filterCovers(a, l))
}

// The CONNECT: which matches of the grant apply (client id pattern), with
// their filters filled in for this client. False: refused (no match applies).
function admit(clientId) {
  var g = $info.grant
  if (g.tcp) { $all = true; return true }
  var values = { '{clientId}': clientId, '{serviceAccount}': $info.source.substring($info.source.indexOf('/') + 1) }
  var applying = g.mqtt.filter(m => m.clientIdRe === null || m.clientIdRe.test(clientId))
  if (applying.length === 0) return false
  $pub = []
  $sub = []
  applying.forEach(m => {
    m.publishLevels.forEach(f => { var x = topics.substitute(f, values); if (x) $pub.push(x) })
    m.subscribeLevels.forEach(f => { var x = topics.substitute(f, values); if (x) $sub.push(x) })
  })
  return true
}

function refuseConnect() {
  count('mqttConnects', ['not-authorized'])
  var code = $level >= 5 ? V5_NOT_AUTHORIZED : V3_CONNACK_NOT_AUTHORIZED
  $refused = true
  $closed = true
  return [packet(0x20, new Data($level >= 5 ? [0, code, 0] : [0, code])), new StreamEnd]
}

function close(reason) {
  count('mqttClosed', [reason])
  $closed = true
  return [new StreamEnd]
}

// Our answer rides on a PINGREQ to the broker (see the top of this file).
function answerLater(answer) {
  $pings.push(answer)
  return [packet(0xc0 /* PINGREQ */, null)]
}

function onConnect(first, body) {
  var r = new Data(body)
  var name = str(r)
  $level = u8(r)
  if ((name !== 'MQTT' && name !== 'MQIsdp') || $level < 3 || $level > 5) return close('protocol-error')
  var flags = u8(r)
  u16of(r) // keep alive
  if ($level >= 5) take(r, readVarint(r))
  var clientId = str(r)
  var willTopic = null
  if (flags & 4) {
    if ($level >= 5) take(r, readVarint(r))
    willTopic = str(r)
  }
  $connected = true
  if (!admit(clientId)) return refuseConnect()
  // The broker publishes the will on the client's behalf: it must be a topic the client may publish.
  if (willTopic !== null && (!topics.validTopicName(willTopic) || !canPublish(willTopic))) {
    count('mqttDenied', ['will', topicLabel(willTopic)])
    return refuseConnect()
  }
  return [packet(first, body)]
}

// The hot path: a PUBLISH either way. f: the framing state (f.head, the fixed
// header's bytes; f.len, the body's length), h: its variable header
// (publishHead), d: the body's first bytes, read. Returns deframe's answer:
// the events to send on and the next state. Written for few calls: in Pipy
// 1.5 every call, of a function or a method, costs about as much as the
// arithmetic around it.

// A PUBLISH from the client.
function onPublish(f, h, d) {
  var qos = (f.first >> 1) & 3
  var topic = h.topic
  if (topic === '' && h.alias > 0) topic = $aliasIn[h.alias] || ''
  var info = $topics.publish.map[topic]
  if (typeof info !== 'object') info = topicInfo('publish', topic)
  if (!info.valid) return closeWith([], 'malformed')
  if (!info.allowed) return denyPublish(f, h, d, qos, info)
  if (h.alias > 0) $aliasIn[h.alias] = topic
  var c = info.counters[qos] || counters('publish', info, qos)
  c[0].increase()
  c[1].increase(f.len)
  return f.len > d.size ? [f.head, d, 'pass', f.len - d.size] : [f.head, d, 'fixed', 2, new Data]
}

function denyPublish(f, h, d, qos, info) {
  count('mqttDenied', ['publish', info.label])
  // 3.1.1 has no negative PUBACK: a broker closes the connection, and so do we.
  if ($level < 5) return closeWith([], 'publish-denied')
  var events = []
  if (qos === 2) $q2[h.pid] = true
  if (qos > 0) events = answerLater(packet(qos === 1 ? 0x40 : 0x50, new Data(u16(h.pid).concat([V5_NOT_AUTHORIZED]))))
  return skipRest(events, f, d.size)
}

// A PUBLISH the broker delivers to the client: counted.
function onDeliver(f, h, d) {
  var qos = (f.first >> 1) & 3
  var topic = h.topic
  if (h.alias > 0) {
    if (topic === '') topic = $aliasOut[h.alias] || '(alias)'
    else $aliasOut[h.alias] = topic
  }
  var info = $topics.deliver.map[topic]
  if (typeof info !== 'object') info = topicInfo('deliver', topic)
  var c = info.counters[qos] || counters('deliver', info, qos)
  c[0].increase()
  c[1].increase(f.len)
  return f.len > d.size ? [f.head, d, 'pass', f.len - d.size] : [f.head, d, 'fixed', 2, new Data]
}

function onSubscribe(first, body) {
  var r = new Data(body)
  var pid = u16of(r)
  var props = new Data
  if ($level >= 5) {
    var n = readVarint(r)
    props = new Data(varint(n)).push(take(r, n))
  }
  var entries = []
  for (var k = 0; r.size > 0; k++) {
    var raw = take(r, 2)
    var len = raw.toArray()
    var fdata = take(r, len[0] * 256 + len[1])
    var filter = fdata.toString()
    var opts = take(r, 1)
    entries.push({ filter, raw: new Data(raw).push(fdata).push(opts), ok: canSubscribe(filter) })
  }
  if (entries.length === 0) return close('malformed')
  var denied = entries.filter(e => !e.ok)
  denied.forEach(e => count('mqttDenied', ['subscribe', topicLabel(topics.effectiveFilter(e.filter) || e.filter)]))
  if (denied.length === 0) return [packet(first, body)]
  var fail = $level >= 5 ? V5_NOT_AUTHORIZED : V3_SUBACK_FAILURE
  if (denied.length === entries.length) {
    var codes = entries.map(() => fail)
    var ack = new Data(u16(pid)).push($level >= 5 ? new Data([0]) : new Data).push(new Data(codes))
    return answerLater(packet(0x90, ack))
  }
  // Mixed: the broker sees only the allowed filters; its SUBACK is re-assembled in the client's order (onSuback).
  $subs[pid] = entries.map(e => e.ok)
  var out = new Data(u16(pid)).push(props)
  entries.forEach(e => { if (e.ok) out.push(e.raw) })
  return [packet(first, out)]
}

function onClientPacket(first, body) {
  var type = first >> 4
  if (!$connected && type !== CONNECT) return close('protocol-error')
  switch (type) {
    case CONNECT: return $level ? close('protocol-error') : onConnect(first, body)
    case SUBSCRIBE: return onSubscribe(first, body)
    case PINGREQ:
      $pings.push(null)
      return [packet(first, body)]
    case PUBREL: {
      var pid = u16of(new Data(body))
      if ($q2[pid]) {
        delete $q2[pid]
        return answerLater(packet(0x70, new Data(u16(pid))))
      }
      return [packet(first, body)]
    }
    default: return [packet(first, body)]
  }
}

function onSuback(first, body) {
  var r = new Data(body)
  var pid = u16of(r)
  var mask = $subs[pid]
  if (!mask) return [packet(first, body)]
  delete $subs[pid]
  var head = new Data(u16(pid))
  if ($level >= 5) {
    var n = readVarint(r)
    head.push(new Data(varint(n))).push(take(r, n))
  }
  var got = r.toArray()
  var fail = $level >= 5 ? V5_NOT_AUTHORIZED : V3_SUBACK_FAILURE
  var j = 0
  var codes = mask.map(ok => (ok ? (j < got.length ? got[j++] : fail) : fail))
  return [packet(first, head.push(new Data(codes)))]
}

function onBrokerPacket(first, body) {
  var type = first >> 4
  switch (type) {
    case CONNACK: {
      var code = take(new Data(body), 2).toArray()[1]
      count('mqttConnects', [code === 0 ? 'accepted' : 'broker-' + code])
      return [packet(first, body)]
    }
    case SUBACK: return onSuback(first, body)
    case PINGRESP: {
      var answer = $pings.shift()
      return [answer || packet(first, body)]
    }
    default: return [packet(first, body)]
  }
}

// ---- framing ---------------------------------------------------------------

// A PUBLISH is read up to this many bytes of its body at once: a topic of up
// to 100 bytes or so, packet id and properties, and the whole of a small
// message. Longer variable headers are read on; the rest is passed through.
var PUBLISH_PREFIX = 128
// A denied PUBLISH's rest is read and dropped in pieces of at most this size.
var DROP_CHUNK = 65536

// Packet types whose whole body the proxy reads, per direction (PUBLISH aside);
// every other packet (PUBACK, PUBREC, PUBCOMP, UNSUBSCRIBE, UNSUBACK,
// DISCONNECT, AUTH, ...) is passed through as it streams in, without a
// JavaScript call for its body.
var READS = {
  client: [false, true, false, false, false, false, true, false, true, false, false, false, true, false, false, false],
  broker: [false, false, true, false, false, false, false, false, false, true, false, false, false, true, false, false],
}

// The fixed header: its first two bytes at once (byte 1 is the first, or
// only, byte of the remaining length), read into a Data that is then sent on
// as it is (a new Data([...]) would take a fresh 16 KiB chunk from Pipy's
// pool). Every state that ends a packet returns ['fixed', 2, new Data].

// After a handler's events: the connection closes, or the rest of the packet
// is dropped (in pieces, never buffered whole), then the next packet.
function closeWith(events, reason) {
  count('mqttClosed', [reason])
  $closed = true
  events.push(new StreamEnd, 'closed')
  return events
}

function skipRest(events, f, consumed) {
  if ($closed) {
    events.push('closed')
    return events
  }
  var rest = f.len - consumed
  if (rest <= 0) {
    events.push('fixed', 2, new Data)
    return events
  }
  f.drop = rest
  events.push('drop', rest < DROP_CHUNK ? rest : DROP_CHUNK, new Data)
  return events
}

// deframe states for one direction. Pipy 1.5.18's deframe keeps the buffer of
// a read that a closed connection left unfinished and hands it, in place of
// the first byte, to the first state of the next connection the pipeline
// serves (and a connection always ends inside a read: of its next fixed
// header at least): so every stream starts with a sentinel byte (guard(),
// below), which 'start' takes, whatever it is given.
function framer(side) {
  var reads = READS[side]
  var handle = side === 'client' ? onClientPacket : onBrokerPacket
  var onPub = side === 'client' ? onPublish : onDeliver
  // The remaining length is known: what to read of the body.
  var headerDone = f => {
    var type = f.first >> 4
    if (f.len > settings.maxPacketBytes) return closeWith([], 'oversized')
    if (type === PUBLISH) {
      if ((f.first & 6) === 6 || f.len < 2) return closeWith([], 'malformed') // QoS 3, or no room for a topic
      if (side === 'client' && !$connected) return closeWith([], 'protocol-error')
      return ['publish', f.len < PUBLISH_PREFIX ? f.len : PUBLISH_PREFIX, new Data]
    }
    if (side === 'client' && !$connected && type !== CONNECT) return closeWith([], 'protocol-error')
    if (reads[type]) return f.len === 0 ? whole(f, new Data) : ['whole', f.len, new Data]
    // Passed through unread.
    return f.len === 0 ? [f.head, 'fixed', 2, new Data] : [f.head, 'pass', f.len]
  }
  // A packet read whole (CONNECT, SUBSCRIBE, SUBACK, ...: not the hot path).
  var whole = (f, d) => {
    try {
      var events = handle(f.first, d)
    } catch (e) {
      return closeWith([], 'malformed')
    }
    return skipRest(events, f, f.len)
  }
  return {
    start: () => ['fixed', 2, new Data],
    fixed: d => {
      if ($closed) return 'closed'
      var f = $fr[side]
      var b = d.toArray()
      f.head = d
      f.first = b[0]
      f.len = b[1] & 127
      f.mul = 128
      if ((b[0] >> 4) === 0) return closeWith([], 'malformed')
      return (b[1] & 128) ? ['length', 1, d] : headerDone(f)
    },
    // Further bytes of the remaining length (at most 4 in all), read into the same Data.
    length: d => {
      if ($closed) return 'closed'
      var f = $fr[side]
      var b = d.toArray()
      var c = b[b.length - 1]
      f.len += (c & 127) * f.mul
      f.mul *= 128
      if (c & 128) return b.length >= 5 ? closeWith([], 'malformed') : ['length', 1, d]
      return headerDone(f)
    },
    publish: d => {
      if ($closed) return 'closed'
      var f = $fr[side]
      var h = publishHead(d, (f.first >> 1) & 3)
      if (h === null) return closeWith([], 'malformed')
      if (typeof h === 'number') {
        // Read on (into d), up to the end of the packet; a packet that ends first is malformed.
        if (d.size >= f.len) return closeWith([], 'malformed')
        return ['publish', (h < f.len ? h : f.len) - d.size, d]
      }
      return onPub(f, h, d)
    },
    whole: d => ($closed ? 'closed' : whole($fr[side], d)),
    pass: () => ['fixed', 2, new Data],
    drop: d => {
      var f = $fr[side]
      f.drop -= d.size
      return f.drop > 0 ? ['drop', f.drop < DROP_CHUNK ? f.drop : DROP_CHUNK, new Data] : ['fixed', 2, new Data]
    },
    // After a close: whatever still arrives is dropped, without a call.
    closed: 'closed',
  }
}

var fromClient = framer('client')
var fromBroker = framer('broker')
var sentinel = evt => [new Data([0]), evt]

// The pipeline of one MQTT connection to a broker pod of this node.
// info(): { source, broker (identities, 'unknown' when not known), grant
// (access.js: a TCPRoute grant or a permissive policy allows every packet) }.
// toBroker: the pipeline layout that connects to the broker.
export function guard(info, toBroker) {
  return $=>$
    .onStart(() => {
      $info = info()
      $fr = { client: {}, broker: {} }
      $level = 0
      $connected = false
      $refused = false
      $all = false
      $pub = []
      $sub = []
      $pings = []
      $subs = {}
      $q2 = {}
      $aliasIn = {}
      $aliasOut = {}
      $closed = false
      $topics = { publish: { map: {}, size: 0 }, deliver: { map: {}, size: 0 } }
    })
    .replaceStreamStart(sentinel)
    .deframe(fromClient)
    .pipe(() => ($refused ? 'refused' : 'broker'), {
      // The CONNACK and the end are already in the stream: the client gets them, the broker never hears of it.
      refused: $=>$.handleStreamEnd(() => {}),
      broker: $=>$
        .pipe(() => 'connect', { connect: toBroker })
        .replaceStreamStart(sentinel)
        .deframe(fromBroker),
    })
}
