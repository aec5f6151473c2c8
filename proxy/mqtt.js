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
// packet id, topic alias, filters, client id, will topic), bounded by
// maxPacketBytes, and forwards the packets it allows byte for byte (a
// SUBSCRIBE with denied filters is rebuilt from the client's own bytes minus
// those filters).
//
// Cost: every packet of a busy connection passes here, so the hot path (a
// PUBLISH, either way; the acks) is kept to few JavaScript calls (in Pipy 1.5
// every call, of a function or a method, costs about as much as the
// arithmetic around it): one replaceData call per chunk read from a socket,
// which scans the chunk's packet boundaries itself and sends the chunk on
// untouched when every packet in it is allowed (see scanner() below); what a
// connection learns about a topic (allowed, metric label, counters) is kept
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
var $st // per direction scanning state (scanner())
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
  return null
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
  if (denied.length === 0) return null
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
      return null
    case PUBREL: {
      var pid = u16of(new Data(body))
      if ($q2[pid]) {
        delete $q2[pid]
        return answerLater(packet(0x70, new Data(u16(pid))))
      }
      return null
    }
    default: return null
  }
}

function onSuback(first, body) {
  var r = new Data(body)
  var pid = u16of(r)
  var mask = $subs[pid]
  if (!mask) return null
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
      return null
    }
    case SUBACK: return onSuback(first, body)
    case PINGRESP: {
      var answer = $pings.shift()
      return answer ? [answer] : null
    }
    default: return null
  }
}

// ---- framing ---------------------------------------------------------------

// One replaceData call per chunk a socket read gives, per direction: the
// chunk is scanned for packet boundaries in JavaScript and, when every packet
// in it is allowed, sent on as it came (no copy, no re-assembly; an event
// per chunk, not two or three per packet as deframe's states made). Per
// packet the scan reads only what it judges: the fixed header (from a window
// of the chunk's bytes, read with one toArray() for a run of small packets
// such as acknowledgements), a PUBLISH's topic (one toString()) and, under
// MQTT 5, its packet id and property length; the bodies of CONNECT,
// SUBSCRIBE, SUBACK and the other packets handled above are read whole.
// Whatever follows is passed (or, for a denied PUBLISH, dropped) by count,
// across chunks, without a call. A packet whose head is cut by the chunk's end
// is held (at most the packet, bounded by maxPacketBytes) and read again with
// the next chunk.

// A chunk (or the tail of one) up to this long is read into the window at
// once: a run of acknowledgements, or a small PUBLISH with its topic length,
// packet id and property length, costs one toArray().
var SMALL = 128
var NO_BYTES = []

// Packet types whose whole body the proxy reads, per direction (PUBLISH aside);
// every other packet (PUBACK, PUBREC, PUBCOMP, UNSUBSCRIBE, UNSUBACK,
// DISCONNECT, AUTH, ...) is passed through unread.
var READS = {
  client: [false, true, false, false, false, false, true, false, true, false, false, false, true, false, false, false],
  broker: [false, false, true, false, false, false, false, false, false, true, false, false, false, true, false, false],
}

// A remaining length of more than one byte, from w[i] (at most k bytes there):
// length * 8 + the number of its bytes; -1: more bytes needed; -2: malformed
// (a fifth length byte).
function remainingLength(w, i, k) {
  var len = 0
  var mul = 1
  for (var j = 0; j < 4; j++) {
    if (j >= k) return -1
    var x = w[i + j]
    len += (x & 127) * mul
    mul *= 128
    if (!(x & 128)) return len * 8 + j + 1
  }
  return -2
}

// A denied PUBLISH of the client: the events that replace it.
function denyPublish(qos, pid, info) {
  count('mqttDenied', ['publish', info.label])
  // 3.1.1 has no negative PUBACK: a broker closes the connection, and so do we.
  if ($level < 5) return close('publish-denied')
  if (qos === 2) $q2[pid] = true
  return qos > 0 ? answerLater(packet(qos === 1 ? 0x40 : 0x50, new Data(u16(pid).concat([V5_NOT_AUTHORIZED])))) : []
}

