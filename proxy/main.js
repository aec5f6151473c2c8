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
import { connectionAllowed, grant, requestAllowed } from './access.js'
import * as metrics from './metrics.js'
import * as tls from './tls.js'
import * as tunnel from './tunnel.js'
import * as mc from './multicluster.js'
import * as cs from './clusterset.js'
import * as mqtt from './mqtt.js'
import * as gateway from './gateway.js'
import * as egress from './egress.js'
import * as resilience from './resilience.js'
import * as drain from './drain.js'

var SOURCE_HEADER = 'fsmn-source-identity'

// How long an idle upstream HTTP connection (tunnel.js: an HTTP tunnel to a peer, too) waits
// in its pool for the next request. Below the 5 s keep-alive timeout of Node
// and Apache, so the proxy, not the server, closes an idle connection: no
// request is sent on a connection the server is closing.
var UPSTREAM_MAX_IDLE = 4

// Attempts to a clusterset IP tell multicluster.js which gateways answer (and count failovers).
resilience.observeAttempts(mc.attemptOutcome)

metrics.configVersion.clear()
metrics.configVersion.withLabels(config.version).set(1)

// Per connection
var $srcId
var $dstIp
var $dstPort
var $route
var $grant
var $labels
// Per TCP connection: its two byte counters (fsmn_proxy_bytes_total), looked up once
var $sent
var $received
var why
// Per HTTP request
var $start
var $head
// The request's attempts (resilience.js): its retry policy, tries so far, endpoints and clusters tried
var $attempt
// Tunnels from other clusters: the exported service ("name.ns:port") a tunnel names
var $gwTarget

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

// The protocol of a pod port, as the services selecting the pod describe it.
function protocolAt(target) {
  var ep = config.endpoints[target.substring(0, target.lastIndexOf(':'))]
  return (ep && ep.ports[portOf(target)]) || 'tcp'
}

function sourceIdentity(ip) {
  var pod = config.pods[ip]
  return pod ? pod.identity : ''
}

function labelsOf(srcId, route) {
  return [srcId || 'unknown', route.identity || (route.mode === 'egress' ? 'external' : 'unknown')]
}

function deny(reason, status, text) {
  metrics.denied.withLabels($labels[0], $labels[1], reason).increase()
  return new Message({ status, headers: { 'content-type': 'text/plain' } }, text + '\n')
}

var closeNow = $=>$.replaceStreamStart(new StreamEnd)
var connectTarget = $=>$.connect(() => $route.target)
var connectUpstream = $=>$.connect(() => $route.target, () => resilience.connectOptions($attempt && $attempt.service, $attempt && $attempt.timeoutMs))
// The last hop to a pod of this node: MQTT ports go through proxy/mqtt.js
// (topic access control and metrics) on the identity this hop proved.
var mqttInfo = () => ({ source: $srcId || 'unknown', broker: $route.identity || 'unknown', grant: $grant })
var toLocalMqtt = mqtt.guard(mqttInfo, connectTarget)
// A TCP connection's branch, chosen once: the route's mode, and for a local pod its MQTT ports apart.
var tcpBranch = () => ($route.mode === 'local' && protocolAt($route.target) === 'mqtt' ? 'local-mqtt' : $route.mode)
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
// Pools are keyed by it, since a connection has one read timeout, and by the
// service's maxRequestsPerConnection (resilience.poolOptions).
var muxToTarget = $=>$
  .muxHTTP(() => resilience.poolKey($attempt, $route.target), () => resilience.poolOptions($attempt, UPSTREAM_MAX_IDLE)).to(connectUpstream)

// HTTP over a tunnel to the target's node proxy: a tunnel per pod connection
// and target, never shared with another connection (tunnel.js says why), so
// it carries one source identity, which the far side authorises every request
// of that tunnel with (its CONNECT header, or under mTLS the certificate of
// the peer connection it rides).

