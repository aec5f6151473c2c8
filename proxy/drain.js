// The drain of a retiring proxy instance (docs/proxy.md, "What a reload does
// to requests in flight"). The supervisor applies a new config by starting
// new instances beside this one on the same ports (SO_REUSEPORT) and then
// sends this one SIGINT: Pipy closes its listeners at once (the kernel moves
// connections still queued on them to the new instances, tcp_migrate_req)
// and calls the pipy.exit() callback below, keeping this program's
// pipelines, timers and upstream connections until the callback's promise
// resolves. It resolves once no HTTP request is in flight here and no TCP
// connection of a pod is open, and nothing new started for QUIET_MS; or at
// the deadline (FSMN_PROXY_DRAIN_MS, which the supervisor sets a little
// below its own grace). While draining, every HTTP answer to a pod carries
// `connection: close`, so keep-alive clients take their next request to the
// new instances.
//
// Idle HTTP keep-alive connections (no request in flight) do not hold the
// drain: they are closed when it ends, as a server's keep-alive timeout
// would. What the deadline cuts: long-lived TCP connections (MQTT, ...).
// Tunnels from other node proxies and clusters are not waited for, only the
// requests inside them.
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

var requests = 0
var connections = 0
// Bumped by every start: a quiet period is over when it changed.
var started = 0
var draining = false
var finish = null

function check() {
  if (!finish || requests > 0 || connections > 0) return
  var mark = started
  new Timeout(QUIET_MS / 1000).wait().then(() => {
    if (finish && started === mark && requests <= 0 && connections <= 0) finish('drained')
  })
}

export function requestStarts() { requests++; started++ }
export function requestEnds() { requests--; check() }
export function connectionOpens() { connections++; started++ }
export function connectionCloses() { connections--; check() }

// An answer to a pod: while draining, it tells the client to close the connection.
export function answer(msg) {
  if (draining && msg.head) {
    if (!msg.head.headers) msg.head.headers = {}
    msg.head.headers.connection = 'close'
  }
}

pipy.exit(() => new Promise(resolve => {
  draining = true
  finish = why => {
    if (!finish) return
    finish = null
    console.log('fsmn-proxy drain ' + why + ' version=' + config.version + ': requests ' + requests + ', connections ' + connections)
    resolve()
  }
  new Timeout(DEADLINE_MS / 1000).wait().then(() => { if (finish) finish('deadline') })
  check()
}))
