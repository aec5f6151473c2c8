// Generations of the pooled connections to a far address (another node
// proxy's tunnel port, another cluster's gateway). Pool keys end in the
// address's current generation (tunnel.js, main.js); moving it on makes every
// later request open a new connection, which SO_REUSEPORT may give to another
// instance there, while the old connection only finishes what it carries.
// Moved on when a connection failed before its answer (tunnel.js) and when the
// far instance says it drains (drain.js's marker). Per worker thread.

var current = {}

export function of(addr) {
  return current[addr] || 0
}

// Once per generation: the first of the requests that rode generation `seen` moves it on.
export function moveOn(addr, seen) {
  if ((current[addr] || 0) === seen) current[addr] = seen + 1
}
