// MQTT topic names and topic filters (MQTT 3.1.1 section 4.7, MQTT 5 section
// 4.7): the matching the node proxy enforces MQTTRouteGroup matches with.
// Plain JavaScript without Pipy globals, so the unit tests run these very
// functions under Node (test/unit/mqtt-topic.test.ts) and the proxy
// (proxy/mqtt.js) imports them: one implementation, tested once.
//
// A filter is kept as its array of levels. '+' matches exactly one level,
// '#' (last level only) the parent and every level below it. A filter whose
// first level is a wildcard does not match a topic whose first level starts
// with '$' ($SYS/...): such topics are only matched by filters naming them.

// Placeholders a route group filter may use as a whole level; substituted per
// connection (see substitute).
export var PLACEHOLDERS = ['{clientId}', '{serviceAccount}']

// U+0000 is not allowed in MQTT strings (PipyJS has no '\u' escapes).
var NUL = String.fromCharCode(0)

export function levels(s) {
  return s.split('/')
}

// Is `s` a valid topic name (a PUBLISH topic: no wildcards, not empty)?
export function validTopicName(s) {
  return s.length > 0 && s.indexOf('+') < 0 && s.indexOf('#') < 0 && s.indexOf(NUL) < 0
}

// Is `s` a valid topic filter? ('+' and '#' only as whole levels, '#' last.)
export function validFilter(s) {
  if (s.length === 0 || s.indexOf(NUL) >= 0) return false
  var l = levels(s)
  for (var i = 0; i < l.length; i++) {
    var x = l[i]
    if (x === '#') {
      if (i !== l.length - 1) return false
    } else if (x !== '+' && (x.indexOf('+') >= 0 || x.indexOf('#') >= 0)) {
      return false
    }
  }
  return true
}

// A shared subscription ($share/<group>/<filter>, MQTT 5) subscribes to
// <filter>: that is what access control must judge. null when malformed.
export function effectiveFilter(s) {
  if (s.substring(0, 7) !== '$share/') return s
  var rest = s.substring(7)
  var slash = rest.indexOf('/')
  if (slash <= 0) return null
  var group = rest.substring(0, slash)
  if (group.indexOf('+') >= 0 || group.indexOf('#') >= 0) return null
  return rest.substring(slash + 1)
}

function isWild(x) {
  return x === '+' || x === '#'
}

// Does the filter (levels) match the topic name (string)?
export function topicMatches(filter, topic) {
  var t = levels(topic)
  if (topic.charAt(0) === '$' && isWild(filter[0])) return false
  for (var i = 0; i < filter.length; i++) {
    var f = filter[i]
    if (f === '#') return true
    if (i >= t.length) return false
    if (f !== '+' && f !== t[i]) return false
  }
  return t.length === filter.length
}

// Is every topic the subscription filter `sub` (levels) can match also
// matched by the allowed filter `allowed` (levels)? That is when a SUBSCRIBE
// to `sub` is within what `allowed` permits.
export function filterCovers(allowed, sub) {
  var a0 = allowed[0]
  var s0 = sub[0]
  // sub reaches '$' topics only when its first level names one; allowed reaches none of them with a wildcard first.
  if (isWild(a0) && s0.charAt(0) === '$') return false
  for (var i = 0; i < allowed.length; i++) {
    var a = allowed[i]
    if (a === '#') return true
    if (i >= sub.length) return false
    var s = sub[i]
    if (s === '#') return false
    if (a !== '+' && (s === '+' || s !== a)) return false
  }
  return sub.length === allowed.length
}

// A filter's levels with the placeholders filled in for one connection; null
// when a value cannot stand as one level (empty, or holds '/', '+', '#'): the
// filter then grants nothing, rather than something wider.
export function substitute(filter, values) {
  var out = []
  for (var i = 0; i < filter.length; i++) {
    var x = filter[i]
    if (x.charAt(0) === '{' && PLACEHOLDERS.indexOf(x) >= 0) {
      var v = values[x]
      if (!v || v.indexOf('/') >= 0 || v.indexOf('+') >= 0 || v.indexOf('#') >= 0 || v.indexOf(NUL) >= 0) return null
      out.push(v)
    } else {
      out.push(x)
    }
  }
  return out
}

// The label a topic is counted under: its first `n` levels, the rest folded
// into '#' (n = 0: everything is '#').
export function foldTopic(topic, n) {
  var l = levels(topic)
  if (l.length <= n) return topic
  return n === 0 ? '#' : l.slice(0, n).join('/') + '/#'
}
