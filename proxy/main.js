// fsm-node's shared node proxy: the entry of the Pipy codebase (this
// directory plus the config.json the agent renders next to it).
//
//   :15001 outbound, transparent: every intercepted connection of this
//          node's mesh pods; routed by its original destination.
//   :15003 inbound: HTTP CONNECT tunnels from the other node proxies,
//          carrying the original destination; mutual TLS proves the source
//          identity (tls.js).
//
// The policy of a destination pod is applied by the proxy of the pod's node:
// here for a local pod, by the far proxy (behind the tunnel) for a remote one.

import config from './config.js'
import { decide, protocolOf } from './route.js'
import { grant, requestAllowed } from './access.js'
import * as metrics from './metrics.js'
import * as tls from './tls.js'
import * as resilience from './resilience.js'

var SOURCE_HEADER = 'fsmn-source-identity'

// How long an idle upstream HTTP connection (or HTTP tunnel to a peer) waits
// in its pool for the next request. Below the 5 s keep-alive timeout of Node
// and Apache, so the proxy, not the server, closes an idle connection: no
// request is sent on a connection the server is closing.
var UPSTREAM_MAX_IDLE = 4

metrics.configVersion.clear()
metrics.configVersion.withLabels(config.version).set(1)

// Per connection
var $srcId
var $dstIp
var $dstPort
var $route
var $grant
var $labels
var why
// Per HTTP request
var $start
var $head
var $attempt

// The original destination. The new-style listener of Pipy 1.5.x sets its
// options after bind, so the first redirected connection after start can
// miss destinationAddress (see ../shared/design/pipy-notes.md); asking the
// socket for SO_ORIGINAL_DST (SOL_IP 0, option 80) ourselves always works,
// and the eBPF dataplane's getsockopt program answers the same question.
function originalDestination(ib) {
  if (ib.destinationAddress) return [ib.destinationAddress, ib.destinationPort]
  var buf = new Data
  if (ib.socket.getRawOption(0, 80, buf) !== 0) return null
  var b = buf.toArray()
  if (b.length < 8) return null
  return [b[4] + '.' + b[5] + '.' + b[6] + '.' + b[7], b[2] * 256 + b[3]]
}

// Access rules name the pod's port, not the service port the client dialled.
function portOf(target) {
  return +target.substring(target.lastIndexOf(':') + 1)
}

function sourceIdentity(ip) {
  var pod = config.pods[ip]
  return pod ? pod.identity : ''
}

function labelsOf(srcId, route) {
  return [srcId || 'unknown', route.identity || (route.mode === 'egress' ? 'external' : 'unknown')]
}

function tunnelRequest() {
  var headers = { host: $route.target }
  if ($srcId && !tls.enabled) headers[SOURCE_HEADER] = $srcId
  return new Message({ method: 'CONNECT', path: $route.target, headers })
}

function deny(reason, status, text) {
  metrics.denied.withLabels($labels[0], $labels[1], reason).increase()
  return new Message({ status, headers: { 'content-type': 'text/plain' } }, text + '\n')
}

// Tunnels to one peer node proxy are HTTP/2 streams over one shared
// connection (per source and destination identity under mTLS): a cross-node
// connection costs no extra TCP or TLS handshake.
var toPeerProxy = $=>$
  .muxHTTP(() => tls.poolKey($srcId, $route), { version: 2 }).to(
    tls.connectPeer(() => $route.tunnel)
  )

var closeNow = $=>$.replaceStreamStart(new StreamEnd)
var connectUpstream = $=>$.connect(() => $route.target, () => resilience.connectOptions($attempt && $attempt.service, $attempt && $attempt.timeoutMs))
var connectTarget = $=>$.connect(() => $route.target)
// Upstream HTTP connections are pooled per target and shared by all clients:
// a request takes an idle connection or opens one (maxQueue 1: one request at
// a time per connection, so no request queues behind another client's), and
// an idle connection closes after UPSTREAM_MAX_IDLE. The pool is as large as
// the peak number of concurrent requests, whatever the connection churn of
// the clients. (Keyed per client connection instead, every client connection
// left an idle upstream connection for up to 60 s, Pipy's default maxIdle:
// with connection-per-request clients that is thousands of connections, each
// holding memory and one of the node's ephemeral ports towards that pod,
// until connect() scans a full port range: the decay in docs/proxy.md.)
// Upstream HTTP connections carry a read timeout a little longer than the
// request timeout (resilience.connectOptions): the request itself is bounded
// by resilience.withTimeout; this closes a connection left hung behind it.
// Pools are keyed by it, since a connection has one read timeout.
var muxToTarget = $=>$
  .muxHTTP(() => $route.target + '|' + ($attempt ? $attempt.timeoutMs : ''), { maxIdle: UPSTREAM_MAX_IDLE }).to(connectUpstream)

