// Multi-cluster (src/multicluster, docs/multicluster.md): clusterset IPs of
// imported services, and the gateway side that takes tunnels from other
// clusters. main.js calls in at three points: deciding the route of a
// connection or request to a clusterset IP (per attempt of resilience.js's
// loop, which retries a failed request on the next tier), hearing how an
// attempt went, and accepting a tunnel from another cluster.
//
// Tiers: an import lists tiers in order (GlobalTrafficPolicy); the first
// with a usable member carries the traffic, members of a tier share it by
// weight (smooth weighted round robin). Usable: the local member while the
// local Service has a healthy endpoint (resilience.js's outlier state: not
// ejected, not failing right now; any endpoint when no tier has a usable
// member); a remote member while it reported ready endpoints and one of its
// gateways is not marked dead.
//
// A gateway is marked dead when a tunnel to it fails (connect refused or
// timed out, the connection read-timed out, or a 5xx that did not come from
// a gateway): traffic moves to the next tier at once. When the mark expires
// a side probe decides whether it comes back (see alive()). No timers: a
// reload would leave them running in the old program.
//
// The tunnel to another cluster's gateway names the service ("name.ns:port"),
// never a pod; the gateway picks a ready endpoint of its local Service.

import config from './config.js'
import { decide } from './route.js'
import * as cs from './clusterset.js'
import { healthy } from './resilience.js'
import * as drain from './drain.js'
import * as generations from './pool-generation.js'

var MC = config.multicluster || null
export var enabled = MC !== null

// How long a failed gateway is left alone before a side probe asks it again
// (probes, not client requests, find out whether it is back: no backoff needed).
var DEAD_MS = 3000

// Response header a gateway puts on its own refusals: a 5xx without it came from the transport.
export var GATEWAY_HEADER = 'fsmn-gateway'

// Per-thread state (a reload starts afresh).
var deadUntil = {}
var wrr = {}
var rr = {}

export function importAt(dstIp, dstPort) {
  return MC ? MC.imports[dstIp + ':' + dstPort] || null : null
}

export function protocolOf(dstIp, dstPort) {
  var imp = importAt(dstIp, dstPort)
  return imp ? imp.protocol : null
}

// A gateway marked dead stays out of traffic until a side probe (GET
// /healthz on its gateway port, started by the first request that finds the
// mark expired) gets an answer: no client request waits on a dead gateway
// to learn that it is still dead.
var probing = {}
var probeQueue = []
var $probeGw
var $probeCluster
var $probeOk
var probe = pipeline($=>$
  .onStart(() => {
    var next = probeQueue.shift()
    $probeGw = next[0]
    $probeCluster = next[1]
    $probeOk = false
    return [new Message({ method: 'GET', path: '/healthz', headers: { host: $probeGw } }), new StreamEnd]
  })
  // Over the same mutual TLS as tunnels, presenting this cluster's gateway identity (clusterset.js).
  .muxHTTP(() => cs.poolKey('probe', '', $probeGw, $probeCluster)).to(
    cs.connectGateway(() => $probeGw, { connectTimeout: 1, readTimeout: 2 })
  )
  .handleMessageStart(msg => { $probeOk = msg.head.status === 200 })
  .handleStreamEnd(() => {
    var gw = $probeGw
    delete probing[gw]
    if ($probeOk) markAlive(gw)
    else markDead(gw)
  })
)

function alive(gw, cluster) {
  var t = deadUntil[gw]
  if (!t) return true
  if (t <= Date.now() && !probing[gw]) {
    probing[gw] = true
    probeQueue.push([gw, cluster])
    probe.spawn()
  }
  return false
}

export function markDead(gw) {
  if (gw) deadUntil[gw] = Date.now() + DEAD_MS
}

function markAlive(gw) {
  if (deadUntil[gw]) delete deadUntil[gw]
}

// strict: only endpoints outlier detection finds healthy count.
function localUsable(addr, strict) {
  var svc = config.services[addr]
  return !!svc && svc.backends.some(b => (strict ? b.endpoints.some(healthy) : b.endpoints.length > 0))
}

function usable(m, tried, strict) {
  if (tried && tried.indexOf(m.cluster) >= 0) return false
  if (m.local !== null) return localUsable(m.local, strict)
  return m.ready > 0 && m.gateways.some(g => alive(g, m.cluster))
}

function pickMember(key, members) {
  if (members.length === 1) return members[0]
  var state = wrr[key] || (wrr[key] = {})
  var total = 0
  var best = null
  members.forEach(m => {
    var cur = (state[m.cluster] || 0) + m.weight
    state[m.cluster] = cur
    total += m.weight
    if (best === null || cur > state[best.cluster]) best = m
  })
  state[best.cluster] -= total
  return best
}

// `avoid`: gateways this request failed on (others of the cluster first).
function pickGateway(key, gateways, cluster, avoid) {
  var all = gateways.filter(g => alive(g, cluster))
  var fresh = avoid ? all.filter(g => avoid.indexOf(g) < 0) : all
  var live = fresh.length > 0 ? fresh : all
  var i = rr[key] || 0
  rr[key] = (i + 1) % live.length
  return live[i % live.length]
}

