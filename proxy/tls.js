// Mutual TLS between node proxies: the tunnel (:15003) is HTTP/2 over TLS 1.3.
//
// Client (this node's outbound side, one tunnel pool per source identity,
// destination identity and destination node): presents the SOURCE pod's
// identity certificate, names the destination identity in SNI and accepts
// only a server certificate of that identity, chained to the trust bundle.
//
// Server (this node's :15003): presents the certificate of the identity SNI
// names (a pod identity of this node), requires a client certificate chained
// to the trust bundle; the identity in that certificate is the tunnel's
// source identity. Nothing the client says in headers is believed.
//
// TLS 1.3 encrypts both certificates; SNI travels in clear, so it carries a
// hash of the destination identity's name (sniOf), not the name: a passive
// observer of the underlay reads no identity (one who can guess service
// account names can still confirm a guess: it hides, it does not protect).
//
// Identity <-> certificate (the same mapping as src/identity/spiffe.ts):
// identity "ns/sa" is the DNS SAN "<sa>.<ns>.sa.<trust domain>" (Pipy 1.5
// shows scripts the subject and DNS SANs, not the SPIFFE URI SAN). A
// namespace has no dots, a service account may: the last label before
// ".sa.<trust domain>" is the namespace.
//
// Keys never pass through config.json: it names the files (written 0600 by
// the agent's IdentityManager), read here once per program load. A renewal
// changes the config (notAfter), so the agent's reload brings the new files in.
//
// config.tunnelTLS.refuse (the policy's trust bundle holds no root): every
// tunnel is refused both ways, with that reason; never plaintext.
// config.tunnelTLS === null (only for tests and benchmarks of the old path;
// the agent always renders tunnelTLS): plaintext tunnels, authenticated by
// node address only (see proxy/README.md).

import config from './config.js'
import * as metrics from './metrics.js'

var T = config.tunnelTLS || null
export var enabled = T !== null
var closed = T && T.refuse ? T.refuse : ''

var BEGIN = '-----BEGIN CERTIFICATE-----'
var END = '-----END CERTIFICATE-----'

// Every PEM certificate block of a text, in order.
export function pemBlocks(text) {
  return text.split(END)
    .filter(part => part.indexOf(BEGIN) >= 0)
    .map(part => part.substring(part.indexOf(BEGIN)) + END + '\n')
}

var suffix = T ? '.sa.' + T.trustDomain : ''

export function nameOf(id) {
  var slash = id.indexOf('/')
  return id.substring(slash + 1) + '.' + id.substring(0, slash) + suffix
}

// The SNI of an identity: "id-<32 hex of sha256(name)>.<trust domain>".
var sniCache = {}
export function sniOf(id) {
  var s = sniCache[id]
  if (s) return s
  var h = new crypto.Hash('sha256')
  h.update(nameOf(id))
  s = 'id-' + h.digest('hex').substring(0, 32) + '.' + T.trustDomain
  sniCache[id] = s
  return s
}

function identityOfName(name) {
  if (name.length <= suffix.length || name.substring(name.length - suffix.length) !== suffix) return ''
  var rest = name.substring(0, name.length - suffix.length)
  var dot = rest.lastIndexOf('.')
  if (dot <= 0 || dot === rest.length - 1) return ''
  return rest.substring(dot + 1) + '/' + rest.substring(0, dot)
}

// The identity a certificate proves: exactly one DNS SAN of our trust domain's form.
function identityOfCert(cert) {
  var found = []
  ;(cert.subjectAltNames || []).forEach(n => {
    var id = identityOfName(n)
    if (id && found.indexOf(id) < 0) found.push(id)
  })
  return found.length === 1 ? found[0] : ''
}

// Why OpenSSL rejected a chain, as far as the leaf's dates tell.
export function chainProblem(cert) {
  var now = Date.now()
  if (cert && cert.notAfter <= now) return 'peer-expired'
  if (cert && cert.notBefore > now) return 'peer-not-yet-valid'
  return 'untrusted'
}

