// Resilience of the node proxy (issue 18): request timeouts, retries with a
// budget, circuit breaking and limits, local rate limits, outlier detection.
// Settings come from config.resilience (src/proxy/resilience-config.ts: every
// default resolved there). State lives in this module, per Pipy worker thread:
// with one thread (the default) every pod of the node shares what the node has
// learned about an endpoint; with --threads=N each thread learns on its own
// (limits then hold per thread: docs/resilience.md says so).
//
// The outlier API (route.js picks by it, multicluster.js judges the local tier by it):
//   usable(target)        false while the endpoint "ip:port" is ejected or its node's tunnel is down
//   healthy(target)       usable, and not failing right now (see there)
//   peerUsable(tunnel)    false while the tunnel to that node proxy is considered down

import config from './config.js'

var R = config.resilience || null
var OFF = { enabled: false, consecutiveFailures: 1, baseEjectionMs: 0, maxEjectionMs: 0, maxEjectionPercent: 0 }
var DEFAULTS = R ? R.defaults : {
  timeoutMs: null, connectTimeoutMs: null, routes: [], maxConnections: null, maxRequests: null,
  maxPendingRequests: null, maxRequestsPerConnection: null, maxRetries: null,
  rateLimit: { tcp: null, http: null }, circuitBreaking: null, outlier: OFF,
}
var SERVICES = R ? R.services : {}
var RETRIES = R ? R.retries : {}
var BUDGET = R ? R.budget : { percent: 20, minRetryConcurrency: 3 }
var RETRY_METHODS = {}
;(R ? R.retryMethods : ['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE']).forEach(m => { RETRY_METHODS[m] = true })

Object.values(SERVICES).forEach(s => s.routes.forEach(r => { r.path = new RegExp('^(?:' + r.pathRegex + ')$') }))

// ---- metrics (per source identity and destination service) -----------------

export var retries = new stats.Counter('fsmn_proxy_retries_total', ['source', 'service', 'result'])
export var timeouts = new stats.Counter('fsmn_proxy_timeouts_total', ['source', 'service'])
export var ejections = new stats.Counter('fsmn_proxy_ejections_total', ['service', 'endpoint'])
export var ejected = new stats.Gauge('fsmn_proxy_ejected_endpoints', ['service', 'endpoint'])
export var peersDown = new stats.Gauge('fsmn_proxy_peer_down', ['peer'])
export var circuitOpen = new stats.Gauge('fsmn_proxy_circuit_open', ['service'])
export var rejected = new stats.Counter('fsmn_proxy_resilience_rejected_total', ['source', 'service', 'reason'])
// A reload starts the state afresh: so do the gauges that show it.
ejected.clear()
peersDown.clear()
circuitOpen.clear()

export function settingsOf(service) {
  return (service && SERVICES[service]) || DEFAULTS
}

function tunnelOf(target) {
  var ep = config.endpoints[target.substring(0, target.lastIndexOf(':'))]
  return ep ? ep.tunnel : null
}

// ---- outlier detection -------------------------------------------------------

var endpoints = {} // "ip:port" -> { fails, ejections, until, service, lastFail }
var peers = {}     // tunnel "ip:port" -> { fails, ejections, until }

function ejectionMs(o, n) {
  return Math.min(o.baseEjectionMs * n, Math.max(o.maxEjectionMs, o.baseEjectionMs))
}

export function peerUsable(tunnel) {
  var p = tunnel && peers[tunnel]
  if (!p || p.until === 0) return true
  if (p.until > Date.now()) return false
  p.until = 0
  peersDown.withLabels(tunnel).set(0)
  return true
}

function peerDown(p, t, o, service) {
  p.ejections++
  p.fails = 0
  p.until = Date.now() + ejectionMs(o, p.ejections)
  peersDown.withLabels(t).set(1)
  ejections.withLabels(service, 'peer:' + t).increase()
}


export function usable(target) {
  var e = endpoints[target]
  if (e && e.until > Date.now()) return false
  return peerUsable(tunnelOf(target))
}

