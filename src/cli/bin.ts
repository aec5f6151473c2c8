#!/usr/bin/env node
import { main } from './main.js';

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
  // A command that failed half-way may leave a handle open (a socket, a watcher);
  // the exit code must still reach the caller, so give stdout a moment, then go.
  setTimeout(() => process.exit(code), 500).unref();
});
