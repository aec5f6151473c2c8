// Per source and destination identity, on Pipy's admin /metrics. Recorded
// once per connection or request, by the proxy of the source's node (it knows
// both identities: the source from the pod table, the destination from the
// endpoint it picked); the tunnel's far side records nothing, so nothing is
// counted twice. Labels: source / destination = ns/serviceAccount, or
// "unknown" (not a mesh pod) / "external" (egress).

var labels = ['source', 'destination']

export var connections = new stats.Counter('fsmn_proxy_connections_total', labels)
export var requests = new stats.Counter('fsmn_proxy_requests_total', labels)
export var responses = new stats.Counter('fsmn_proxy_responses_total', ['source', 'destination', 'class'])
export var bytes = new stats.Counter('fsmn_proxy_bytes_total', ['source', 'destination', 'direction'])
export var denied = new stats.Counter('fsmn_proxy_denied_total', ['source', 'destination', 'reason'])
export var latency = new stats.Histogram(
  'fsmn_proxy_request_duration_ms',
  [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, Number.POSITIVE_INFINITY],
  labels
)

export function statusClass(status) {
  return status >= 100 && status < 600 ? Math.floor(status / 100) + 'xx' : 'other'
}

// Tunnels this proxy's inbound side answered (the far side of a cross-node
// hop): a separate metric, so requests and bytes are still counted once.
// source = the identity the tunnel proved (its client certificate) under
// mTLS; transport = mtls | plaintext (a policy without a trust bundle).
export var tunnels = new stats.Counter('fsmn_proxy_tunnels_total', ['source', 'destination', 'result', 'transport'])

// Requests sent again because their own tunnel failed before the far side
// answered its CONNECT (a far proxy instance died; proxy/tunnel.js).
export var tunnelRetries = new stats.Counter('fsmn_proxy_tunnel_retries_total', ['source', 'destination'])

// TLS handshakes of tunnel connections that failed: side = server (:15003) or
// client (this node's tunnel pools); reason, see proxy/tls.js.
export var handshakeFailures = new stats.Counter('fsmn_proxy_tls_handshake_failures_total', ['side', 'reason'])

// 1 for the config version this program runs: how a reload is seen to have landed.
export var configVersion = new stats.Gauge('fsmn_proxy_config', ['version'])

// MQTT (proxy/mqtt.js), recorded by the node proxy of the broker pod (the hop
// that reads the packets): source = the client's identity, broker = the
// broker pod's identity. topic is folded to config.mqtt.topicLevels levels
// and at most config.mqtt.maxTopics values per worker ('(other)' beyond).
// connects: result = accepted | not-authorized (refused here) | broker-<code> (refused by the broker).
export var mqttConnects = new stats.Counter('fsmn_proxy_mqtt_connects_total', ['source', 'broker', 'result'])
// direction = publish (client to broker) | deliver (broker to client).
export var mqttMessages = new stats.Counter('fsmn_proxy_mqtt_messages_total', ['source', 'broker', 'direction', 'qos', 'topic'])
export var mqttBytes = new stats.Counter('fsmn_proxy_mqtt_bytes_total', ['source', 'broker', 'direction', 'qos', 'topic'])
// kind = publish | subscribe | will (a CONNECT refused for its will topic).
export var mqttDenied = new stats.Counter('fsmn_proxy_mqtt_denied_total', ['source', 'broker', 'kind', 'topic'])
// Connections the proxy closed: malformed | oversized | protocol-error | publish-denied (3.1.1).
export var mqttClosed = new stats.Counter('fsmn_proxy_mqtt_closed_total', ['source', 'broker', 'reason'])