// For a caller that has somewhere else to go (a clusterset IP's next tier):
// usable, and not at its consecutive-failure threshold within the last base
// ejection time, even where maxEjectionPercent kept it in its pool (the only
// endpoint of a service is never ejected). After that time real traffic
// probes it again; one success clears it.
export function healthy(target) {
  if (!usable(target)) return false
  var e = endpoints[target]
  if (!e || e.fails === 0) return true
  var o = settingsOf(e.service).outlier
  return !o.enabled || e.fails < o.consecutiveFailures || Date.now() - e.lastFail >= o.baseEjectionMs
}

// The endpoints a request may go to: the usable ones not tried yet; when
// none is usable, the untried ones (better a try than a refusal: an ejection
// is a guess), and when all were tried, all of them.
export function candidates(pool, avoid) {
  var fresh = avoid && avoid.length > 0 ? pool.filter(t => avoid.indexOf(t) < 0) : pool
  var live = fresh.filter(usable)
  if (live.length > 0) return live
  return fresh.length > 0 ? fresh : pool
}

function expire(e, key, service) {
  if (e.until > 0 && e.until <= Date.now()) {
    e.until = 0
    ejected.withLabels(service, key).set(0)
  }
}

// One upstream outcome of `target` (an endpoint of `service`, one of `pool`).
// ok: an answer below 500. A failure of the tunnel itself (connect refused or
// timed out towards the node proxy) counts against the peer: all its
// endpoints at once.
export function record(service, pool, target, ok, peerFailure) {
  var o = settingsOf(service).outlier
  var e = endpoints[target] || (endpoints[target] = { fails: 0, ejections: 0, until: 0, service, lastFail: 0 })
  expire(e, target, service)
  if (ok) {
    e.fails = 0
    if (e.until === 0) e.ejections = 0
    var tunnel = tunnelOf(target)
    if (tunnel && peers[tunnel]) { peers[tunnel].fails = 0; peers[tunnel].ejections = 0 }
    return
  }
  if (!o.enabled) return
  e.lastFail = Date.now()
  if (peerFailure) {
    var t = tunnelOf(target)
    var p = t && (peers[t] || (peers[t] = { fails: 0, ejections: 0, until: 0 }))
    if (p && ++p.fails >= o.consecutiveFailures && p.until <= Date.now()) peerDown(p, t, o, service)
  }
  if (++e.fails < o.consecutiveFailures || e.until > 0) return
  // Never more than the maximum share of the pool ejected at once.
  var now = Date.now()
  var out = pool.filter(x => x !== target && endpoints[x] && endpoints[x].until > now).length
  if (out + 1 > Math.floor(pool.length * o.maxEjectionPercent / 100)) return
  e.ejections++
  e.fails = 0
  e.until = now + ejectionMs(o, e.ejections)
  ejected.withLabels(service, target).set(1)
  ejections.withLabels(service, target).increase()
}

// ---- token buckets (local rate limits) -------------------------------------

var buckets = {}

function take(key, limit) {
  if (!limit) return true
  var now = Date.now()
  var b = buckets[key] || (buckets[key] = { tokens: limit.bucket, at: now })
  b.tokens = Math.min(limit.bucket, b.tokens + (now - b.at) * limit.perSecond / 1000)
  b.at = now
  if (b.tokens < 1) return false
  b.tokens -= 1
  return true
}

// ---- circuit breaking (FSM's error / slow thresholds) ------------------------

var circuits = {} // service -> { windowStart, total, errors, slow, openUntil }

function circuitOf(service, cb) {
  var c = circuits[service] || (circuits[service] = { windowStart: Date.now(), total: 0, errors: 0, slow: 0, openUntil: 0 })
  if (Date.now() - c.windowStart >= cb.statTimeWindowMs) {
    c.windowStart = Date.now()
    c.total = c.errors = c.slow = 0
  }
  return c
}

