// Ingress: the Gateway API listeners of this node (config.gateways, rendered
// by src/gateway/render.ts). Each Gateway port is a plain listener in the
// node's host network (HTTP, or HTTPS terminated here with the certificate
// the SNI names). A request takes the first match of the most specific
// hostname bucket that has one (the lists come already in the spec's
// precedence order), its rule's filters, then a backend by weight and an
// endpoint round robin. Into the mesh the request carries the Gateway's own
// identity: a pod of this node is checked against its TrafficTargets here,
// a pod of another node is reached through that node's proxy over a mutual
// TLS tunnel presenting the Gateway's certificate (tls.js), where the same
// check happens.
//
// Reloads (SIGHUP) keep the listening sockets of ports that stay; an
// established connection keeps its old pipeline until it closes.

import config from './config.js'
import { grant, requestAllowed } from './access.js'
import * as tls from './tls.js'
import * as timeouts from './gateway-timeouts.js'
import * as drain from './drain.js'

var UPSTREAM_MAX_IDLE = 4

var requests = new stats.Counter('fsmn_proxy_gateway_requests_total', ['gateway', 'port', 'route', 'class'])
var denials = new stats.Counter('fsmn_proxy_gateway_denied_total', ['gateway', 'port', 'reason'])
var duration = new stats.Histogram(
  'fsmn_proxy_gateway_request_duration_ms',
  [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, Number.POSITIVE_INFINITY],
  ['gateway', 'port']
)

var gateways = config.gateways || []

// ---- compile once per load ----------------------------------------------------

function anchored(re) {
  return new RegExp('^(?:' + re + ')$')
}

function compileValues(list) {
  list.forEach(v => { if (v.type === 'RegularExpression') v.re = anchored(v.value) })
}

function loadCertificate(c) {
  try {
    var cert = os.readFile(c.certFile)
    var key = os.readFile(c.keyFile)
    if (!cert || !key) throw new Error('cannot read ' + c.certFile + ' or ' + c.keyFile)
    return { hostname: c.hostname, cert: new crypto.CertificateChain(cert), key: new crypto.PrivateKey(key) }
  } catch (err) {
    console.log('fsmn gateway: certificate ' + c.certFile + ' unavailable: ' + err.message)
    return null
  }
}

gateways.forEach(g => g.ports.forEach(p => {
  p.gateway = g.gateway
  p.identity = g.identity
  p.scheme = p.protocol === 'HTTPS' ? 'https' : 'http'
  p.hosts.forEach(h => h.matches.forEach(m => {
    if (m.path.type === 'RegularExpression') m.re = anchored(m.path.value)
    if (m.path.type === 'PathPrefix') m.base = m.path.value.charAt(m.path.value.length - 1) === '/' ? m.path.value.substring(0, m.path.value.length - 1) : m.path.value
    compileValues(m.headers)
    compileValues(m.queryParams)
    m.needsQuery = m.queryParams.length > 0
  }))
  p.tlsCerts = p.protocol === 'HTTPS' ? p.certificates.map(loadCertificate).filter(c => c !== null) : []
}))

// ---- per request ----------------------------------------------------------------

function hostMatches(pattern, host) {
  if (pattern === '*') return true
  if (pattern.charAt(0) === '*') return host.length > pattern.length - 1 && host.substring(host.length - pattern.length + 1) === pattern.substring(1)
  return pattern === host
}

function requestHost(h) {
  h = (h || '').toLowerCase()
  var colon = h.lastIndexOf(':')
  return colon >= 0 && h.charAt(0) !== '[' ? h.substring(0, colon) : h
}

function decode(s) {
  try { return decodeURIComponent(s.split('+').join(' ')) } catch (e) { return s }
}

function parseQuery(q) {
  var out = {}
  q.split('&').forEach(pair => {
    if (pair === '') return
    var eq = pair.indexOf('=')
    var name = decode(eq < 0 ? pair : pair.substring(0, eq))
    if (!(name in out)) out[name] = decode(eq < 0 ? '' : pair.substring(eq + 1))
  })
  return out
}