// HTTP over a tunnel to the target's node proxy: pooled the same way, but per
// source identity too, because the tunnel carries the identity the far side
// authorises every request of that tunnel with (its CONNECT header, or under
// mTLS the certificate of the peer connection it rides).
var muxToTunnel = $=>$
  .muxHTTP(() => $srcId + '>' + $route.target, { maxIdle: UPSTREAM_MAX_IDLE }).to($=>$
    .connectHTTPTunnel(() => tunnelRequest()).to(toPeerProxy)
  )

// ---- outbound, TCP: one decision per connection ------------------------------

var outboundTCP = $=>$
  .onStart(() => {
    $route = decide($dstIp, $dstPort)
    $labels = labelsOf($srcId, $route)
    metrics.connections.withLabels($labels[0], $labels[1]).increase()
    if ($route.mode === 'local' && !grant($srcId, $route.identity, portOf($route.target)).tcp) {
      metrics.denied.withLabels($labels[0], $labels[1], 'access').increase()
      $route = Object.assign({}, $route, { mode: 'denied' })
    } else if ($route.mode === 'refused' || $route.mode === 'unavailable') {
      metrics.denied.withLabels($labels[0], $labels[1], $route.mode).increase()
    } else if ($route.mode === 'tunnel' && (why = tls.refusal($srcId, $route))) {
      metrics.denied.withLabels($labels[0], $labels[1], why).increase()
      $route = Object.assign({}, $route, { mode: 'refused' })
    } else if ((why = resilience.admitConnection($srcId, $route.service))) {
      metrics.denied.withLabels($labels[0], $labels[1], why).increase()
      $route = Object.assign({}, $route, { mode: 'refused', admitted: false })
    } else {
      $route.admitted = true
    }
  })
  .handleStreamEnd(() => { if ($route.admitted) resilience.endConnection($route.service) })
  .handleData(d => metrics.bytes.withLabels($labels[0], $labels[1], 'sent').increase(d.size))
  .pipe(() => $route.mode, {
    denied: closeNow,
    refused: closeNow,
    unavailable: closeNow,
    tunnel: $=>$.connectHTTPTunnel(() => tunnelRequest()).to(toPeerProxy),
    local: connectTarget,
    direct: connectTarget,
    egress: connectTarget,
  })
  .handleData(d => metrics.bytes.withLabels($labels[0], $labels[1], 'received').increase(d.size))

// ---- outbound, HTTP: one decision per request (splits balance requests) ------

// One try of a request: decide (avoiding endpoints already tried), check
// access and admission (resilience.js), forward.
function decideRequest(msg) {
  $route = decide($dstIp, $dstPort, msg.head, $attempt.tried)
  $labels = labelsOf($srcId, $route)
  if ($attempt.n === 0) metrics.requests.withLabels($labels[0], $labels[1]).increase()
  if ($route.mode === 'local') {
    $grant = grant($srcId, $route.identity, portOf($route.target))
    if (!requestAllowed($grant, msg.head)) $route = Object.assign({}, $route, { mode: 'denied' })
  } else if ($route.mode === 'tunnel' && (why = tls.refusal($srcId, $route))) {
    $route = Object.assign({}, $route, { mode: 'unauthenticated', why })
  }
  if ($route.service && $route.pool && resilience.admit($attempt, $route.service)) $route = Object.assign({}, $route, { mode: 'limited', pool: null })
  // The far node proxy applies the timeout to its hop to the pod; only it may be told.
  delete msg.head.headers[resilience.TIMEOUT_HEADER]
  if ($route.mode === 'tunnel' && $attempt.timeoutMs) msg.head.headers[resilience.TIMEOUT_HEADER] = String($attempt.timeoutMs)
}

var currentAttempt = () => $attempt

// Appends the filters of one try to `$` (used in both paths below).
var forwardRequest = $=>$
  .handleMessageStart(decideRequest)
  .handleData(d => { if ($attempt.n === 0) metrics.bytes.withLabels($labels[0], $labels[1], 'sent').increase(d.size) })
  .pipe(() => $route.mode, {
    denied: $=>$.replaceMessage(() => deny('access', 403, 'access denied by fsm-node')),
    refused: $=>$.replaceMessage(() => deny('refused', 503, 'no endpoint available')),
    unavailable: $=>$.replaceMessage(() => deny('unavailable', 503, 'no endpoint available')),
    unauthenticated: $=>$.replaceMessage(() => deny($route.why, 503, 'no valid identity certificate for this source: ' + $route.why)),
    limited: $=>$.replaceMessage(() => resilience.refusal($attempt)),
    tunnel: resilience.withTimeout(muxToTunnel, currentAttempt),
    local: resilience.withTimeout(muxToTarget, currentAttempt),
    direct: resilience.withTimeout(muxToTarget, currentAttempt),
    egress: resilience.withTimeout(muxToTarget, currentAttempt),
  })