// The route to a clusterset IP, or null when the address is not one.
// `tried`: clusters that failed this request already (retries skip them);
// `avoid`: endpoints it failed on (for the local member's pick).
export function decideImport(dstIp, dstPort, head, tried, avoid) {
  var dst = dstIp + ':' + dstPort
  var imp = importAt(dstIp, dstPort)
  if (!imp) return null
  // The first tier with a usable member (PipyJS has neither `while` nor
  // `continue`); failing local endpoints count when nothing else is usable.
  var t = -1
  var members = null
  var firstUsable = strict => imp.tiers.forEach((tier, i) => {
    if (members !== null) return
    var live = tier.filter(m => usable(m, tried, strict))
    if (live.length > 0) {
      members = live
      t = i
    }
  })
  firstUsable(true)
  firstUsable(false)
  if (members !== null) {
    var m = pickMember(dst + '#' + t, members)
    if (m.local !== null) {
      var colon = m.local.lastIndexOf(':')
      var r = decide(m.local.substring(0, colon), +m.local.substring(colon + 1), head, avoid)
      return Object.assign({}, r, { service: imp.service, cluster: m.cluster, tier: t })
    }
    var gw = pickGateway(dst + '>' + m.cluster, m.gateways, m.cluster, avoid)
    return { mode: 'gateway', target: imp.target, tunnel: gw, generation: generations.of(gw), identity: null, local: false, service: imp.service, protocol: imp.protocol, cluster: m.cluster, tier: t }
  }
  return { mode: 'unavailable', target: dst, tunnel: null, identity: null, local: false, service: imp.service, protocol: imp.protocol, cluster: null, tier: -1 }
}

// After an attempt of a request routed by decideImport (resilience.js's
// attempt loop calls this; the loop decides whether the request goes again,
// on the next usable member: for safe methods on a 5xx or no answer, as FSM's
// failover retries on 5xx): a gateway that answered is alive, one whose
// tunnel failed (no answer, or a 5xx that did not come from the gateway) is
// marked dead. `status` 0: no answer. `retrying`: the request fails over.
// `kind` 'reset': the connection closed under the request without being
// refused or timing out (a far instance ending its drain after a config
// hand-over closes its pooled tunnels so): not a mark; a gateway that is
// really gone refuses the next connection and is marked then.
export function attemptOutcome(route, status, headers, retrying, kind) {
  if (!route || route.tier === undefined || route.cluster === null) return
  heardFrom(route, headers)
  var fromGateway = route.mode === 'gateway' && status > 0 && (status < 500 || (headers && headers[GATEWAY_HEADER]))
  if (fromGateway) markAlive(route.tunnel)
  else if (route.mode === 'gateway' && (status === 0 || status >= 500) && kind !== 'reset') markDead(route.tunnel)
  if (retrying) failovers.withLabels(route.service, route.cluster).increase()
}

// An answer through a gateway route: when it says the gateway's instance
// drains (drain.js), later requests take new connections (pool-generation.js;
// main.js's pool keys end in the route's generation).
export function heardFrom(route, headers) {
  if (route.mode === 'gateway' && headers && headers[drain.HEADER]) generations.moveOn(route.tunnel, route.generation)
}

// A tunnel from another cluster asks for `target` ("name.ns:port"): the
// route to one of this cluster's endpoints of that service, or a refusal.
// `head`: for HTTP exports, each request inside the tunnel is routed on its
// own (so one pooled tunnel does not pin every request to one endpoint).
export function acceptFromCluster(target, head) {
  var exp = MC ? MC.exports[target] : undefined
  if (!exp) return { status: 404, text: 'no such exported service in cluster ' + (MC ? MC.cluster : '(none)') }
  var colon = exp.local.lastIndexOf(':')
  var r = decide(exp.local.substring(0, colon), +exp.local.substring(colon + 1), head)
  if (r.mode !== 'local' && r.mode !== 'tunnel') return { status: 503, text: 'no ready endpoint in cluster ' + MC.cluster }
  return { route: r }
}

export function exportProtocol(target) {
  var exp = MC ? MC.exports[target] : undefined
  return exp ? exp.protocol : 'tcp'
}

export function gatewayPort() {
  return MC ? MC.gatewayPort : 0
}

export function clusterName() {
  return MC ? MC.cluster : ''
}

// Requests and connections to clusterset IPs by the cluster that took them;
// failovers (a request retried on the next usable member) by the cluster that failed;
// tunnels from other clusters this node's gateway listener answered.
export var routed = new stats.Counter('fsmn_proxy_multicluster_routed_total', ['service', 'cluster'])
export var failovers = new stats.Counter('fsmn_proxy_multicluster_failovers_total', ['service', 'from'])
export var gatewayTunnels = new stats.Counter('fsmn_proxy_multicluster_gateway_tunnels_total', ['service', 'result'])
