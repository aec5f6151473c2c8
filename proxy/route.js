// Where an outbound connection (or HTTP request) goes: a service address
// picks a backend by TrafficSplit weight (smooth weighted round robin, exact
// ratios) and an endpoint of that backend (round robin); an HTTP request that
// matches a split with HTTP matches (a route) goes by that split's weights
// instead, and a TCP connection (no request to match) never does; a pod address goes
// to that pod; anything else is egress. Then: a pod of this node is served
// here, a pod of another node through that node's proxy.
// A pod address is any service endpoint or, failing that, any mesh pod
// (config.meshPods): a pod the node's pods may not reach is in no service of
// its policy, and dialing its address directly must still meet access control.

import config from './config.js'
import { matchesRequest } from './access.js'
import { candidates } from './resilience.js'

// Per-thread balancing state; a reload starts it afresh (config may differ).
var wrr = {}
var rr = {}

function pickBackend(key, backends) {
  var live = backends.filter(b => b.endpoints.length > 0)
  if (live.length === 0) return null
  if (live.length === 1) return live[0]
  var state = wrr[key] || (wrr[key] = {})
  var total = 0
  var best = null
  live.forEach(b => {
    var cur = (state[b.service] || 0) + b.weight
    state[b.service] = cur
    total += b.weight
    if (best === null || cur > state[best.service]) best = b
  })
  state[best.service] -= total
  return best
}

function pickEndpoint(key, endpoints) {
  var i = rr[key] || 0
  rr[key] = (i + 1) % endpoints.length
  return endpoints[i % endpoints.length]
}

function podAt(ip) {
  return config.endpoints[ip] || config.meshPods[ip]
}

function toEndpoint(target, service, protocol) {
  var ip = target.substring(0, target.lastIndexOf(':'))
  var ep = podAt(ip)
  if (!ep) return { mode: 'direct', target, tunnel: null, identity: null, local: false, service, protocol }
  if (ep.local) return { mode: 'local', target, tunnel: null, identity: ep.identity, local: true, service, protocol }
  if (ep.tunnel) return { mode: 'tunnel', target, tunnel: ep.tunnel, identity: ep.identity, local: false, service, protocol }
  // A mesh pod whose node proxy is unknown: straight to the pod.
  return { mode: 'direct', target, tunnel: null, identity: ep.identity, local: false, service, protocol }
}

// The protocol of an original destination, before any endpoint is picked.
export function protocolOf(dstIp, dstPort) {
  var dst = dstIp + ':' + dstPort
  var svc = config.services[dst]
  if (svc) return svc.protocol
  var ep = config.endpoints[dstIp]
  // A mesh pod outside every service has no described port: TCP.
  return (ep && ep.ports[dstPort]) || 'tcp'
}

// The first split route whose matches match the request head.
function routeOf(routes, head) {
  for (var i = 0; i < routes.length; i++) if (matchesRequest(routes[i].matches, head)) return routes[i]
  return null
}

// `head`: the HTTP request head, or nothing for a TCP connection. `avoid`:
// endpoints a retry must not take again when another exists. Ejected
// endpoints (resilience.js, outlier detection) are skipped while others are
// usable; the decision names the pool it picked from (`pool`, `backend`), so
// the outcome can be recorded against it.
export function decide(dstIp, dstPort, head, avoid) {
  var dst = dstIp + ':' + dstPort
  var svc = config.services[dst]
  if (svc) {
    var route = head && svc.routes ? routeOf(svc.routes, head) : null
    // Each route balances on its own: its weights, its own smooth round robin.
    var backend = route ? pickBackend(dst + '#' + route.split, route.backends) : pickBackend(dst, svc.backends)
    if (!backend) return { mode: 'unavailable', target: dst, tunnel: null, identity: null, local: false, service: svc.service, protocol: svc.protocol }
    var ep = toEndpoint(pickEndpoint(dst + '>' + backend.service, candidates(backend.endpoints, avoid)), svc.service, svc.protocol)
    ep.pool = backend.endpoints
    ep.backend = backend.service
    return ep
  }
  if (podAt(dstIp)) return toEndpoint(dst, null, protocolOf(dstIp, dstPort))
  if (config.egress === 'allow') return { mode: 'egress', target: dst, tunnel: null, identity: null, local: false, service: null, protocol: 'tcp' }
  return { mode: 'refused', target: dst, tunnel: null, identity: null, local: false, service: null, protocol: 'tcp' }
}