function isOpen(service, cb) {
  var c = circuits[service]
  if (!c || c.openUntil === 0) return false
  if (c.openUntil > Date.now()) return true
  c.openUntil = 0
  circuitOpen.withLabels(service).set(0)
  return false
}

function observe(service, cb, failed, ms) {
  var c = circuitOf(service, cb)
  c.total++
  if (failed) c.errors++
  if (cb.slowTimeThresholdMs !== null && ms >= cb.slowTimeThresholdMs) c.slow++
  if (c.openUntil > 0 || c.total < cb.minRequestAmount) return
  var trip =
    (cb.errorAmountThreshold !== null && c.errors >= cb.errorAmountThreshold) ||
    (cb.errorRatioThreshold !== null && c.errors / c.total >= cb.errorRatioThreshold) ||
    (cb.slowAmountThreshold !== null && c.slow >= cb.slowAmountThreshold) ||
    (cb.slowRatioThreshold !== null && c.slow / c.total >= cb.slowRatioThreshold)
  if (trip) {
    c.openUntil = Date.now() + cb.degradedTimeWindowMs
    circuitOpen.withLabels(service).set(1)
  }
}

// ---- per request -------------------------------------------------------------

var inflight = {}    // service -> requests in flight (HTTP) or connections (TCP)
var retrying = {}    // service -> requests in flight that are being retried

function routeOf(settings, path) {
  for (var i = 0; i < settings.routes.length; i++) if (settings.routes[i].path.test(path)) return settings.routes[i]
  return null
}

// The failover of a clusterset IP (multicluster.js tiers) when no Retry
// covers it: safe methods (RFC 9110 9.2.1), on a 5xx or no answer, at once to
// the next usable tier, at most 3 tries.
var FAILOVER = { policy: 'failover', statuses: [], classes: ['5xx'], reset: true, connectFailure: true, numRetries: 2, perTryTimeoutMs: null, backoffBaseMs: 0 }
var SAFE_METHODS = { GET: true, HEAD: true, OPTIONS: true, TRACE: true }

// A new request from `srcId` to the destination `service` (ns/name; null: no
// service), `imported`: to a clusterset IP. Its state, carried across
// attempts. mayRetry: a retry policy covers it and its method is safe to
// repeat (only then does it run in repeat(), which holds the request).
export function begin(srcId, head, service, imported) {
  var byService = srcId && RETRIES[srcId]
  var retry = (service && byService && byService[service]) || null
  var methods = RETRY_METHODS
  if (!retry && imported) {
    retry = FAILOVER
    methods = SAFE_METHODS
  }
  return {
    srcId: srcId || 'unknown', head, name: service || 'none', imported, retry, mayRetry: Boolean(retry && methods[head.method]),
    n: 0, tried: [], clusters: [], phase: 'wait', service: null, route: null, admitted: false, done: false, retryHeld: false,
    start: Date.now(), timeoutMs: null, rejected: '',
  }
}

// Whether a route reaches an endpoint of a service (what admission and outlier detection are about).
export function toEndpoint(route) {
  return Boolean(route.pool) && (route.mode === 'local' || route.mode === 'direct' || route.mode === 'tunnel')
}

// The first attempt that reaches an endpoint admits the request (circuit,
// concurrency limits, rate limit) and fixes its timeout. Returns '' or the
// reason to refuse it.
export function admit(a, service) {
  if (a.admitted || a.rejected) return a.rejected
  a.service = service
  var s = settingsOf(service)
  var path = (a.head.path || '/').split('?')[0]
  var route = routeOf(s, path)
  a.timeoutMs = a.retry && a.retry.perTryTimeoutMs ? a.retry.perTryTimeoutMs : (route && route.timeoutMs !== null ? route.timeoutMs : s.timeoutMs)
  var why = ''
  if (s.circuitBreaking && isOpen(service, s.circuitBreaking)) why = 'circuit-open'
  else if (s.maxRequests !== null && (inflight[service] || 0) >= s.maxRequests + (s.maxPendingRequests || 0)) why = 'max-requests'
  else if (!take(service + '#http', s.rateLimit.http)) why = 'rate-limited'
  else if (route && route.rateLimit && !take(service + '#' + route.pathRegex, route.rateLimit)) why = 'rate-limited'
  if (why) {
    a.rejected = why
    rejected.withLabels(a.srcId, service, why).increase()
    if (why === 'circuit-open' || why === 'max-requests') circuitOpen.withLabels(service).set(1)
    return why
  }
  a.admitted = true
  a.route = route
  inflight[service] = (inflight[service] || 0) + 1
  return ''
}

