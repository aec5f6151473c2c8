// Resilience of the node proxy (issue 18): request timeouts, retries with a
// budget, circuit breaking and limits, local rate limits, outlier detection.
// Settings come from config.resilience (src/proxy/resilience-config.ts: every
// default resolved there). State lives in this module, per Pipy worker thread:
// with one thread (the default) every pod of the node shares what the node has
// learned about an endpoint; with --threads=N each thread learns on its own
// (limits then hold per thread: docs/resilience.md says so).
//
// The outlier API is usable on its own (issue 19 builds failover on it):
//   usable(target)        false while the endpoint "ip:port" is ejected or its node's tunnel is down
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

var endpoints = {} // "ip:port" -> { fails, ejections, until, service }
var peers = {}     // tunnel "ip:port" -> { fails, ejections, until }

function ejectionMs(o, n) {
  return Math.min(o.baseEjectionMs * n, Math.max(o.maxEjectionMs, o.baseEjectionMs))
}

export function peerUsable(tunnel) {
  var p = tunnel && peers[tunnel]
  return !p || p.until <= Date.now()
}

export function usable(target) {
  var e = endpoints[target]
  if (e && e.until > Date.now()) return false
  return peerUsable(tunnelOf(target))
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
  var e = endpoints[target] || (endpoints[target] = { fails: 0, ejections: 0, until: 0 })
  expire(e, target, service)
  if (ok) {
    e.fails = 0
    if (e.until === 0) e.ejections = 0
    var tunnel = tunnelOf(target)
    if (tunnel && peers[tunnel]) { peers[tunnel].fails = 0; peers[tunnel].ejections = 0 }
    return
  }
  if (!o.enabled) return
  if (peerFailure) {
    var t = tunnelOf(target)
    var p = t && (peers[t] || (peers[t] = { fails: 0, ejections: 0, until: 0 }))
    if (p && ++p.fails >= o.consecutiveFailures && p.until <= Date.now()) {
      p.ejections++
      p.fails = 0
      p.until = Date.now() + ejectionMs(o, p.ejections)
      peersDown.withLabels(t).set(1)
      ejections.withLabels(service, 'peer:' + t).increase()
    }
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

// A new request from `srcId` to the original destination `dst`: its state,
// carried across tries. mayRetry: a Retry covers this source and service and
// the method is safe to repeat (only then is the answer buffered to judge it).
export function begin(srcId, head, dst) {
  var svc = config.services[dst]
  var byService = srcId && RETRIES[srcId]
  var mayRetry = Boolean(svc && byService && byService[svc.service] && RETRY_METHODS[head.method])
  return { srcId: srcId || 'unknown', head, mayRetry, n: 0, tried: [], service: null, retry: null, route: null, admitted: false, done: false, retryHeld: false, start: Date.now(), timeoutMs: null, rejected: '' }
}

// The first attempt has picked its service: admit the request (circuit,
// concurrency limits, rate limit) and fix its timeout and retry policy.
// Returns '' or the reason to refuse it.
export function admit(a, service) {
  if (a.admitted || a.rejected) return a.rejected
  a.service = service
  var s = settingsOf(service)
  var path = (a.head.path || '/').split('?')[0]
  var route = routeOf(s, path)
  a.retry = (RETRIES[a.srcId] && RETRIES[a.srcId][service]) || null
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
  if (!a.mayRetry || !r || a.n >= r.numRetries || !RETRY_METHODS[a.head.method]) return false
  var wanted =
    kind === 'reset' ? (r.reset || r.classes.indexOf('5xx') >= 0) :
    kind === 'connect' ? (r.connectFailure || r.classes.indexOf('5xx') >= 0) :
    kind === 'timeout' ? (r.classes.indexOf('5xx') >= 0 || r.classes.indexOf('gateway-error') >= 0 || r.reset) :
    (r.statuses.indexOf(status) >= 0 ||
      (status >= 500 && r.classes.indexOf('5xx') >= 0) ||
      (status >= 502 && status <= 504 && r.classes.indexOf('gateway-error') >= 0) ||
      (status === 409 && r.classes.indexOf('retriable-4xx') >= 0))
  if (!wanted) return false
  var s = settingsOf(a.service)
  var others = (retrying[a.service] || 0) - (a.retryHeld ? 1 : 0)
  if (s.maxRetries !== null && others >= s.maxRetries) {
    retries.withLabels(a.srcId, a.service, 'overflow').increase()
    return false
  }
  // The budget (as Envoy's): retries in flight stay a fraction of the requests
  // in flight, with a floor, so an outage under load is not multiplied.
  if (others >= Math.max(BUDGET.minRetryConcurrency, (inflight[a.service] || 0) * BUDGET.percent / 100)) {
    retries.withLabels(a.srcId, a.service, 'budget-exhausted').increase()
    return false
  }
  return true
}

// After an attempt against `route` (the decided endpoint): judge an answer.
// Returns the message to pass on, or a StreamEnd('Replay') to try again.
// Pipy's HTTP decoder turns an upstream that failed before answering into
// a 502/504 without headers (statusText names the cause): those are ours to
// classify as timeout, connect failure or reset.
export function judgeAnswer(a, route, msg) {
  var status = msg.head.status
  var synthesized = status >= 500 && Object.keys(msg.head.headers || {}).length === 0
  if (!synthesized) return settle(a, route, status < 500, 'status', status) || msg
  var text = String(msg.head.statusText || '')
  var kind = status === 504 ? 'timeout' : (new RegExp('refused|resolve', 'i')).test(text) ? 'connect' : 'reset'
  if (kind === 'timeout') timeouts.withLabels(a.srcId, a.service || 'none').increase()
  return settle(a, route, false, kind, status) || msg
}

// An attempt that ended without an answer: timeout, reset, refused.
export function judgeEnd(a, route, evt) {
  var err = evt.error || ''
  var kind = err === 'ReadTimeout' ? 'timeout' : (err === 'ConnectionRefused' || err === 'ConnectionTimeout' || err === 'CannotResolve' || err === 'Unauthorized') ? 'connect' : 'reset'
  if (kind === 'timeout') timeouts.withLabels(a.srcId, a.service || 'none').increase()
  var replay = settle(a, route, false, kind, 0)
  if (replay) return replay
  var status = kind === 'timeout' ? 504 : kind === 'connect' ? 503 : 502
  var text = kind === 'timeout' ? 'upstream request timeout (fsm-node)' : 'upstream ' + (err || 'connection closed') + ' (fsm-node)'
  return [new Message({ status, headers: { 'content-type': 'text/plain' } }, text + '\n'), new StreamEnd]
}

function releaseRetry(a) {
  if (!a.retryHeld) return
  a.retryHeld = false
  retrying[a.service] = Math.max(0, (retrying[a.service] || 1) - 1)
}

function settle(a, route, ok, kind, status) {
  // Only answers of an endpoint say something about it (not a refusal of ours).
  if (!route || !route.pool || (route.mode !== 'local' && route.mode !== 'direct' && route.mode !== 'tunnel')) return null
  record(route.backend, route.pool, route.target, ok, !ok && kind === 'connect' && route.mode === 'tunnel')
  var s = settingsOf(a.service)
  if (s.circuitBreaking) observe(a.service, s.circuitBreaking, !ok, Date.now() - a.start)
  if (ok || !mayRetry(a, kind, status)) {
    if (a.n > 0) retries.withLabels(a.srcId, a.service, ok ? 'recovered' : 'exhausted').increase()
    releaseRetry(a)
    return null
  }
  if (!a.retryHeld) {
    a.retryHeld = true
    retrying[a.service] = (retrying[a.service] || 0) + 1
  }
  a.n++
  a.tried.push(route.target)
  retries.withLabels(a.srcId, a.service, 'attempted').increase()
  return new StreamEnd('Replay')
}

// repeat()'s condition at the end of a try: play the request again (after an
// exponential backoff) when the try ended with StreamEnd('Replay').
export function again(a, evt) {
  if (evt.error !== 'Replay' || a.done) return false
  var base = a.retry ? a.retry.backoffBaseMs : 25
  var ms = Math.min(base * Math.pow(2, Math.max(0, a.n - 1)), 10 * base)
  return ms > 0 ? new Timeout(ms / 1000).wait().then(() => true) : true
}

// ---- the far side of a tunnel -------------------------------------------------

// The near node proxy tells the far one the attempt's timeout (only tunnels
// from node proxies reach the inbound listener); the pod never sees the header.
export var TIMEOUT_HEADER = 'fsmn-timeout-ms'

export function fromPeer(head) {
  var t = +(head.headers[TIMEOUT_HEADER] || 0)
  delete head.headers[TIMEOUT_HEADER]
  return { service: null, timeoutMs: t > 0 && t <= 3600000 ? Math.floor(t) : null }
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