// To another cluster's gateway (multicluster.js): HTTP CONNECT naming the
// service, as HTTP/2 streams over one mutual TLS connection per source
// identity and gateway (clusterset.js: the source's certificate crosses). HTTP requests
// ride connections that time out after 2 s without a byte (a cut uplink is
// noticed within that, and the requests in flight fail over); long-lived TCP
// tunnels get their own connections without that timeout.
var gatewayRequest = () => new Message({ method: 'CONNECT', path: $route.target, headers: { host: $route.target } })
// Pool keys end in the route's `generation` (pool-generation.js), which moves
// on when the gateway's instance drains: the next requests then open new
// connections, to its new instances.
//
// A connection to a gateway that could not be made (refused, or no answer
// within the connect timeout) marks the gateway dead here, where the error is
// known: the requests waiting on it only see their tunnel close, which they
// cannot tell from a far instance closing its pooled connections after a
// drain (not a mark: resilience.js). Without this, a cut uplink left the
// gateways unmarked and every second a batch of requests waited out the
// connect timeout again (the lab's link-cut: recovery 9 s instead of 1).
var GATEWAY_UNREACHABLE = { ConnectionRefused: true, ConnectionTimeout: true }
var toGateway = (kind, options) => $=>$
  .muxHTTP(() => cs.poolKey(kind, $srcId, $route.tunnel, $route.cluster) + '~' + $route.generation, { version: 2 }).to($ => cs.connectGateway(() => $route.tunnel, options)($)
    .handleStreamEnd(eos => { if (GATEWAY_UNREACHABLE[eos.error]) mc.markDead($route.tunnel) })
  )
var toGatewayTCP = $=>$
  .connectHTTPTunnel(gatewayRequest).to($ => toGateway('tcp', { connectTimeout: 1 })($)
    .handleMessageStart(msg => mc.heardFrom($route, msg.head.headers))
  )
  .handleStreamEnd(eos => { if (eos.error) mc.markDead($route.tunnel) })
var muxToGateway = $=>$
  .muxHTTP(() => 'gw>' + $srcId + '>' + $route.tunnel + '>' + $route.target + '~' + $route.generation, { maxIdle: UPSTREAM_MAX_IDLE }).to($=>$
    .connectHTTPTunnel(gatewayRequest).to(toGateway('http', { connectTimeout: 1, readTimeout: 2 }))
  )

// ---- outbound, TCP: one decision per connection ------------------------------

// The data path runs one JavaScript callback per chunk and direction (plus
// mqtt.js's scan on a local MQTT port): each counts the chunk's bytes on a
// counter this connection looked up once, and the route's branch is chosen
// once (tcpBranch), a local pod's MQTT port included, so a chunk passes no
// extra pipe. docs/proxy.md ("Forwarding cost"): a forwarded message costs
// about what a Pipy forwarder without any JavaScript costs.
var outboundTCP = $=>$
  .onStart(() => {
    drain.connectionOpens()
    $route = mc.decideImport($dstIp, $dstPort) || decide($dstIp, $dstPort)
    $labels = labelsOf($srcId, $route)
    $sent = metrics.bytes.withLabels($labels[0], $labels[1], 'sent')
    $received = metrics.bytes.withLabels($labels[0], $labels[1], 'received')
    metrics.connections.withLabels($labels[0], $labels[1]).increase()
    if ($route.tier !== undefined) mc.routed.withLabels($route.service, $route.cluster || 'none').increase()
    if ($route.mode === 'local' && !connectionAllowed($grant = grant($srcId, $route.identity, portOf($route.target)), protocolAt($route.target))) {
      metrics.denied.withLabels($labels[0], $labels[1], 'access').increase()
      $route = Object.assign({}, $route, { mode: 'denied' })
    } else if ($route.mode === 'refused' || $route.mode === 'unavailable') {
      metrics.denied.withLabels($labels[0], $labels[1], $route.mode).increase()
    } else if (($route.mode === 'tunnel' && (why = tls.refusal($srcId, $route))) || ($route.mode === 'gateway' && (why = cs.refusal($srcId, $route.cluster)))) {
      metrics.denied.withLabels($labels[0], $labels[1], why).increase()
      $route = Object.assign({}, $route, { mode: 'refused' })
    } else if ((why = resilience.admitConnection($srcId, $route.service))) {
      metrics.denied.withLabels($labels[0], $labels[1], why).increase()
      $route = Object.assign({}, $route, { mode: 'refused' })
    } else {
      $route = Object.assign({}, $route, { admitted: true })
      if ($route.mode === 'tunnel') tunnel.use($srcId, $route, $labels)
    }
  })
  // Open TCP connections (MQTT, ...) hold a retiring instance's drain (drain.js).
  .onEnd(drain.connectionCloses)
  .handleStreamEnd(() => { if ($route.admitted) resilience.endConnection($route.service) })
  .handleData(d => $sent.increase(d.size))
  .pipe(tcpBranch, {
    denied: closeNow,
    refused: closeNow,
    unavailable: closeNow,
    tunnel: tunnel.tcp,
    gateway: toGatewayTCP,
    local: connectTarget,
    'local-mqtt': toLocalMqtt,
    direct: connectTarget,
    egress: connectTarget,
  })
  .handleData(d => $received.increase(d.size))