// Requests a Retry covers: each try runs in repeat(); an answer to retry
// (judged on the whole message, so nothing of it reaches the client) ends
// the try with StreamEnd('Replay') and the request is played again after a
// backoff. Other requests stream through once; their answers only feed
// outlier detection and circuit breaking.
var outboundHTTP = $=>$
  .demuxHTTP().to($=>$
    .handleMessageStart(msg => {
      $start = Date.now()
      $attempt = resilience.begin($srcId, msg.head, $dstIp + ':' + $dstPort)
    })
    .pipe(() => $attempt.mayRetry ? 'retry' : 'once', {
      retry: $=>$.repeat(evt => resilience.again($attempt, evt)).to($=>forwardRequest($)
        .replaceMessage(msg => resilience.judgeAnswer($attempt, $route, msg))
        .replaceStreamEnd(evt => evt.error ? resilience.judgeEnd($attempt, $route, evt) : evt)
      ),
      once: $=>forwardRequest($)
        .replaceMessageStart(msg => resilience.judgeAnswer($attempt, $route, msg))
        .replaceStreamEnd(evt => evt.error ? resilience.judgeEnd($attempt, $route, evt) : evt),
    })
    .handleMessageEnd(() => resilience.end($attempt))
    .handleStreamEnd(() => resilience.end($attempt))
    .handleMessageStart(msg => {
      var status = msg.head.status
      metrics.responses.withLabels($labels[0], $labels[1], metrics.statusClass(status)).increase()
      metrics.latency.withLabels($labels[0], $labels[1]).observe(Date.now() - $start)
    })
    .handleData(d => metrics.bytes.withLabels($labels[0], $labels[1], 'received').increase(d.size))
  )

pipy.listen(config.listen.outbound, { transparent: true }, $=>$
  .onStart(ib => {
    var dst = originalDestination(ib)
    $srcId = sourceIdentity(ib.remoteAddress)
    $dstIp = dst ? dst[0] : ''
    $dstPort = dst ? dst[1] : 0
    // An empty chunk starts the pipeline now, so a server-first protocol gets its connection.
    return new Data
  })
  .pipe(() => $dstIp !== '' && protocolOf($dstIp, $dstPort) === 'http' ? 'http' : 'tcp', { http: outboundHTTP, tcp: outboundTCP })
)

// ---- inbound: tunnels from the other node proxies ----------------------------
//
// Under mTLS (tls.js) the source identity is the one the client certificate
// proved; headers are ignored. Without a trust bundle (plaintext tunnels) a
// tunnel is believed because it comes from a known node proxy address
// (config.tunnelPeers) and its source identity header is taken on that basis
// alone. Tunnels only reach pods of this node.

pipy.listen(config.listen.inbound, tls.serve($=>$
  .onStart(ib => {
    // Under TLS this pipeline starts inside acceptTLS (no inbound object): the handshake authenticates.
    $srcId = tls.enabled || config.peers[ib.remoteAddress] ? '' : null
  })
  .demuxHTTP().to($=>$.acceptHTTPTunnel(req => {
    var peer = $srcId !== null
    var target = req.head.path || ''
    var colon = target.lastIndexOf(':')
    var ip = target.substring(0, colon)
    var port = +target.substring(colon + 1)
    var ep = config.endpoints[ip]
    $srcId = tls.enabled ? tls.peerIdentity() : ((peer && req.head.headers[SOURCE_HEADER]) || '')
    var labels = [$srcId || 'unknown', (ep && ep.identity) || 'unknown']
    var refuse = (result, status, text) => {
      metrics.tunnels.withLabels(labels[0], labels[1], result, tls.transport).increase()
      return new Message({ status }, text + '\n')
    }
    var why = tls.enabled ? tls.peerRefusal() : ''
    if (why) return refuse(why, 403, 'tunnel not authenticated: ' + why)
    if (!peer) return refuse('not-a-peer', 403, 'not a node proxy of this mesh')
    if (colon < 0 || !ep || !ep.local) return refuse('no-such-pod', 404, 'no such pod on this node')
    // One connection from a peer carries many tunnels (HTTP/2 streams); the
    // requests of every tunnel share the per-target upstream pool.
    $route = { mode: 'local', target, identity: ep.identity }
    $grant = grant($srcId, ep.identity, port)
    $dstIp = ip
    $dstPort = port
    if ((ep.ports[port] || 'tcp') === 'tcp' && !$grant.tcp) return refuse('denied', 403, 'access denied by fsm-node')
    metrics.tunnels.withLabels(labels[0], labels[1], 'accepted', tls.transport).increase()
    return new Message({ status: 200 })
  }).to($=>$
    // As on the outbound side: start at once, so a server-first protocol gets its connection.
    .onStart(() => new Data)
    .pipe(() => config.endpoints[$dstIp].ports[$dstPort] || 'tcp', {
      http: $=>$
        .demuxHTTP().to($=>$
          .handleMessageStart(msg => { $head = msg.head; $attempt = resilience.fromPeer(msg.head) })
          .pipe(() => requestAllowed($grant, $head) ? 'allowed' : 'denied', {
            allowed: muxToTarget,
            denied: $=>$.replaceMessage(new Message({ status: 403, headers: { 'content-type': 'text/plain' } }, 'access denied by fsm-node\n')),
          })
          .replaceStreamEnd(evt => resilience.peerHopEnd(evt))
        ),
      tcp: connectTarget,
    })
  ))
))