// OpenSSL's error text -> a short reason, for what no callback of ours saw.
export function classify(error) {
  var e = String(error || '')
  if (e === '') return 'aborted'
  if (e.indexOf('http request') >= 0 || e.indexOf('proxy request') >= 0 || e.indexOf('wrong version number') >= 0 || e.indexOf('packet length too long') >= 0) return 'plaintext'
  if (e.indexOf('peer did not return a certificate') >= 0 || e.indexOf('certificate required') >= 0) return 'no-client-certificate'
  if (e.indexOf('unsupported protocol') >= 0 || e.indexOf('protocol version') >= 0) return 'protocol-version'
  if (e.indexOf('certificate expired') >= 0) return 'peer-expired'
  if (e.indexOf('unknown ca') >= 0 || e.indexOf('certificate verify failed') >= 0 || e.indexOf('bad certificate') >= 0) return 'untrusted'
  return 'handshake-error'
}

// ---- load: trust bundle and local identities ---------------------------------

var trusted = []
var local = {}
var bySni = {}

if (T && !closed) {
  trusted = pemBlocks(T.trustBundle || '').map(p => new crypto.Certificate(p))
  // Pipy verifies peers only when `trusted` is non-empty: an empty list would
  // silently accept anyone. Fail the load instead (the last good config stays).
  if (trusted.length === 0) throw new Error('tunnelTLS.trustBundle holds no certificate: refusing to serve tunnels that would accept any peer')

  Object.keys(T.identities).forEach(id => {
    var f = T.identities[id]
    var e = { id, cert: null, key: null, notAfter: 0, problem: '' }
    local[id] = e
    bySni[sniOf(id)] = e
    if (f.state === 'expired') { e.problem = 'identity-expired'; return }
    if (f.state !== 'valid') { e.problem = 'identity-unavailable'; return }
    try {
      var certData = os.readFile(f.certFile)
      var keyData = os.readFile(f.keyFile)
      if (!certData || !keyData) throw new Error('cannot read ' + f.certFile + ' or ' + f.keyFile)
      var blocks = pemBlocks(certData.toString())
      if (blocks.length === 0) throw new Error(f.certFile + ' holds no certificate')
      var leaf = new crypto.Certificate(blocks[0])
      if (identityOfCert(leaf) !== id) throw new Error(f.certFile + ' is not a certificate of ' + id)
      e.cert = new crypto.CertificateChain(certData)
      e.key = new crypto.PrivateKey(keyData)
      e.notAfter = leaf.notAfter
    } catch (err) {
      e.problem = 'identity-unavailable'
      console.log('fsmn tls: identity ' + id + ' unavailable: ' + err.message)
    }
  })
}

// A tunnel connection is used for new tunnels for at most this long: a reload
// (new certificate, new trust, new policy on either side) reaches every pool
// within it, and the server never serves new tunnels to a certificate past its
// notAfter (see peerRefusal).
var maxAgeMs = T ? T.maxConnectionAgeSeconds * 1000 : 0

// ---- client: the outbound side's tunnel pools ---------------------------------

var $src      // the source identity's entry (certificate and key)
var $expect   // the destination identity the server must prove
var $reason   // why a handshake failed, when one of our callbacks knew
var $up       // the handshake completed
var $failed   // counted already (a session reports 'closed' more than once)

function fail(side, reason) {
  if ($failed) return
  $failed = true
  metrics.handshakeFailures.withLabels(side, reason).increase()
}

// A local identity's certificate entry ({ cert, key, notAfter, problem }), or null.
export function localEntry(id) {
  return local[id] || null
}

// A source of another cluster ("spiffe://<trust domain>/ns/<ns>/sa/<sa>",
// proxy/clusterset.js) that a gateway forwards to a pod on another node of
// this cluster: the tunnel presents the gateway identity, which vouches for
// the source in the CONNECT's source header (the far side believes that
// header only from the gateway identity, only for another cluster's source).
export function isForeign(srcId) {
  return !!srcId && srcId.substring(0, 9) === 'spiffe://'
}
var GATEWAY_ID = config.multicluster ? config.multicluster.tls.gatewayIdentity : ''
function presenter(srcId) {
  return isForeign(srcId) ? GATEWAY_ID : srcId
}

