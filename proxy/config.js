// The rendered configuration (config.json, written by the agent from the
// node's NodePolicy, see src/proxy/config.ts) with what the hot path needs
// precomputed: regexes compiled once per load, never per request.

// Before the agent has a policy it may start the proxy with an empty
// config: then nothing is known, nothing is enrolled either, and every
// connection passes through to its original destination.
var EMPTY = {
  version: 'none',
  listen: { outbound: 15001, inbound: 15003 },
  trafficPolicy: 'permissive',
  egress: 'allow',
  tunnelPeers: [],
  tunnelTLS: null,
  pods: {},
  services: {},
  endpoints: {},
  meshPods: {},
  access: {},
  mqtt: { topicLevels: 2, maxTopics: 500, maxPacketBytes: 1048576 },
}

var config = Object.assign({}, EMPTY, JSON.decode(pipy.load('config.json')) || {})
config.version = String(config.version)
config.mqtt = Object.assign({}, EMPTY.mqtt, config.mqtt || {})

function anchored(re) {
  return new RegExp('^(?:' + re + ')$')
}

// An HTTP match (access rules and split routes alike, see access.js matchesRequest).
function compileMatch(m) {
  m.path = m.pathRegex === null ? null : anchored(m.pathRegex)
  m.anyMethod = m.methods.length === 0 || m.methods.indexOf('*') >= 0
  m.headerList = Object.entries(m.headers).map(([k, v]) => [k, anchored(v)])
}

// An MQTTRouteGroup match (proxy/mqtt.js): client id regex anchored, filters split into levels once.
function compileMqttMatch(m) {
  m.clientIdRe = m.clientId === null ? null : anchored(m.clientId)
  m.publishLevels = m.publish.map(f => f.split('/'))
  m.subscribeLevels = m.subscribe.map(f => f.split('/'))
}

Object.values(config.access).forEach(
  rules => rules.forEach(rule => {
    rule.http.forEach(compileMatch)
    ;(rule.mqtt || []).forEach(compileMqttMatch)
  })
)

// Several cluster IPs of a service share one entry: compile each match once.
Object.values(config.services).forEach(
  svc => (svc.routes || []).forEach(
    route => route.matches.forEach(m => { if (!m.headerList) compileMatch(m) })
  )
)

config.peers = {}
config.tunnelPeers.forEach(a => { config.peers[a] = true })

export default config