function valueMatches(m, v) {
  return v !== undefined && (m.re ? m.re.test(v) : v === m.value)
}

function pathMatches(m, path) {
  var t = m.path.type
  if (t === 'Exact') return path === m.path.value
  if (t === 'PathPrefix') return m.base === '' || path === m.base || path.substring(0, m.base.length + 1) === m.base + '/'
  return m.re.test(path)
}

// (PipyJS has no `continue` nor `switch`: plain conditions.)
function matchOk(m, r) {
  if (!pathMatches(m, r.path)) return false
  if (m.method !== null && m.method !== r.method) return false
  if (!m.headers.every(h => valueMatches(h, r.headers[h.name]))) return false
  if (!m.needsQuery) return true
  if (r.query === null) r.query = r.q < 0 ? {} : parseQuery(r.target.substring(r.q + 1))
  return m.queryParams.every(p => valueMatches(p, r.query[p.name]))
}

// The winning match for a request head: the first match of the first
// hostname bucket (most specific first) that has one.
function findMatch(port, head) {
  var host = requestHost(head.headers.host)
  var target = head.path || '/'
  var q = target.indexOf('?')
  var r = { target, q, path: q < 0 ? target : target.substring(0, q), query: null, method: (head.method || '').toUpperCase(), headers: head.headers }
  var hosts = port.hosts
  for (var i = 0; i < hosts.length; i++) {
    if (hostMatches(hosts[i].hostname, host)) {
      var found = hosts[i].matches.find(m => matchOk(m, r))
      if (found) return found
    }
  }
  return null
}

function stripSlash(v) {
  return v.charAt(v.length - 1) === '/' ? v.substring(0, v.length - 1) : v
}

// src/gateway/match.ts rewritePath
function rewritePath(mod, path, match) {
  if (mod.type === 'ReplaceFullPath') return mod.value
  var base = match && match.path.type === 'PathPrefix' ? match.base : ''
  var out = stripSlash(mod.value) + path.substring(base.length)
  return out === '' ? '/' : (out.charAt(0) === '/' ? out : '/' + out)
}

function splitTarget(target) {
  var q = target.indexOf('?')
  return q < 0 ? [target, ''] : [target.substring(0, q), target.substring(q)]
}

// src/gateway/match.ts redirectLocation
function redirectLocation(r, port, head, match) {
  var scheme = r.scheme || port.scheme
  var p = r.port || (r.scheme ? (r.scheme === 'https' ? 443 : 80) : port.port)
  var host = r.hostname || requestHost(head.headers.host)
  var parts = splitTarget(head.path || '/')
  var path = r.path ? rewritePath(r.path, parts[0], match) : parts[0]
  var dflt = (scheme === 'http' && p === 80) || (scheme === 'https' && p === 443)
  return scheme + '://' + host + (dflt ? '' : ':' + p) + path + parts[1]
}

function modifyHeaders(headers, mod) {
  if (!mod) return
  mod.set.forEach(h => { headers[h.name] = h.value })
  mod.add.forEach(h => { headers[h.name] = h.name in headers ? headers[h.name] + ',' + h.value : h.value })
  mod.remove.forEach(n => { delete headers[n] })
}

// Smooth weighted round robin per (port, rule), then round robin over the
// backend's endpoints; per worker thread, a reload starts afresh.
var wrr = {}
var rr = {}

function pickBackend(key, backends) {
  var state = wrr[key] || (wrr[key] = backends.map(() => 0))
  var total = 0
  var best = -1
  for (var i = 0; i < backends.length; i++) {
    var w = backends[i].weight
    if (w > 0) {
      state[i] += w
      total += w
      if (best < 0 || state[i] > state[best]) best = i
    }
  }
  if (best < 0) return null
  state[best] -= total
  return backends[best]
}

function pickTarget(key, targets) {
  var i = rr[key] || 0
  rr[key] = (i + 1) % targets.length
  return targets[i % targets.length]
}

// ---- pipelines -------------------------------------------------------------------

