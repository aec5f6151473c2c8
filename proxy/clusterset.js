// Mutual TLS between clusters (docs/multicluster.md, docs/security.md
// "Across clusters"): the tunnels from a node proxy to another cluster's
// gateway, and the gateway listener that takes them.
//
// Trust: every cluster's mesh CA is an intermediate of the clusterset CA,
// name constrained to the cluster's trust domain ("<id>.cluster.local"), so
// both ends verify the other's chain against the clusterset CA alone, and a
// certificate a cluster's CA signed for another cluster's trust domain fails
// that verification (OpenSSL enforces the constraint).
//
// Client (this node, to a gateway of cluster X): presents the SOURCE pod's
// certificate, as a tunnel inside the cluster does, so the source identity
// crosses; sends SNI "gateway.<X's trust domain>" and accepts only a server
// certificate of the gateway identity in X's trust domain. Pools are keyed by
// source identity and gateway, renewed like tls.js's (maxConnectionAgeSeconds).
//
// Server (the gateway listener): presents this cluster's gateway identity
// (only to the SNI naming it), requires a client certificate chained to the
// clusterset CA that proves exactly one identity of a member's trust domain.
// The source identity handed to access control is "ns/sa" for this cluster's
// own trust domain and "spiffe://<td>/ns/<ns>/sa/<sa>" for another's, the
// string TrafficTargets render for sources of other clusters. Plaintext, no
// certificate, a foreign CA: the handshake fails and is counted
// (fsmn_proxy_tls_handshake_failures_total{side="gateway-server"}).
//
// Closed (`refuse`: no clusterset CA in the policy, no mesh mTLS, a mesh
// trust domain that is not the cluster's): every gateway tunnel is refused
// both ways with that reason; never plaintext.

import config from './config.js'
import * as metrics from './metrics.js'
import * as tls from './tls.js'

var MC = config.multicluster || null
var C = MC ? MC.tls : null
export var enabled = C !== null
var closed = !C ? '' : (C.refuse || (!tls.enabled ? 'no-mesh-tls' : ''))
export var GATEWAY_ID = C ? C.gatewayIdentity : ''

var trusted = []
if (C && !closed) {
  trusted = tls.pemBlocks(C.bundle).map(p => new crypto.Certificate(p))
  if (trusted.length === 0) throw new Error('multicluster.tls.bundle holds no certificate: refusing gateway tunnels that would accept any peer')
}

// trust domain -> cluster id, for the clusters of the clusterset.
var clusterOfTd = {}
if (C) Object.keys(C.trustDomains).forEach(id => { clusterOfTd[C.trustDomains[id]] = id })

// "<sa>.<ns>.sa.<td>" -> the proxy's identity string, for a member's trust domain; '' otherwise.
function identityOfName(name) {
  var found = ''
  Object.keys(clusterOfTd).forEach(td => {
    var suffix = '.sa.' + td
    if (found || name.length <= suffix.length || name.substring(name.length - suffix.length) !== suffix) return
    var rest = name.substring(0, name.length - suffix.length)
    var dot = rest.lastIndexOf('.')
    if (dot <= 0 || dot === rest.length - 1) return
    var ns = rest.substring(dot + 1)
    var sa = rest.substring(0, dot)
    found = td === C.trustDomain ? ns + '/' + sa : 'spiffe://' + td + '/ns/' + ns + '/sa/' + sa
  })
  return found
}

// The identity a certificate proves among the clusterset's trust domains: exactly one.
function identityOfCert(cert) {
  var found = []
  ;(cert.subjectAltNames || []).forEach(n => {
    var id = identityOfName(n)
    if (id && found.indexOf(id) < 0) found.push(id)
  })
  return found.length === 1 ? found[0] : ''
}

// What a gateway of `cluster` must prove.
function gatewayOf(cluster) {
  var td = C.trustDomains[cluster]
  if (!td) return ''
  return td === C.trustDomain ? GATEWAY_ID : 'spiffe://' + td + '/ns/' + GATEWAY_ID.replace('/', '/sa/')
}

function sniOf(cluster) {
  return 'gateway.' + (C.trustDomains[cluster] || 'unknown')
}

var maxAgeMs = config.tunnelTLS ? config.tunnelTLS.maxConnectionAgeSeconds * 1000 : 60000

// ---- client: to another cluster's gateway --------------------------------------

var $src      // the presented identity's entry
var $expect   // the identity the gateway must prove
var $cluster  // the gateway's cluster
var $reason
var $up
var $failed

function fail(side, reason) {
  if ($failed) return
  $failed = true
  metrics.handshakeFailures.withLabels(side, reason).increase()
}