// ---- outbound, HTTP: one decision per request (splits balance requests) ------

// One HTTP request is one attempt loop of resilience.js. Each attempt asks
// for its next target (nextRoute), is judged by access control and admitted
// (circuit, limits, rate limits), forwarded under its timeout, and its answer
// or failure is judged: it feeds outlier detection, circuit breaking and the
// clusterset's gateway marks, and may end the attempt to try again elsewhere.
// A request a retry policy covers (a Retry object, or the failover of a
// clusterset IP) runs its attempts in repeat(); other requests go once and
// pay nothing for it.

// The next target: for a clusterset IP the first usable tier's member, the
// clusters already tried skipped (multicluster.js); else an endpoint of the
// service, outlier-aware, avoiding the endpoints already tried (route.js).
function nextRoute(head) {
  var a = $attempt
  return mc.decideImport($dstIp, $dstPort, head, a.clusters, a.tried) || decide($dstIp, $dstPort, head, a.tried)
}

function decideRequest(msg) {
  var a = $attempt
  resilience.attemptStarts(a)
  $route = nextRoute(msg.head)
  $labels = labelsOf($srcId, $route)
  if (a.n === 0) metrics.requests.withLabels($labels[0], $labels[1]).increase()
  if ($route.tier !== undefined) mc.routed.withLabels($route.service, $route.cluster || 'none').increase()
  if ($route.mode === 'local') {
    $grant = grant($srcId, $route.identity, portOf($route.target))
    if (!requestAllowed($grant, msg.head)) $route = Object.assign({}, $route, { mode: 'denied' })
  } else if (($route.mode === 'tunnel' && (why = tls.refusal($srcId, $route))) || ($route.mode === 'gateway' && (why = cs.refusal($srcId, $route.cluster)))) {
    $route = Object.assign({}, $route, { mode: 'unauthenticated', why })
  }
  if (resilience.toEndpoint($route) && resilience.admit(a, $route.service)) $route = Object.assign({}, $route, { mode: 'limited', pool: null })
  if ($route.mode === 'tunnel') tunnel.use($srcId, $route, $labels)
  resilience.dispatch(a, $route, msg.head)
}

var currentAttempt = () => $attempt

var forwardByMode = {
  denied: $=>$.replaceMessage(() => deny('access', 403, 'access denied by fsm-node')),
  refused: $=>$.replaceMessage(() => deny('refused', 503, 'no endpoint available')),
  unavailable: $=>$.replaceMessage(() => deny('unavailable', 503, 'no endpoint available')),
  unauthenticated: $=>$.replaceMessage(() => deny($route.why, 503, 'no valid identity certificate for this source: ' + $route.why)),
  limited: $=>$.replaceMessage(() => resilience.refusal($attempt)),
  tunnel: resilience.withTimeout(tunnel.http, currentAttempt),
  gateway: resilience.withTimeout(muxToGateway, currentAttempt),
  local: resilience.withTimeout(muxToTarget, currentAttempt),
  direct: resilience.withTimeout(muxToTarget, currentAttempt),
  egress: resilience.withTimeout(muxToTarget, currentAttempt),
}

// One attempt: decided, sent, judged. An answer to try again is dropped as
// it arrives and ends the attempt (StreamEnd 'Replay') at its end.
var attemptRequest = $=>$
  .handleMessageStart(decideRequest)
  .handleData(d => { if ($attempt.n === 0) metrics.bytes.withLabels($labels[0], $labels[1], 'sent').increase(d.size) })
  .pipe(() => $route.mode, forwardByMode)
  .replaceMessageStart(msg => resilience.judgeAnswer($attempt, $route, msg))
  .replaceData(d => resilience.passData($attempt, d))
  .replaceMessageEnd(e => resilience.judgeMessageEnd($attempt, e))
  .replaceStreamEnd(e => resilience.judgeEnd($attempt, $route, e))