var $port     // the gateway port this connection came in on
var $client   // the client's address
var $head
var $match
var $rule
var $action   // notfound | redirect | invalid | unavailable | denied | unauthenticated | local | tunnel | direct
var $route    // { target, identity, tunnel }: what tls.poolKey / connectPeer need
var $mirror   // the mirror's route, or null
var $start
var $why
var $bounds   // { rule, start, labels } for gateway-timeouts.js; null when nothing is forwarded

function respond(status, text) {
  return new Message({ status, headers: { 'content-type': 'text/plain' } }, text + '\n')
}

function deny(reason, status, text) {
  denials.withLabels($port.gateway, String($port.port), reason).increase()
  return respond(status, text)
}

function routeTo(backend) {
  var t = pickTarget($port.port + '>' + backend.service, backend.targets)
  return { target: t.target, identity: t.identity, tunnel: t.tunnel, local: t.local }
}

function modeOf(route) {
  return route.local ? 'local' : (route.tunnel ? 'tunnel' : 'direct')
}

// What to do with one request; edits the head (filters) when it is forwarded.
function decide(head) {
  $head = head
  $bounds = null
  $match = findMatch($port, head)
  if (!$match) return 'notfound'
  $rule = $port.rules[$match.rule]
  if ($rule.redirect) return 'redirect'
  if ($rule.backends.length === 0) return 'invalid'
  var backend = pickBackend($port.port + '#' + $match.rule, $rule.backends)
  if (!backend || backend.problem) { $why = backend ? backend.problem : 'no backend with a weight'; return 'invalid' }
  if (backend.targets.length === 0) return 'unavailable'

  var headers = head.headers
  var fwd = headers['x-forwarded-for']
  headers['x-forwarded-for'] = fwd ? fwd + ', ' + $client : $client
  headers['x-forwarded-proto'] = $port.scheme
  modifyHeaders(headers, $rule.requestHeaders)
  if ($rule.rewrite) {
    if ($rule.rewrite.hostname) headers.host = $rule.rewrite.hostname
    if ($rule.rewrite.path) {
      var parts = splitTarget(head.path || '/')
      head.path = rewritePath($rule.rewrite.path, parts[0], $match) + parts[1]
    }
  }

  $route = routeTo(backend)
  $bounds = { rule: $rule, start: $start, labels: [$port.gateway, String($port.port), $rule.route] }
  $mirror = $rule.mirrors.length > 0 && !$rule.mirrors[0].problem && $rule.mirrors[0].targets.length > 0 ? routeTo($rule.mirrors[0]) : null
  var mode = modeOf($route)
  if (mode === 'local') {
    if (!requestAllowed(grant($port.identity, $route.identity, portOf($route.target)), head)) return 'denied'
  } else if (mode === 'tunnel' && ($why = tls.refusal($port.identity, $route))) {
    return 'unauthenticated'
  }
  return mode
}

function portOf(target) {
  return +target.substring(target.lastIndexOf(':') + 1)
}

function tunnelRequest(route) {
  return new Message({ method: 'CONNECT', path: route.target, headers: { host: route.target } })
}

// Pools as on the mesh side (main.js): per target, and over a tunnel per
// (source identity, target) inside one mutual TLS connection per peer node.
// A rule with timeouts gets connections with a read timeout past its bound
// (gateway-timeouts.js): they close when a hung request leaves them behind;
// pools are keyed by it, since a connection has one read timeout. Both kinds
// of connection are closed when a timed-out response is still arriving
// (guardUpstream); over a tunnel that ends the tunnel stream, and the far
// node's proxy closes its connection to the pod.
var toLocal = $=>$
  .muxHTTP(() => $route.target + '|' + (timeouts.longest($rule) || ''), { maxIdle: UPSTREAM_MAX_IDLE }).to(
    timeouts.guardUpstream($=>$.connect(() => $route.target, () => timeouts.connectOptions($rule)))
  )