// The answer to a refused request.
export function refusal(a) {
  var s = settingsOf(a.service)
  if (a.rejected === 'rate-limited') {
    var rl = (a.route && a.route.rateLimit) || s.rateLimit.http || { status: 429, headers: {} }
    return new Message({ status: rl.status, headers: Object.assign({ 'content-type': 'text/plain' }, rl.headers) }, 'rate limited by fsm-node\n')
  }
  if (a.rejected === 'circuit-open' && s.circuitBreaking) {
    return new Message({ status: s.circuitBreaking.degradedStatusCode, headers: { 'content-type': 'text/plain', 'x-fsmn-circuit': 'open' } }, s.circuitBreaking.degradedResponseContent)
  }
  return new Message({ status: 503, headers: { 'content-type': 'text/plain', 'x-fsmn-circuit': 'open' } }, 'too many requests in flight to ' + a.service + ' (circuit breaker)\n')
}

// The request is over (answered, refused or broken): release what admit took.
export function end(a) {
  if (!a || a.done) return
  a.done = true
  releaseRetry(a)
  if (!a.admitted) return
  inflight[a.service] = Math.max(0, (inflight[a.service] || 1) - 1)
  var s = settingsOf(a.service)
  if (s.maxRequests !== null && !(s.circuitBreaking && isOpen(a.service, s.circuitBreaking)) && inflight[a.service] < s.maxRequests) circuitOpen.withLabels(a.service).set(0)
}

function mayRetry(a, kind, status) {
  var r = a.retry
  if (!a.mayRetry || !r || a.n >= r.numRetries) return false
  var wanted =
    kind === 'reset' ? (r.reset || r.classes.indexOf('5xx') >= 0) :
    kind === 'connect' ? (r.connectFailure || r.classes.indexOf('5xx') >= 0) :
    kind === 'timeout' ? (r.classes.indexOf('5xx') >= 0 || r.classes.indexOf('gateway-error') >= 0 || r.reset) :
    (r.statuses.indexOf(status) >= 0 ||
      (status >= 500 && r.classes.indexOf('5xx') >= 0) ||
      (status >= 502 && status <= 504 && r.classes.indexOf('gateway-error') >= 0) ||
      (status === 409 && r.classes.indexOf('retriable-4xx') >= 0))
  if (!wanted) return false
  // A clusterset IP's retry goes to another cluster (the failed one is
  // skipped, a failed gateway marked dead for every later request): bounded by
  // the tiers, not by the budget of one service's endpoints.
  if (a.imported) return true
  var s = settingsOf(a.service)
  var others = (retrying[a.service] || 0) - (a.retryHeld ? 1 : 0)
  if (s.maxRetries !== null && others >= s.maxRetries) {
    retries.withLabels(a.srcId, a.name, 'overflow').increase()
    return false
  }
  // The budget (as Envoy's): retries in flight stay a fraction of the requests
  // in flight, with a floor, so an outage under load is not multiplied.
  if (others >= Math.max(BUDGET.minRetryConcurrency, (inflight[a.service] || 0) * BUDGET.percent / 100)) {
    retries.withLabels(a.srcId, a.name, 'budget-exhausted').increase()
    return false
  }
  return true
}