var outboundHTTP = $=>$
  // A pod's keep-alive connection holds a retiring instance's drain until it closes (drain.js).
  .onStart(drain.clientOpens)
  .onEnd(drain.clientCloses)
  .demuxHTTP().to($=>$
    // Requests in flight hold a retiring instance's drain (drain.js).
    .onStart(drain.requestStarts)
    .onEnd(drain.requestEnds)
    .handleMessageStart(msg => {
      $start = Date.now()
      var imp = mc.importAt($dstIp, $dstPort)
      var svc = imp ? null : config.services[$dstIp + ':' + $dstPort]
      $attempt = resilience.begin($srcId, msg.head, imp ? imp.service : (svc ? svc.service : null), imp !== null)
    })
    .pipe(() => $attempt.mayRetry ? 'retry' : 'once', {
      retry: $=>$.repeat(evt => resilience.again($attempt, evt)).to(attemptRequest),
      once: attemptRequest,
    })
    .handleMessageEnd(() => resilience.end($attempt))
    .handleStreamEnd(() => resilience.end($attempt))
    .handleMessageStart(msg => {
      var status = msg.head.status
      metrics.responses.withLabels($labels[0], $labels[1], metrics.statusClass(status)).increase()
      metrics.latency.withLabels($labels[0], $labels[1]).observe(Date.now() - $start)
      drain.answer(msg)
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
  // Clusterset IPs first (mesh destinations in another cluster); then, under
  // egress deny, a destination outside the mesh is egress.js's to judge (its branches are 'egress:*').
  .pipe(() => {
    if ($dstIp === '') return 'tcp'
    var imported = mc.protocolOf($dstIp, $dstPort)
    if (imported) return imported === 'http' ? 'http' : 'tcp'
    if (egress.handles($srcId, $dstIp, $dstPort)) return 'egress:' + egress.outbound($srcId, $dstIp, $dstPort)
    return protocolOf($dstIp, $dstPort) === 'http' ? 'http' : 'tcp'
  }, Object.assign({ http: outboundHTTP, tcp: outboundTCP }, egress.branches))
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
    // Under mTLS only the clusterset gateway identity may name a source, one of another cluster (clusterset.js).
    $srcId = tls.enabled ? cs.vouchedSource(tls.peerIdentity(), req.head.headers[SOURCE_HEADER]) : ((peer && req.head.headers[SOURCE_HEADER]) || '')
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
    var protocol = ep.ports[port] || 'tcp'
    if (protocol !== 'http' && !connectionAllowed($grant, protocol)) return refuse('denied', 403, 'access denied by fsm-node')
    metrics.tunnels.withLabels(labels[0], labels[1], 'accepted', tls.transport).increase()
    // While this instance drains, the answer tells the peer to open its next tunnels on a new connection (drain.js).
    var ok = new Message({ status: 200 })
    drain.mark(ok)
    return ok
  }).to($=>$
    // As on the outbound side: start at once, so a server-first protocol gets its connection.
    // An accepted tunnel holds a retiring instance's drain until it ends: one
    // answered just before the drain would otherwise end could lose the
    // request its peer sends next (the peer cannot resend into an answered tunnel).
    .onStart(() => { drain.connectionOpens(); return new Data })
    .onEnd(drain.connectionCloses)
    .pipe(() => config.endpoints[$dstIp].ports[$dstPort] || 'tcp', {
      http: $=>$
        .demuxHTTP().to($=>$
          .onStart(drain.requestStarts)
          .onEnd(drain.requestEnds)
          .handleMessageStart(msg => { $head = msg.head; $attempt = resilience.fromPeer(msg.head) })
          .pipe(() => requestAllowed($grant, $head) ? 'allowed' : 'denied', {
            allowed: muxToTarget,
            denied: $=>$.replaceMessage(new Message({ status: 403, headers: { 'content-type': 'text/plain' } }, 'access denied by fsm-node\n')),
          })
          .replaceStreamEnd(evt => resilience.peerHopEnd(evt))
        ),
      mqtt: mqtt.guard(mqttInfo, connectTarget),
      tcp: connectTarget,
    })
  ))
))