// '' when a tunnel from srcId to the route's destination may be opened, else the
// reason it may not (counted by the caller as a denial): fail closed.
export function refusal(srcId, route) {
  if (!T) return ''
  if (closed) return closed
  var e = local[presenter(srcId)]
  if (!e) return 'no-identity'
  if (e.problem) return e.problem
  if (Date.now() >= e.notAfter) return 'identity-expired'
  if (!route.identity) return 'unknown-destination-identity'
  return ''
}

// The muxHTTP key of a tunnel: one pool per (source identity, destination
// identity, destination node), renewed every maxAgeMs. Also remembers, in this
// context (which the pool's new connection inherits), whom to present and expect.
export function poolKey(srcId, route) {
  if (!T) return route.tunnel
  $src = local[presenter(srcId)]
  $expect = route.identity
  return srcId + '>' + route.identity + '@' + route.tunnel + '#' + Math.floor(Date.now() / maxAgeMs)
}

var clientOptions = {
  minVersion: 'TLS1.3',
  trusted,
  certificate: () => ($src && $src.cert ? { cert: $src.cert, key: $src.key } : null),
  sni: () => sniOf($expect),
  verify: (ok, cert) => {
    if (!ok) { $reason = chainProblem(cert); return false }
    if (identityOfCert(cert) !== $expect) { $reason = 'peer-identity-mismatch'; return false }
    return true
  },
  onState: s => {
    if (s.state === 'connected') $up = true
    else if (s.state === 'closed' && !$up) fail('client', $reason || classify(s.error))
  },
}

// Where a tunnel pool's connection goes: TLS to the peer proxy, or plaintext.
export function connectPeer(target) {
  if (closed) return $=>$.replaceStreamStart(new StreamEnd) // never reached: refusal() stops these first
  return T
    ? ($=>$.connectTLS(clientOptions).to($=>$.connect(target)))
    : ($=>$.connect(target))
}

// ---- server: :15003 -------------------------------------------------------------

var $named    // the client sent a server name
var $plain    // the first bytes were not a TLS handshake
var $peerId   // the verified source identity ('' before the handshake)
var $peerNotAfter

var serverOptions = {
  minVersion: 'TLS1.3',
  trusted,
  // Called once before the ClientHello is read (no name yet), then with the SNI.
  certificate: sni => {
    if (sni === undefined || sni === null) return null
    $named = true
    var e = bySni[sni]
    if (!e) { $reason = 'unknown-server-name'; return null }
    if (e.problem) { $reason = e.problem; return null }
    if (Date.now() >= e.notAfter) { $reason = 'identity-expired'; return null }
    return { cert: e.cert, key: e.key }
  },
  verify: (ok, cert) => {
    if (!ok) { $reason = chainProblem(cert); return false }
    if (!identityOfCert(cert)) { $reason = 'peer-identity-missing'; return false }
    return true
  },
  onState: s => {
    if (s.state === 'connected') {
      var peer = s.peer
      $up = true
      $peerId = peer ? identityOfCert(peer) : ''
      $peerNotAfter = peer ? peer.notAfter : 0
    } else if (s.state === 'closed' && !$up) {
      var why = $plain ? 'plaintext' : ($reason || classify(s.error))
      if (!$named && why !== 'plaintext' && why !== 'aborted') why = 'no-server-name'
      fail('server', why)
    }
  },
}

// The inbound listener's pipeline: TLS first (when on), then `inner`.
export function serve(inner) {
  if (closed) {
    return $=>$
      .onStart(() => { metrics.handshakeFailures.withLabels('server', closed).increase() })
      .replaceStreamStart(new StreamEnd)
  }
  return T
    ? ($=>$
      // Only to name the refusal: a plaintext request fails the handshake anyway.
      .detectProtocol(p => { if (p !== 'TLS') $plain = true })
      .acceptTLS(serverOptions).to(inner))
    : inner
}

// The verified source identity of this tunnel connection.
export function peerIdentity() {
  return $peerId || ''
}

// '' when the verified peer may open a new tunnel now, else why not.
export function peerRefusal() {
  if (!$peerId) return 'unauthenticated'
  if (Date.now() >= $peerNotAfter) return 'peer-expired'
  return ''
}

export var transport = T ? 'mtls' : 'plaintext'