function usableEntry(e) {
  if (!e) return 'no-identity'
  if (e.problem) return e.problem
  if (Date.now() >= e.notAfter) return 'identity-expired'
  return ''
}

// '' when `srcId` may open a tunnel to `cluster`'s gateway, else why not
// (a source of another cluster is never relayed on to a third).
export function refusal(srcId, cluster) {
  if (!C) return 'no-clusterset'
  if (closed) return closed
  if (!srcId) return 'no-identity'
  if (tls.isForeign(srcId)) return 'foreign-source'
  if (!C.trustDomains[cluster]) return 'unknown-cluster'
  return usableEntry(tls.localEntry(srcId))
}

// The muxHTTP key of a connection to a gateway: one pool per (kind, presented
// identity, gateway), renewed every maxAgeMs; remembers in this context whom
// to present and expect. `srcId` '' presents the gateway identity (probes).
export function poolKey(kind, srcId, gw, cluster) {
  var presented = srcId || GATEWAY_ID
  $src = tls.localEntry(presented)
  $cluster = cluster
  $expect = gatewayOf(cluster)
  return kind + '>' + presented + '@' + gw + '#' + Math.floor(Date.now() / maxAgeMs)
}

var clientOptions = {
  minVersion: 'TLS1.3',
  trusted,
  certificate: () => ($src && $src.cert ? { cert: $src.cert, key: $src.key } : null),
  sni: () => sniOf($cluster),
  verify: (ok, cert) => {
    if (!ok) { $reason = tls.chainProblem(cert); return false }
    if (!$expect || identityOfCert(cert) !== $expect) { $reason = 'peer-identity-mismatch'; return false }
    return true
  },
  onState: s => {
    if (s.state === 'connected') $up = true
    else if (s.state === 'closed' && !$up) fail('gateway-client', $reason || tls.classify(s.error))
  },
}

// A connection to a gateway (`target` a function giving "address:port").
export function connectGateway(target, options) {
  if (closed || !C) return $=>$.replaceStreamStart(new StreamEnd)
  return $=>$.connectTLS(clientOptions).to($=>$.connect(target, options))
}

// ---- server: the gateway listener -----------------------------------------------

var $named
var $plain
var $peerId
var $peerNotAfter

var ownSni = C ? sniOf(MC.cluster) : ''

var serverOptions = {
  minVersion: 'TLS1.3',
  trusted,
  certificate: sni => {
    if (sni === undefined || sni === null) return null
    $named = true
    if (sni !== ownSni) { $reason = 'unknown-server-name'; return null }
    var e = tls.localEntry(GATEWAY_ID)
    var why = usableEntry(e)
    if (why) { $reason = why; return null }
    return { cert: e.cert, key: e.key }
  },
  verify: (ok, cert) => {
    if (!ok) { $reason = tls.chainProblem(cert); return false }
    if (!identityOfCert(cert)) { $reason = 'peer-identity-missing'; return false }
    return true
  },
  onState: s => {
    if (s.state === 'connected') {
      $up = true
      $peerId = s.peer ? identityOfCert(s.peer) : ''
      $peerNotAfter = s.peer ? s.peer.notAfter : 0
    } else if (s.state === 'closed' && !$up) {
      var why = $plain ? 'plaintext' : ($reason || tls.classify(s.error))
      if (!$named && why !== 'plaintext' && why !== 'aborted') why = 'no-server-name'
      fail('gateway-server', why)
    }
  },
}

// The gateway listener's pipeline: mutual TLS, then `inner`.
export function serve(inner) {
  if (closed || !C) {
    var reason = closed || 'no-clusterset'
    return $=>$
      .onStart(() => { metrics.handshakeFailures.withLabels('gateway-server', reason).increase() })
      .replaceStreamStart(new StreamEnd)
  }
  return $=>$
    .detectProtocol(p => { if (p !== 'TLS') $plain = true })
    .acceptTLS(serverOptions).to(inner)
}

// The verified source of this gateway connection ('' when none, or its certificate expired since).
export function peerSource() {
  if (!$peerId || Date.now() >= $peerNotAfter) return ''
  return $peerId
}

// At this cluster's inbound (:15003): the source a tunnel speaks for. Only
// the gateway identity may name a source, and only one of another member's
// trust domain (so a gateway can never speak for a workload of this cluster).
export function vouchedSource(peerId, header) {
  if (!C || !peerId || peerId !== GATEWAY_ID || !header) return peerId
  if (!tls.isForeign(header)) return peerId
  var rest = header.substring(9)
  var td = rest.substring(0, rest.indexOf('/'))
  if (!clusterOfTd[td] || td === C.trustDomain) return peerId
  return header
}
