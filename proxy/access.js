// Access control (SMI TrafficTarget semantics) for a destination pod of this
// node: which source identities may reach it, on which ports, and, on HTTP
// ports, with which requests.

import config from './config.js'

var ALLOW_ALL = { tcp: true, http: [], mqtt: [] }
var DENY = { tcp: false, http: [], mqtt: [] }
var cache = new algo.Cache({ size: 10000 })

// What (source identity, destination identity, port) is allowed:
// { tcp: true } every byte; { tcp: false, http: [...] } only matching requests;
// { tcp: false, http: [] } nothing. mqtt: the MQTTRouteGroup matches (proxy/mqtt.js).
export function grant(srcId, dstId, port) {
  if (config.trafficPolicy !== 'smi') return ALLOW_ALL
  if (!srcId || !dstId) return DENY
  var key = srcId + '>' + dstId + ':' + port
  var g = cache.get(key)
  if (g) return g
  var tcp = false
  var http = []
  var mqtt = []
  ;(config.access[dstId] || []).forEach(rule => {
    if (rule.port !== null && rule.port !== port) return
    if (rule.sources.indexOf(srcId) < 0) return
    if (rule.tcpAllPorts || rule.tcpPorts.indexOf(port) >= 0) tcp = true
    http = http.concat(rule.http)
    mqtt = mqtt.concat(rule.mqtt || [])
  })
  g = { tcp, http, mqtt }
  cache.set(key, g)
  return g
}

// May a connection on a port of this protocol start under this grant? TCP:
// only with a TCPRoute; MQTT: also with MQTTRouteGroup matches, which
// proxy/mqtt.js then enforces packet by packet.
export function connectionAllowed(g, protocol) {
  return g.tcp || (protocol === 'mqtt' && g.mqtt.length > 0)
}

// One HTTP request under a grant.
export function requestAllowed(g, head) {
  if (g.tcp) return true
  return matchesRequest(g.http, head)
}

// Does a request head match one of these HTTPRouteGroup matches (compiled by
// config.js)? Path and header values are anchored regexes, the query string is
// not part of the path, no methods or '*' is any method. Shared by access
// control and TrafficSplit routes (route.js): one matcher, one meaning.
export function matchesRequest(matches, head) {
  if (matches.length === 0) return false
  var path = head.path || '/'
  var q = path.indexOf('?')
  if (q >= 0) path = path.substring(0, q)
  var method = (head.method || '').toUpperCase()
  var headers = head.headers || {}
  return matches.some(m => (
    (m.path === null || m.path.test(path)) &&
    (m.anyMethod || m.methods.indexOf(method) >= 0) &&
    m.headerList.every(([k, re]) => k in headers && re.test(headers[k]))
  ))
}