// The replaceData callback of one direction. Per connection and direction,
// $st[side]: held (the start of a packet whose head was cut, or null), rest
// (bytes of the last packet still to come, unread), dropping (those bytes are
// dropped, not passed).
function scanner(side) {
  var client = side === 'client'
  var reads = READS[side]
  var handle = client ? onClientPacket : onBrokerPacket
  return d => {
    if ($closed) return
    var s = $st[side]
    var n = d.size
    // The whole chunk is inside the last packet's unread rest. (An empty Data, which main.js's
    // onStart sends first on some hops, is dropped: the first event decides the pipe below.)
    if (s.rest >= n) {
      if (n === 0) return
      s.rest -= n
      return s.dropping ? undefined : d
    }
    var src = d // the bytes to scan; shifted (a copy of d first) only once something changes
    if (s.held !== null) {
      src = s.held.push(d)
      s.held = null
      n = src.size
    }
    var out = null // what goes on instead of src, once a packet is replaced or dropped
    var emitted = 0 // src's bytes before this offset are in out or dropped (src is shifted by as much)
    var end = null // StreamEnd, when the connection closes
    var pos = 0 // where the next packet starts
    if (s.rest > 0) {
      pos = s.rest
      if (s.dropping) {
        if (src === d) src = new Data(d)
        out = new Data
        src.shift(pos)
        emitted = pos
      }
      s.rest = 0
      s.dropping = false
    }
    // The read cursor: a copy of src, read up to cpos; w holds src's bytes [wb, cpos).
    var c = null
    var cpos = 0
    var w = NO_BYTES
    var wb = 0
    var need = 4 // bytes from pos wanted in the window: fixed header and a PUBLISH's topic length
    var hold = false
    var act = null // the events replacing the packet at pos (an empty array drops it)
    var next = 0
    var i = 0 // pos in the window
    // (PipyJS has no while, no continue, no empty for clauses: `break again` reads the same packet again, with a wider window.)
    for (var round = 0; pos < n; round++) again: {
      var avail = n - pos
      var k = need < avail ? need : avail
      if (pos + k > cpos) {
        if (c === null && n - emitted <= SMALL) {
          // A small chunk (acknowledgements, mostly): all of it into the window, no cursor needed
          // (a PUBLISH in it reads its topic from a copy, below).
          w = src.toArray()
          wb = emitted
          cpos = n
        } else if (c === null) {
          c = new Data(src)
          cpos = emitted
        }
        if (pos + k <= cpos) {
          i = 0 // read above
        } else if (pos >= cpos) {
          if (pos > cpos) c.shift(pos - cpos)
          var span = avail <= SMALL ? avail : k
          w = c.shift(span).toArray()
          wb = pos
          cpos = pos + span
        } else {
          w = w.slice(pos - wb).concat(c.shift(pos + k - cpos).toArray())
          wb = pos
          cpos = pos + k
        }
      }
      i = pos - wb
      var first = w[i]
      var type = first >> 4
      var len = 0
      var hl = 2
      if (type === 0) {
        act = close('malformed')
      } else if (k < 2) {
        hold = true
      } else {
        len = w[i + 1]
        if (len & 128) {
          if (k < 5 && k < avail) {
            need = 5
            break again
          }
          var r = remainingLength(w, i + 1, k - 1)
          if (r === -1) hold = true
          else if (r === -2) act = close('malformed')
          else {
            hl = 1 + r % 8
            len = (r - hl + 1) / 8
          }
        }
      }
      if (hold) break
      if (act === null) {
        next = pos + hl + len
        if (len > settings.maxPacketBytes) act = close('oversized')
        else if (client && !$connected && type !== CONNECT) act = close('protocol-error')
        else if (type === PUBLISH) {
          var qos = (first >> 1) & 3
          if (qos === 3 || len < 2) act = close('malformed')
          else if (k < hl + 2) {
            // The topic length is not in the window yet.
            if (avail < hl + 2) {
              hold = true
              break
            }
            need = hl + 2
            break again
          } else {
            var tl = w[i + hl] * 256 + w[i + hl + 1]
            var ts = pos + hl + 2
            var p = ts + tl // after the topic
            var v5 = $level >= 5
            var hmin = p + (qos > 0 ? 2 : 0) + (v5 ? 1 : 0)
            if (hmin > next) act = close('malformed')
            else if (hmin > n) {
              hold = true
              break
            } else {
              var topic = ''
              if (tl > 0) {
                if (ts >= cpos) {
                  if (ts > cpos) c.shift(ts - cpos)
                  topic = c.shift(tl).toString()
                  cpos = p
                  wb = p
                  w = NO_BYTES
                } else {
                  // The window has read past the topic's start (a small tail): read it from a copy.
                  var t = new Data(src)
                  t.shift(ts - emitted)
                  topic = t.shift(tl).toString()
                }
              }
              var pid = 0
              var alias = 0
              if (v5) {
                // Packet id (QoS > 0) and the property length (1 to 4 bytes).
                var want = (qos > 0 ? 2 : 0) + 4
                if (p + want > next) want = next - p
                if (p + want > n) want = n - p
                // b[bi + j]: the j-th byte after the topic (straight from the window when it holds them).
                var b = w
                var bi = p - wb
                if (p === cpos) {
                  b = c.shift(want).toArray()
                  bi = 0
                  cpos = p + want
                  wb = cpos
                  w = NO_BYTES
                } else if (p < wb || p + want > cpos) {
                  var t2 = new Data(src)
                  t2.shift(p - emitted)
                  b = t2.shift(want).toArray()
                  bi = 0
                }
                var j = 0
                if (qos > 0) {
                  pid = b[bi] * 256 + b[bi + 1]
                  j = 2
                }
                var plen = b[bi + j]
                j++
                if (plen & 128) {
                  var pr = remainingLength(b, bi + j - 1, want - j + 1)
                  if (pr === -2 || (pr === -1 && p + want >= next)) act = close('malformed')
                  else if (pr === -1) {
                    hold = true
                    break
                  } else {
                    j += pr % 8 - 1
                    plen = (pr - pr % 8) / 8
                  }
                }
                if (act === null && plen > 0) {
                  // Properties (rare on the hot path): only a topic alias matters.
                  var pp = p + j
                  if (pp + plen > next) act = close('malformed')
                  else if (pp + plen > n) {
                    hold = true
                    break
                  } else {
                    var t3 = new Data(src)
                    t3.shift(pp - emitted)
                    try {
                      alias = topicAlias(t3.shift(plen).toArray(), 0, plen)
                    } catch (e) {
                      act = close('malformed')
                    }
                  }
                }
              }
              if (act === null) {
                var info
                if (client) {
                  if (topic === '' && alias > 0) topic = $aliasIn[alias] || ''
                  info = $topics.publish.map[topic]
                  if (typeof info !== 'object') info = topicInfo('publish', topic)
                  if (!info.valid) act = close('malformed')
                  else if (!info.allowed) act = denyPublish(qos, pid, info)
                  else if (alias > 0) $aliasIn[alias] = topic
                } else {
                  if (alias > 0) {
                    if (topic === '') topic = $aliasOut[alias] || '(alias)'
                    else $aliasOut[alias] = topic
                  }
                  info = $topics.deliver.map[topic]
                  if (typeof info !== 'object') info = topicInfo('deliver', topic)
                }
                if (act === null) {
                  var cn = info.counters[qos] || counters(client ? 'publish' : 'deliver', info, qos)
                  cn[0].increase()
                  cn[1].increase(len)
                }
              }
            }
          }
        } else if (reads[type]) {
          if (next > n) {
            hold = true
            break
          }
          var tb = new Data(src)
          tb.shift(pos + hl - emitted)
          try {
            act = handle(first, tb.shift(len))
          } catch (e) {
            act = close('malformed')
          }
        }
      }
      if (act !== null) {
        // The packet at pos is replaced by act: what came before it goes on, it is dropped.
        if ($closed) next = n
        if (out === null) {
          if (src === d) src = new Data(d)
          out = new Data
        }
        if (pos > emitted) out.push(src.shift(pos - emitted))
        var stop = next < n ? next : n
        if (stop > pos) src.shift(stop - pos)
        emitted = stop
        if (next > n) {
          s.rest = next - n
          s.dropping = true
        }
        // Handlers' events: Data to send on, then a StreamEnd when they closed the connection.
        var na = act.length
        if ($closed) end = act[--na]
        for (var e = 0; e < na; e++) out.push(act[e])
        act = null
        if ($closed) break
      } else if (next > n) {
        s.rest = next - n
        s.dropping = false // (a dropped packet's rest may have run out on the fast path, leaving the flag set)
      }
      pos = next
      need = 4
    }
    if (hold) {
      // Keep the cut packet (from pos) for the next chunk.
      if (out === null) {
        if (src === d) src = new Data(d)
        if (pos === 0) {
          s.held = src
          return
        }
        out = new Data
      }
      if (pos > emitted) out.push(src.shift(pos - emitted))
      s.held = src
      return out.size > 0 ? out : undefined
    }
    if (out === null) return src
    if (!$closed && n > emitted) out.push(src.shift(n - emitted))
    if (end !== null) return out.size > 0 ? [out, end] : [end]
    return out.size > 0 ? out : undefined
  }
}

var fromClient = scanner('client')
var fromBroker = scanner('broker')

// The pipeline of one MQTT connection to a broker pod of this node.
// info(): { source, broker (identities, 'unknown' when not known), grant
// (access.js: a TCPRoute grant or a permissive policy allows every packet) }.
// toBroker: the pipeline layout that connects to the broker.
export function guard(info, toBroker) {
  return $=>$
    .onStart(() => {
      $info = info()
      $st = { client: { held: null, rest: 0, dropping: false }, broker: { held: null, rest: 0, dropping: false } }
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
    .replaceData(fromClient)
    .pipe(() => ($refused ? 'refused' : 'broker'), {
      // The CONNACK and the end are already in the stream: the client gets them, the broker never hears of it.
      refused: $=>$.handleStreamEnd(() => {}),
      broker: $=>$
        .pipe(() => 'connect', { connect: toBroker })
        .replaceData(fromBroker),
    })
}