// ---- judging an attempt ------------------------------------------------------
//
// An attempt's phase: 'wait' (no answer yet), 'pass' (its answer goes to the
// client), 'skip' (its answer is a failure to try again: dropped as it
// arrives), 'done' (ended with StreamEnd('Replay'): what it still sends is
// dropped until the next attempt starts). The Replay is sent at the end of
// the failed answer, never in the middle of it, and repeat() starts the next
// attempt only from a timer (again()), so no event of an old attempt can reach
// the client or be taken for the end of the new one.

export function attemptStarts(a) {
  a.phase = 'wait'
}

var observer = null
// `fn(route, status, headers, retrying)` hears every attempt that reached an
// upstream or a gateway (multicluster.js marks gateways dead or alive by it).
export function observeAttempts(fn) {
  observer = fn
}

// An answer of an attempt against `route`. Pipy's HTTP decoder turns an
// upstream that failed before answering into a 502/504 without headers
// (statusText names the cause): those are ours to classify as timeout,
// connect failure or reset.
export function judgeAnswer(a, route, msg) {
  if (a.phase !== 'wait') return a.phase === 'pass' ? msg : []
  var status = msg.head.status
  var headers = msg.head.headers || {}
  var synthesized = status >= 500 && Object.keys(headers).length === 0
  var kind = 'status'
  if (synthesized) {
    var text = String(msg.head.statusText || '')
    kind = status === 504 ? 'timeout' : (new RegExp('refused|resolve', 'i')).test(text) ? 'connect' : 'reset'
    if (kind === 'timeout') timeouts.withLabels(a.srcId, a.name).increase()
  }
  if (settle(a, route, !synthesized && status < 500, kind, status, headers)) {
    a.phase = 'skip'
    return []
  }
  a.phase = 'pass'
  return msg
}

export function passData(a, d) {
  return a.phase === 'skip' || a.phase === 'done' ? [] : d
}

export function judgeMessageEnd(a, e) {
  if (a.phase === 'skip') {
    a.phase = 'done'
    return new StreamEnd('Replay')
  }
  return a.phase === 'done' ? [] : e
}

// The attempt's stream ended: after its answer, passed on; without one
// (timeout, reset, refused), judged: tried again, or answered 502/503/504.
export function judgeEnd(a, route, evt) {
  // Our own Replay (judgeMessageEnd) on its way to repeat().
  if (evt.error === 'Replay') return evt
  if (a.phase === 'done') return []
  if (a.phase === 'skip') {
    a.phase = 'done'
    return new StreamEnd('Replay')
  }
  if (a.phase === 'pass') return evt
  var err = evt.error || ''
  var kind = err === 'ReadTimeout' ? 'timeout' : (err === 'ConnectionRefused' || err === 'ConnectionTimeout' || err === 'CannotResolve' || err === 'Unauthorized') ? 'connect' : 'reset'
  if (kind === 'timeout') timeouts.withLabels(a.srcId, a.name).increase()
  if (settle(a, route, false, kind, 0, null)) {
    a.phase = 'done'
    return new StreamEnd('Replay')
  }
  a.phase = 'pass'
  var status = kind === 'timeout' ? 504 : kind === 'connect' ? 503 : 502
  var text = kind === 'timeout' ? 'upstream request timeout (fsm-node)' : 'upstream ' + (err || 'connection closed') + ' (fsm-node)'
  return [new Message({ status, headers: { 'content-type': 'text/plain' } }, text + '\n'), new StreamEnd]
}

function releaseRetry(a) {
  if (!a.retryHeld) return
  a.retryHeld = false
  retrying[a.service] = Math.max(0, (retrying[a.service] || 1) - 1)
}

