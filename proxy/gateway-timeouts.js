// HTTPRoute timeouts (Gateway API, GEP-1742) for the Gateway listeners
// (gateway.js). Per rule, from src/gateway/render.ts:
//   requestTimeoutMs         `timeouts.request`: the whole exchange, counted
//                            from the moment the request head reached the
//                            gateway, whatever happens after it.
//   backendRequestTimeoutMs  `timeouts.backendRequest`: one attempt to a
//                            backend, counted from when it is sent, until its
//                            whole response has arrived.
// Either null: no bound of that kind (the spec's "0s" also means none).
// HTTPRoute retries are not supported, so a request makes one attempt; both
// bounds still apply, each from its own start, and the first to run out
// answers 504.
//
// A bound covers the whole response, body included, as the spec says: a
// backend that sends its head and then trickles the body is cut as well. The
// attempt races a timer branch (forkRace: the first branch to output wins,
// the others' output is dropped), and the attempt's branch only outputs once
// its response is complete. That holds the body back until its end, which is
// what Pipy 1.5's HTTP/1 server side (demuxHTTP without bufferSize) does with
// every response anyway: the client gets nothing of a response before its
// end, so an answer cut short can still be a clean 504 rather than a
// truncated body. The timer branch's starting event, once the time is up, is
// the 504; the copy of the request it is fed is dropped.
//
// The upstream connection a timed-out attempt leaves behind is not reused
// (Pipy keeps a connection busy until its response ends) and is closed:
//   - a backend that goes silent: by a read timeout POOL_SLACK_MS past the
//     bound (Pipy's read clock counts idle time and ticks once a second: it
//     cannot be the bound itself);
//   - a backend still sending: guardUpstream() closes the connection at the
//     first bytes that arrive CUT_SLACK_MS past the bound (the slack lets the
//     504 win the race first: a connection closed mid-body looks to Pipy's
//     client side like the end of the message).

var timeouts = new stats.Counter('fsmn_proxy_gateway_timeouts_total', ['gateway', 'port', 'route', 'timeout'])

var POOL_SLACK_MS = 5000
var CUT_SLACK_MS = 1000

// The rule's bounds for a request whose head arrived at `start` (ms): what a
// timer started now must wait, and which bound that is. null: no bound.
export function bound(rule, start, now) {
  var req = rule.requestTimeoutMs ? rule.requestTimeoutMs - (now - start) : null
  var backend = rule.backendRequestTimeoutMs || null
  if (req === null && backend === null) return null
  if (backend === null || (req !== null && req <= backend)) return { ms: Math.max(0, req), kind: 'request' }
  return { ms: backend, kind: 'backendRequest' }
}

// The longest an upstream connection of this rule may wait for an answer:
// what keys its pool and sets its read timeout. null: no bound.
export function longest(rule) {
  var a = rule.requestTimeoutMs || 0
  var b = rule.backendRequestTimeoutMs || 0
  var ms = Math.max(a, b)
  return ms > 0 ? ms : null
}

export function connectOptions(rule) {
  var ms = rule ? longest(rule) : null
  return ms ? { readTimeout: (ms + POOL_SLACK_MS) / 1000 } : {}
}

// The 504 of a bound that ran out; `kind` rides on the head (not encoded) so
// that only the timer that won the race is counted.
export function answer(kind) {
  return new Message({ status: 504, headers: { 'content-type': 'text/plain' }, timeout: kind }, 'upstream request timeout (fsm-node gateway)\n')
}

// The whole response as one message: the attempt's branch outputs nothing
// before the response has ended, so the race is still open until then.
var whole = $=>$.replaceMessage(msg => msg)

// `forward` (a pipeline builder) bounded by the rule's timeouts. current()
// returns { rule, start, labels: [gateway, port, route] } of the request in
// this context, or null for no bound.
var $branch = 0
export function withTimeouts(forward, current) {
  return $=>$.pipe(() => { var c = current(); return c && longest(c.rule) ? 'race' : 'plain' }, {
    plain: forward,
    race: $=>$
      .forkRace([0, 1]).to($=>$
        .onStart((_, i) => {
          $branch = i
          if (i !== 1) return undefined
          var c = current()
          var b = bound(c.rule, c.start, Date.now())
          return new Timeout(b.ms / 1000).wait().then(() => answer(b.kind))
        })
        .pipe(() => $branch === 1 ? 'timer' : 'attempt', {
          attempt: $ => whole(forward($.handleMessageStart(markDeadline(current)))),
          timer: $=>$.replaceMessage(msg => msg.head.status ? msg : []).replaceStreamEnd(() => []),
        })
      )
      .handleMessageStart(msg => {
        var kind = msg.head.timeout
        if (!kind) return
        var c = current()
        timeouts.withLabels(c.labels[0], c.labels[1], c.labels[2], kind).increase()
      }),
  })
}

// The request head carries, not encoded (the HTTP encoder writes only the
// method, path, protocol and headers), when its upstream connection may be
// cut: guardUpstream() reads it on the connection's side of the mux. (A
// RequestMirror copy shares the head object, so its connection gets the same
// cut; its answer is dropped anyway.)
function markDeadline(current) {
  return msg => {
    var c = current()
    msg.head.fsmnCutAt = Date.now() + bound(c.rule, c.start, Date.now()).ms + CUT_SLACK_MS
  }
}

// Around the connection pipeline of a muxHTTP session (`connect` a builder):
// bytes of a response that arrive after the cut time of the request they
// answer end the session, which closes the connection. Pipy's HTTP/1 mux
// sends one request at a time per connection, so the last head that went up
// is the one being answered. A connection that stays silent is the read
// timeout's (connectOptions).
var $cutAt = 0
export function guardUpstream(connect) {
  return $ => connect($.handleMessageStart(msg => { $cutAt = msg.head.fsmnCutAt || 0 }))
    .replaceData(data => $cutAt > 0 && Date.now() > $cutAt ? new StreamEnd('ReadTimeout') : data)
}