// ---- from other clusters: the gateway listener (multicluster.js) -------------
//
// Every node proxy of a cluster in a clusterset listens; other clusters send
// only to the nodes labelled as gateways. A tunnel names an exported service
// ("name.ns:port"), never a pod; the endpoint is picked here, and reached
// like any local destination (on this node, or through its node's proxy).
// GET /healthz answers 200 (a probe of the gateway itself). Mutual TLS only
// (clusterset.js): the source identity is the one the client certificate
// proved, in its cluster's trust domain, and access control judges it.

if (mc.enabled) pipy.listen(mc.gatewayPort(), cs.serve($=>$
  .demuxHTTP().to($=>$
    .handleMessageStart(msg => { $head = msg.head })
    .pipe(() => $head.method === 'CONNECT' ? 'tunnel' : 'health', {
      health: $=>$.replaceMessage(() => new Message({ status: $head.path === '/healthz' ? 200 : 404 }, 'cluster ' + mc.clusterName() + '\n')),
      tunnel: $=>$.acceptHTTPTunnel(req => {
        var target = req.head.path || ''
        var refuse = (status, result, text) => {
          mc.gatewayTunnels.withLabels(target, result).increase()
          return new Message({ status, headers: { [mc.GATEWAY_HEADER]: mc.clusterName() } }, text + '\n')
        }
        $srcId = cs.peerSource()
        if (!$srcId) return refuse(403, 'unauthenticated', 'tunnel not authenticated')
        var a = mc.acceptFromCluster(target)
        if (!a.route) return refuse(a.status, a.status === 404 ? 'no-such-service' : 'unavailable', a.text)
        $route = a.route
        $gwTarget = target
        if (mc.exportProtocol(target) === 'tcp') {
          if ($route.mode === 'local' && !grant($srcId, $route.identity, portOf($route.target)).tcp) return refuse(403, 'denied', 'access denied by fsm-node')
          if ($route.mode === 'tunnel' && (why = tls.refusal($srcId, $route))) return refuse(503, why, 'cannot reach the endpoint: ' + why)
        }
        mc.gatewayTunnels.withLabels(target, 'accepted').increase()
        return new Message({ status: 200 })
      }).to($=>$
        .onStart(() => new Data)
        .pipe(() => mc.exportProtocol($gwTarget), {
          // HTTP: every request inside the tunnel picks its endpoint and is judged on its own.
          http: $=>$.demuxHTTP().to($=>$
            .onStart(drain.requestStarts)
            .onEnd(drain.requestEnds)
            .handleMessageStart(msg => {
              var a = mc.acceptFromCluster($gwTarget, msg.head)
              $route = a.route || { mode: 'unavailable' }
              if ($route.mode === 'local' && !requestAllowed(grant($srcId, $route.identity, portOf($route.target)), msg.head)) $route = { mode: 'denied' }
              else if ($route.mode === 'tunnel' && tls.refusal($srcId, $route)) $route = { mode: 'unavailable' }
              else if ($route.mode === 'tunnel') tunnel.use($srcId, $route, labelsOf($srcId, $route))
            })
            .pipe(() => $route.mode, {
              denied: $=>$.replaceMessage(() => new Message({ status: 403, headers: { [mc.GATEWAY_HEADER]: mc.clusterName() } }, 'access denied by fsm-node\n')),
              unavailable: $=>$.replaceMessage(() => new Message({ status: 503, headers: { [mc.GATEWAY_HEADER]: mc.clusterName() } }, 'no ready endpoint in cluster ' + mc.clusterName() + '\n')),
              local: muxToTarget,
              tunnel: tunnel.http,
            })
            // While this instance drains, the other cluster's proxy moves its next requests to a new connection (drain.js).
            .handleMessageStart(drain.mark)
          ),
          tcp: $=>$
            .onStart(() => { if ($route.mode === 'tunnel') tunnel.use($srcId, $route, labelsOf($srcId, $route)) })
            .pipe(() => $route.mode, {
              local: connectTarget,
              tunnel: tunnel.tcp,
            }),
        })
      ),
    })
  ))
)

// ---- ingress: the Gateway API listeners of this node (gateway.js) ----------------

gateway.listen()
