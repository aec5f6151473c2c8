// The drain of a retiring proxy instance (docs/proxy.md, "What a reload does
// to requests in flight"). The supervisor applies a new config by starting
// new instances beside this one on the same ports (SO_REUSEPORT) and then
// sends this one SIGINT: Pipy closes its listeners at once (the kernel moves
// connections still queued on them to the new instances, tcp_migrate_req)
// and calls the pipy.exit() callback below, keeping this program's
// pipelines, timers and upstream connections until the callback's promise
// resolves. While draining, every HTTP answer to a client carries
// `connection: close`, so keep-alive clients take their next request to the
// new instances.
//
// The drain is over when nothing is left for QUIET_MS: no HTTP request in
// flight, no TCP connection of a pod (MQTT, ...), and no HTTP connection of a
// client (a pod, or a Gateway listener's client). A client's idle keep-alive
// connection is not closed under it: closing it races the client's next
// request on it (the request meets a reset: seen in the lab, where a client
// whose event loop stalled under load wrote a burst of requests onto
// connections the old instance had just closed). It stays open until its
// next request is answered with `connection: close` or its client closes
// it, for up to IDLE_MS (a server's usual keep-alive timeout); then, with
// nothing in flight, the drain ends and the idle rest is closed ("idle").
// The deadline (FSMN_PROXY_DRAIN_MS, which the supervisor sets a little
// below its own grace) cuts what is still open: long-lived TCP connections,
// requests that never end. Other proxies' pooled connections are moved by
// mark() below; a tunnel from another node proxy holds the drain while it is
// open (its peer sends the request only after the answer), the clusterset
// gateway's long-lived tunnels only by the requests inside them.
//
// State is per worker thread, as every module's; each thread's callback
// prints one "fsmn-proxy drain" line with the config version when it
// resolves, which the supervisor counts to end the process without waiting
// for the rest of its grace. (A SIGHUP reload does not clear the callbacks of
// the programs it replaced; theirs carry older versions and are not counted.)

import config from './config.js'

var DEADLINE_MS = +(os.env.FSMN_PROXY_DRAIN_MS || 10000)
// Nothing in flight for this long: the clients have moved to the new instances.
var QUIET_MS = 100
// Idle keep-alive connections of clients are kept open this long (at most the deadline).
var IDLE_MS = Math.min(2000, DEADLINE_MS)

// The marker of answers from a draining instance to other proxies (see mark()).
export var HEADER = 'fsmn-draining'

var requests = 0
var connections = 0
var clients = 0
// When idle client connections stop holding the drain (ms since the epoch).
var idleUntil = 0
// Bumped by every start: a quiet period is over when it changed.
var started = 0
// Requests and tunnels that started here after the drain began (its line
// reports them: a peer that keeps sending to a draining instance shows here).
var late = 0
var draining = false
var finish = null

// Over: nothing in flight, and no client connection open (or the idle ones had their time).
var over = () => requests <= 0 && connections <= 0 && (clients <= 0 || Date.now() >= idleUntil)

function check() {
  if (!finish || !over()) return
  var mark = started
  new Timeout(QUIET_MS / 1000).wait().then(() => {
    if (finish && started === mark && over()) finish(clients > 0 ? 'idle' : 'drained')
  })
}

export function requestStarts() { requests++; started++; if (draining) late++ }
export function requestEnds() { requests--; check() }
export function connectionOpens() { connections++; started++; if (draining) late++ }
export function connectionCloses() { connections--; check() }
// HTTP connections of clients (pods, a Gateway listener's clients): idle ones hold the drain up to IDLE_MS.
export function clientOpens() { clients++; started++ }
export function clientCloses() { clients--; check() }

// An answer to a client (pod, ingress): while draining, it tells the client
// to close the connection. The marker below never reaches a client.
export function answer(msg) {
  if (!msg.head) return
  if (msg.head.headers) delete msg.head.headers[HEADER]
  if (draining) {
    if (!msg.head.headers) msg.head.headers = {}
    msg.head.headers.connection = 'close'
  }
}

// Between node proxies (and clusters' gateways) connections are pooled, so
// `connection: close` does not move them: an answer this instance gives into
// a tunnel from another proxy carries this marker while it drains (HTTP/2's
// GOAWAY, which Pipy 1.5 cannot send, would say the same). The other side
// then opens its next tunnels on a new connection, which SO_REUSEPORT gives
// to the new instances (tunnel.js, multicluster.js), so nothing new arrives
// here while the old connection's requests finish. Set or cleared on every
// such answer, so an endpoint cannot forge it through a gateway.
export function mark(msg) {
  if (!msg.head) return
  if (!msg.head.headers) msg.head.headers = {}
  if (draining) msg.head.headers[HEADER] = '1'
  else delete msg.head.headers[HEADER]
}

pipy.exit(() => new Promise(resolve => {
  draining = true
  finish = why => {
    if (!finish) return
    finish = null
    console.log('fsmn-proxy drain ' + why + ' version=' + config.version + ': requests ' + requests + ', connections ' + connections + ', clients ' + clients + ', started while draining ' + late)
    resolve()
  }
  idleUntil = Date.now() + IDLE_MS
  new Timeout(IDLE_MS / 1000).wait().then(check)
  new Timeout(DEADLINE_MS / 1000).wait().then(() => { if (finish) finish('deadline') })
  check()
}))