// Records an attempt's outcome; true when the request goes again (the next
// attempt avoids the endpoint, or for a clusterset IP the cluster, it took).
function settle(a, route, ok, kind, status, headers) {
  // Only answers of an endpoint or a gateway say something (not a refusal of ours).
  var endpoint = route && toEndpoint(route)
  if (!endpoint && !(route && route.mode === 'gateway')) return false
  if (endpoint) {
    record(route.backend, route.pool, route.target, ok, !ok && kind === 'connect' && route.mode === 'tunnel')
    var s = settingsOf(a.service)
    if (s.circuitBreaking) observe(a.service, s.circuitBreaking, !ok, Date.now() - a.start)
  }
  var retry = !ok && mayRetry(a, kind, status)
  if (observer) observer(route, status, headers, retry, kind)
  if (!retry) {
    if (a.n > 0) retries.withLabels(a.srcId, a.name, ok ? 'recovered' : 'exhausted').increase()
    releaseRetry(a)
    return false
  }
  if (!a.retryHeld && !a.imported) {
    a.retryHeld = true
    retrying[a.service] = (retrying[a.service] || 0) + 1
  }
  a.n++
  // A gateway connection that closed under the request (no answer, neither
  // refused nor timed out: typically a pooled connection whose far instance
  // just finished its drain after a config hand-over) says nothing about the
  // cluster: the next attempt goes to the same cluster through another of
  // its gateways, once per request; anything else moves to the next tier.
  if (route.mode === 'gateway' && kind === 'reset' && !a.gatewayReset) {
    a.gatewayReset = true
    a.tried.push(route.tunnel)
  } else if (route.tier !== undefined && route.cluster) a.clusters.push(route.cluster)
  else a.tried.push(route.target)
  retries.withLabels(a.srcId, a.name, 'attempted').increase()
  return true
}

// repeat()'s condition at the end of an attempt: play the request again
// (after an exponential backoff) when it ended with StreamEnd('Replay').
// Always from a timer, even without backoff (see "judging an attempt").
export function again(a, evt) {
  if (evt.error !== 'Replay' || a.done) return false
  var base = a.retry ? a.retry.backoffBaseMs : 25
  var ms = base > 0 ? Math.min(base * Math.pow(2, Math.max(0, a.n - 1)), 10 * base) : 0
  return new Timeout(ms / 1000).wait().then(() => true)
}

// The attempt goes to `route`. The near node proxy tells the far one the
// attempt's timeout and the service's maxRequestsPerConnection (only tunnels
// from node proxies reach the inbound listener); the pod never sees these
// headers, and a pod's own are dropped.
export function dispatch(a, route, head) {
  a.via = route
  delete head.headers[TIMEOUT_HEADER]
  delete head.headers[MAX_REQUESTS_HEADER]
  if (route.mode !== 'tunnel') return
  if (a.timeoutMs) head.headers[TIMEOUT_HEADER] = String(a.timeoutMs)
  var n = settingsOf(a.service).maxRequestsPerConnection
  if (n) head.headers[MAX_REQUESTS_HEADER] = String(n)
}

// ---- the far side of a tunnel -------------------------------------------------

// The near node proxy tells the far one the attempt's timeout (tellPeer).
export var TIMEOUT_HEADER = 'fsmn-timeout-ms'
export var MAX_REQUESTS_HEADER = 'fsmn-max-requests-per-connection'

export function fromPeer(head) {
  var t = +(head.headers[TIMEOUT_HEADER] || 0)
  var n = +(head.headers[MAX_REQUESTS_HEADER] || 0)
  delete head.headers[TIMEOUT_HEADER]
  delete head.headers[MAX_REQUESTS_HEADER]
  return { service: null, timeoutMs: t > 0 && t <= 3600000 ? Math.floor(t) : null, maxRequestsPerConnection: n >= 1 && n <= 1000000 ? Math.floor(n) : null }
}

// A hop to a local pod for a peer that ended without an answer: an answer
// the near side can judge (504 on timeout, 502 otherwise).
export function peerHopEnd(evt) {
  if (!evt.error) return evt
  var timeout = evt.error === 'ReadTimeout'
  return [new Message({ status: timeout ? 504 : 502, headers: { 'content-type': 'text/plain' } }, (timeout ? 'upstream request timeout' : 'upstream ' + evt.error) + ' (fsm-node)\n'), new StreamEnd]
}