var toTunnel = $=>$
  .muxHTTP(() => $port.identity + '>' + $route.target, { maxIdle: UPSTREAM_MAX_IDLE }).to(
    timeouts.guardUpstream($=>$
      .connectHTTPTunnel(() => tunnelRequest($route)).to($=>$
        .muxHTTP(() => tls.poolKey($port.identity, $route), { version: 2 }).to(
          tls.connectPeer(() => $route.tunnel)
        )
      )
    )
  )

var toBackend = $=>$
  .pipe(() => modeOf($route), { local: toLocal, tunnel: toTunnel, direct: toLocal })

// (A builder applied to a builder: see serve().)
var forward = $ => timeouts.withTimeouts(toBackend, () => $bounds)($
  // A copy of the request to the mirror backend (a cloned context); its
  // response is dropped, and the rule's timeouts do not bound it.
  .fork(() => $mirror ? [1] : []).to($ => toBackend($.onStart(() => { $route = $mirror })))
).handleMessageStart(msg => modifyHeaders(msg.head.headers, $rule.responseHeaders))

var serveHTTP = $=>$
  .demuxHTTP().to($=>$
    // Requests in flight hold a retiring instance's drain (drain.js).
    .onStart(drain.requestStarts)
    .onEnd(drain.requestEnds)
    .handleMessageStart(msg => {
      $start = Date.now()
      $action = decide(msg.head)
    })
    .pipe(() => $action, {
      notfound: $=>$.replaceMessage(() => deny('no-route', 404, 'no route for this request')),
      redirect: $=>$.replaceMessage(() => new Message({ status: $rule.redirect.statusCode, headers: { location: redirectLocation($rule.redirect, $port, $head, $match) } })),
      invalid: $=>$.replaceMessage(() => deny('invalid-backend', 500, 'the route\'s backend is not valid: ' + ($why || 'no backend'))),
      unavailable: $=>$.replaceMessage(() => deny('unavailable', 503, 'no endpoint available')),
      denied: $=>$.replaceMessage(() => deny('access', 403, 'access denied by fsm-node')),
      unauthenticated: $=>$.replaceMessage(() => deny($why, 503, 'no valid identity certificate for this gateway: ' + $why)),
      local: forward,
      tunnel: forward,
      direct: forward,
    })
    .handleMessageStart(msg => {
      requests.withLabels($port.gateway, String($port.port), $rule ? $rule.route : '', Math.floor(msg.head.status / 100) + 'xx').increase()
      drain.answer(msg)
      duration.withLabels($port.gateway, String($port.port)).observe(Date.now() - $start)
    })
  )

// The certificate for an SNI name: the listener hostname naming it exactly,
// then a wildcard covering it, then a listener without hostname.
function certificateFor(port, sni) {
  var name = (sni || '').toLowerCase()
  var list = port.tlsCerts
  var c = list.find(c => c.hostname && c.hostname.charAt(0) !== '*' && c.hostname === name) ||
    list.find(c => c.hostname && c.hostname.charAt(0) === '*' && hostMatches(c.hostname, name)) ||
    list.find(c => !c.hostname)
  return c ? { cert: c.cert, key: c.key } : null
}

function serve(p) {
  // A client's connection holds a retiring instance's drain until it closes
  // (drain.js: an idle keep-alive one for a while, not closed under the client).
  var accepted = $=>$
    .onStart(ib => { $port = p; $client = ib.remoteAddress; drain.clientOpens() })
    .onEnd(drain.clientCloses)
  // (pipe(fn) would treat fn as a selector evaluated per stream: compose the builder instead.)
  if (p.protocol !== 'HTTPS') return $ => serveHTTP(accepted($))
  return $ => accepted($)
    .acceptTLS({
      // Also called before the ClientHello is read and for clients without SNI:
      // then the certificate of a listener without hostname, if there is one.
      certificate: sni => certificateFor(p, sni),
    }).to(serveHTTP)
}

// Called once per program load by main.js.
export function listen() {
  gateways.forEach(g => g.ports.forEach(p => pipy.listen(p.port, serve(p))))
}
