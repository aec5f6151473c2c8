// Tunnels to the other node proxies: HTTP CONNECT `ip:port` as an HTTP/2
// stream over one pooled connection per peer (mutual TLS 1.3 under tls.js).
//
// TCP: one tunnel per pod connection. HTTP: one tunnel per request (the
// request encoded as HTTP/1 inside it, the far side's answer decoded).
//
// Why per request: a tunnel that the far side has not answered yet carries
// no byte of the pod's (connectHTTPTunnel holds them until the 200), so when
// its stream fails before the answer -- a far proxy instance killed -9: the
// peer connection is reset, which this side sees some ms after the death --
// the request can be sent again, once, with nothing duplicated; on a new peer
// connection, which SO_REUSEPORT gives to the far node's surviving instance.
// A request written into an older, already answered tunnel cannot be resent
// safely (the far side may have passed it on), so no request may ride one:
// with tunnels pooled per target and shared by all pod connections, new
// connections' requests rode established tunnels into a dead instance (0-8
// failed new connections per 4 kills in bench/proxy-crash). Pooling per pod
// connection instead (muxHTTP over connectHTTPTunnel, keyed per connection)
// hangs a few requests per thousand in Pipy 1.5.18 under connection churn
// (measured: 12 of 5231 with object keys, 5 of 2118 with string keys), the
// same construction as the reload hang in docs/security.md. So only
// connections and requests whose tunnel was already answered may break when
// a far instance dies.
//
// The cost: a CONNECT (one HTTP/2 stream, one round trip before the request
// goes) per HTTP request; see docs/proxy.md for what it costs.
//
// HTTP requests are retried by their own `repeat`, which holds that request's
// events only (freed with its response). TCP tunnels are not retried: repeat
// would keep every byte the pod ever sent on the connection; a failed set-up
// closes the pod's connection as before, and the peer connection's
// generation moves on so that later tunnels avoid the failed connection.

import * as tls from './tls.js'
import * as metrics from './metrics.js'
import * as drain from './drain.js'
import * as generations from './pool-generation.js'

var SOURCE_HEADER = 'fsmn-source-identity'

var $srcId
var $route
var $labels
var $attempt  // per request (HTTP) or connection (TCP): what happened to its tunnel

// Called in the request's (HTTP) or connection's (TCP) context once it is routed to a tunnel.
export function use(srcId, route, labels) {
  $srcId = srcId
  $route = route
  $labels = labels
  $attempt = { answered: false, retried: false, responded: false, gen: -1, status: 0, head: null }
}

function connectRequest() {
  var headers = { host: $route.target }
  // Plaintext: believed from a known node proxy. mTLS: only another cluster's source, vouched for by the gateway identity (tls.js).
  if ($srcId && (!tls.enabled || tls.isForeign($srcId))) headers[SOURCE_HEADER] = $srcId
  return new Message({ method: 'CONNECT', path: $route.target, headers })
}

// The peer connection a tunnel stream goes on: tls.js's pool (per source and
// destination identity under mTLS) of the peer's current generation
// (pool-generation.js). A tunnel that failed before its answer moves it on,
// so the retry and every later tunnel open a new connection instead of the
// one that just failed (which Pipy drops once it has seen the reset).
function peerKey() {
  var g = generations.of($route.tunnel)
  $attempt.gen = g
  return tls.poolKey($srcId, $route) + '~' + g
}

// connected: the far side said 200. closed: a refusal (403, 404: answered,
// not retried) or a bare 502, which Pipy's HTTP/2 client makes up for every
// stream of a connection that was reset (or the far Pipy for a tunnel its
// program dropped before answering): not an answer, nothing was delivered.
function onTunnelState(s) {
  if (s === 'connected' || (s === 'closed' && $attempt.status !== 502)) $attempt.answered = true
}

// The tunnel ended: before its answer, the peer connection it rode is
// suspect; move the generation on (once per failed connection).
function onTunnelEnd() {
  if (!$attempt.answered) generations.moveOn($route.tunnel, $attempt.gen)
}

// The far instance answered while it drains (drain.js): this tunnel goes on
// there, later ones go on a new connection, to the far node's new instances.
function onAnswer(m) {
  $attempt.status = $answer = m.head.status
  if (m.head.headers && m.head.headers[drain.HEADER]) generations.moveOn($route.tunnel, $attempt.gen)
}

var $answer   // the CONNECT's answer status, in the tunnel's own (cloned) context: per attempt

var toPeerProxy = $=>$
  .muxHTTP(peerKey, { version: 2 }).to(
    tls.connectPeer(() => $route.tunnel)
  )
  .handleMessageStart(onAnswer)
  // connectHTTPTunnel ends its output at a non-2xx answer already and again at
  // the stream's end; a second end would reach `repeat` after it has started
  // the retry, as if the retry had failed too.
  .replaceStreamEnd(e => ($answer && ($answer < 200 || $answer > 299) ? [] : e))

// ---- TCP: one tunnel per pod connection, not retried (see above) --------------

export var tcp = $=>$
  .connectHTTPTunnel(connectRequest, { onState: onTunnelState }).to(toPeerProxy)
  .handleStreamEnd(onTunnelEnd)

// ---- HTTP: one tunnel per request, retried once ---------------------------------

// A request whose own tunnel failed before the far side answered it: nothing
// of it left this node, so send it again, once (repeat's condition: true runs
// its pipeline again with the request's events).
function retryOnce() {
  var a = $attempt
  if (!a.answered && !a.retried) {
    a.retried = true
    metrics.tunnelRetries.withLabels($labels[0], $labels[1]).increase()
    return true
  }
  return false
}

export var http = $=>$
  .repeat(retryOnce).to($=>$
    .handleMessageStart(m => {
      $attempt.head = m.head
      $attempt.status = 0
    })
    // One request per tunnel: end the stream after it, so both sides close the
    // tunnel once the response is through (else the far side keeps it open).
    .replaceMessageEnd(e => [e, new StreamEnd])
    .encodeHTTPRequest()
    .connectHTTPTunnel(connectRequest, { onState: onTunnelState }).to(toPeerProxy)
    .handleStreamEnd(onTunnelEnd)
    // The request's head tells the decoder whether a body follows (HEAD).
    .decodeHTTPResponse(() => $attempt.head)
    .handleMessageEnd(() => { $attempt.responded = true })
  )
  // The tunnel's end after a whole response is not the end of the pod's connection.
  .replaceStreamEnd(e => $attempt.responded ? [] : e)
