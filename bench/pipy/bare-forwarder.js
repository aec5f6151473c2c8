// bench mqtt --bare: the floor of the node proxy's TCP forwarding. The same
// listeners, routing and mutual TLS tunnel set-up as proxy/main.js (this file
// runs as main.js next to a copy of proxy/*.js: route.js, tls.js and
// config.js are the project's), but once a connection is routed no
// JavaScript runs for its bytes: no counters, no policy, no branches per
// chunk. What this program costs per message is what Pipy's sockets, the
// HTTP/2 tunnel and TLS cost; what proxy/main.js costs above it is the
// program's own. Not a proxy to run: it applies no access control.

import config from './config.js'
import { decide } from './route.js'
import * as tls from './tls.js'

var $srcId
var $route
var $target

function originalDestination(ib) {
  if (ib.destinationAddress) return [ib.destinationAddress, ib.destinationPort]
  var buf = new Data
  if (ib.socket.getRawOption(0, 80, buf) !== 0) return null
  var b = buf.toArray()
  return [b[4] + '.' + b[5] + '.' + b[6] + '.' + b[7], b[2] * 256 + b[3]]
}

pipy.listen(config.listen.outbound, { transparent: true }, $=>$
  .onStart(ib => {
    var dst = originalDestination(ib)
    var pod = config.pods[ib.remoteAddress]
    $srcId = pod ? pod.identity : ''
    $route = dst ? decide(dst[0], dst[1]) : { mode: 'refused' }
    return new Data
  })
  .pipe(() => $route.mode === 'tunnel' ? 'tunnel' : ($route.mode === 'local' ? 'local' : 'refused'), {
    local: $=>$.connect(() => $route.target),
    tunnel: $=>$
      .connectHTTPTunnel(() => new Message({ method: 'CONNECT', path: $route.target, headers: { host: $route.target } })).to($=>$
        .muxHTTP(() => tls.poolKey($srcId, $route), { version: 2 }).to(tls.connectPeer(() => $route.tunnel))
      ),
    refused: $=>$.replaceStreamStart(new StreamEnd),
  })
)

pipy.listen(config.listen.inbound, tls.serve($=>$
  .demuxHTTP().to($=>$
    .acceptHTTPTunnel(req => {
      $target = req.head.path
      return new Message({ status: 200 })
    }).to($=>$.onStart(() => new Data).connect(() => $target))
  )
))