// ---- TCP connections -----------------------------------------------------------

// Returns '' or why the connection is refused; release with endConnection.
export function admitConnection(srcId, service) {
  if (!service) return ''
  var s = settingsOf(service)
  var why = ''
  if (s.maxConnections !== null && (inflight[service + '#tcp'] || 0) >= s.maxConnections) why = 'max-connections'
  else if (!take(service + '#tcp', s.rateLimit.tcp)) why = 'rate-limited'
  if (why) {
    rejected.withLabels(srcId || 'unknown', service, why).increase()
    return why
  }
  inflight[service + '#tcp'] = (inflight[service + '#tcp'] || 0) + 1
  return ''
}

export function endConnection(service) {
  if (service) inflight[service + '#tcp'] = Math.max(0, (inflight[service + '#tcp'] || 1) - 1)
}

// The request timeout on this side, whatever the upstream does (a hung pod, a
// cut link under a live tunnel connection): the try races a timer branch
// (forkRace: the first branch to output wins, the other's output is dropped).
// The timer branch's starting event, after the timeout, is a 504 without
// headers (judged as a timeout); it drops the request it is also fed.
var $branch = 0
export function withTimeout(forward, current) {
  return $=>$.pipe(() => current() && current().timeoutMs ? 'race' : 'plain', {
    plain: forward,
    race: $=>$.forkRace([0, 1]).to($=>$
      .onStart((_, i) => {
        $branch = i
        if (i !== 1) return undefined
        var ms = current().timeoutMs
        return new Timeout(ms / 1000).wait().then(() => new Message({ status: 504, statusText: 'Gateway Timeout', headers: {} }, 'upstream request timeout (fsm-node)\n'))
      })
      .pipe(() => $branch === 1 ? 'timer' : 'forward', {
        forward,
        timer: $=>$.replaceMessage(msg => msg.head.status ? msg : []).replaceStreamEnd(() => []),
      })
    ),
  })
}

// The options of an upstream HTTP pool (muxHTTP): connections idle for
// maxIdle seconds close; a service's maxRequestsPerConnection closes a
// connection after that many requests. On the far side of a tunnel the near
// proxy's header says it (fromPeer). Pools are keyed by it (poolKey), as by
// the read timeout. Pipy 1.5's maxMessages lets a new connection carry one
// more message than it says (MuxSessionPool::alloc counts from the second
// request on), and 0 means no limit: N becomes maxMessages N - 1, and 1
// becomes a pool of its own per request (poolKey) whose connection closes
// when idle, within about a second (Pipy recycles pools once a second).
var perRequest = 0

function maxRequestsOf(a) {
  return a ? (a.service ? settingsOf(a.service).maxRequestsPerConnection : a.maxRequestsPerConnection) : null
}

export function poolOptions(a, maxIdle) {
  var n = maxRequestsOf(a)
  if (n === 1) return { maxIdle: 0.01 }
  return n ? { maxIdle, maxMessages: n - 1 } : { maxIdle }
}

export function poolKey(a, target) {
  if (!a) return target
  var n = maxRequestsOf(a)
  return target + '|' + (a.timeoutMs || '') + '|' + (n === 1 ? '1#' + (perRequest++) : (n || ''))
}

// The upstream connect options of a try: the service's connect timeout, and
// a read timeout POOL_SLACK_MS past the request timeout. Pipy's read clock
// counts idle time and ticks once a second, so it cannot be the request
// timeout itself (withTimeout is); past the pool's 4 s idle time it only
// closes connections a hung request left behind.
var POOL_SLACK_MS = 5000
export function connectOptions(service, timeoutMs) {
  var s = settingsOf(service)
  var o = {}
  if (s.connectTimeoutMs) o.connectTimeout = s.connectTimeoutMs / 1000
  if (timeoutMs) o.readTimeout = (timeoutMs + POOL_SLACK_MS) / 1000
  return o
}
