// Egress policy (FSM's Egress, config.egressRules rendered by src/egress/render.ts).
// With the mesh's egress set to `deny`, a connection from a mesh pod to a
// destination outside the mesh leaves only when an Egress of the pod's
// identity allows it:
//   tcp:   by destination address (ipAddresses) and port;
//   https: by the SNI of the TLS ClientHello (hosts), address and port; the
//          bytes stay end-to-end TLS, the proxy only reads the ClientHello;
//   http:  per request, by the Host header (hosts), address and port.
// Denied HTTP gets 403; denied TCP and TLS connections are closed. Every
// decision is counted per source identity and destination and written as an
// access record (one JSON line on the proxy's log).

import config from './config.js'
import * as drain from './drain.js'

var rules = config.egressRules || null
var enabled = config.egress === 'deny' && rules !== null

var decisions = new stats.Counter('fsmn_proxy_egress_total', ['source', 'destination', 'protocol', 'result'])

// CIDRs compiled once per load.
var masks = {}
if (rules) Object.values(rules).forEach(byPort => Object.values(byPort).forEach(list => list.forEach(r => {
  r.masks = r.cidrs.map(c => masks[c] || (masks[c] = new Netmask(c)))
})))

function hostMatches(pattern, host) {
  if (pattern.charAt(0) === '*') return host.length > pattern.length - 1 && host.substring(host.length - pattern.length + 1) === pattern.substring(1)
  return pattern === host
}

function allows(r, ip, host) {
  if (r.masks.length > 0 && !r.masks.some(m => m.contains(ip))) return false
  if (r.protocol === 'tcp' || r.hosts.length === 0) return true
  return host !== '' && r.hosts.some(h => hostMatches(h, host))
}

function requestHost(h) {
  h = (h || '').toLowerCase()
  var colon = h.lastIndexOf(':')
  return colon >= 0 && h.charAt(0) !== '[' ? h.substring(0, colon) : h
}

// Is this connection the egress module's to judge? Only under egress deny,
// only for destinations outside the mesh (not a service, not a pod).
export function handles(srcId, dstIp, dstPort) {
  if (!enabled || dstIp === '') return false
  return !config.services[dstIp + ':' + dstPort] && !config.endpoints[dstIp] && !config.meshPods[dstIp]
}

var $src
var $ip
var $port
var $list     // the rules of this source for this port
var $kind     // http | https | tcp | deny
var $sni
var $rule

function record(destination, protocol, result, rule) {
  decisions.withLabels($src || 'unknown', destination, protocol, result).increase()
  console.log('fsmn egress ' + JSON.encode({ source: $src || 'unknown', destination, port: $port, protocol, result, egress: rule ? rule.egress : null }))
}

function kindOf(list) {
  if (list.length === 0) return 'deny'
  // One Egress port has one protocol; if several Egresses disagree, the first (ns/name order) decides how to read the bytes.
  return list[0].protocol
}

var closeNow = $=>$.replaceStreamStart(new StreamEnd)
var connectOut = $=>$.connect(() => $ip + ':' + $port)

// The egress pipeline for one outbound connection (main.js hands it over after `handles`).
export function outbound(srcId, dstIp, dstPort) {
  $src = srcId
  $ip = dstIp
  $port = dstPort
  var byPort = rules[srcId] || {}
  $list = byPort[String(dstPort)] || []
  $kind = kindOf($list)
  if ($kind === 'tcp') {
    $rule = $list.find(r => r.protocol === 'tcp' && allows(r, dstIp, ''))
    if (!$rule) $kind = 'deny'
    record(dstIp + ':' + dstPort, 'tcp', $rule ? 'allowed' : 'denied', $rule)
  } else if ($kind === 'deny') {
    record(dstIp + ':' + dstPort, 'tcp', 'denied', null)
  }
  return $kind
}

// Keyed 'egress:<kind>' so main.js can merge them into its own pipe() branches.
export var branches = {
  'egress:deny': closeNow,
  // A connection let out holds a retiring instance's drain while it is open (drain.js), as main.js's TCP ones do.
  'egress:tcp': $ => connectOut($.onStart(drain.connectionOpens).onEnd(drain.connectionCloses)),
  // TLS: wait for the ClientHello (at most 5 s), judge its SNI, then pass the bytes through untouched.
  'egress:https': $=>$
    .onStart(drain.connectionOpens)
    .onEnd(drain.connectionCloses)
    .handleTLSClientHello(hello => { $sni = (hello.serverNames && hello.serverNames[0]) || '' })
    .wait(() => $sni !== undefined, { timeout: 5 })
    .pipe(() => {
      var sni = ($sni || '').toLowerCase()
      $rule = $list.find(r => r.protocol === 'https' && allows(r, $ip, sni))
      record(sni || ($ip + ':' + $port), 'https', $rule ? 'allowed' : 'denied', $rule)
      return $rule ? 'pass' : 'deny'
    }, { pass: connectOut, deny: closeNow }),
  // HTTP: per request, by Host; the pod's connection and its requests hold a retiring instance's drain.
  'egress:http': $=>$
    .onStart(drain.clientOpens)
    .onEnd(drain.clientCloses)
    .demuxHTTP().to($=>$
      .onStart(drain.requestStarts)
      .onEnd(drain.requestEnds)
      .handleMessageStart(msg => {
        var host = requestHost(msg.head.headers.host)
        $rule = $list.find(r => r.protocol === 'http' && allows(r, $ip, host))
        record(host || ($ip + ':' + $port), 'http', $rule ? 'allowed' : 'denied', $rule)
      })
      .pipe(() => $rule ? 'pass' : 'deny', {
        pass: $=>$.muxHTTP(() => $ip + ':' + $port, { maxIdle: 4 }).to(connectOut),
        deny: $=>$.replaceMessage(() => new Message({ status: 403, headers: { 'content-type': 'text/plain' } }, 'egress to this destination is not allowed by fsm-node\n')),
      })
      .handleMessageStart(drain.answer)
    ),
}
