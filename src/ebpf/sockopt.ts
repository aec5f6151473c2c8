import { native } from './native.js';

/**
 * The original destination of a redirected IPv4 TCP connection
 * (getsockopt SOL_IP/SO_ORIGINAL_DST), as a transparent proxy reads it. From
 * a net.Socket the fd is `(socket as any)._handle.fd`.
 */
export function originalDst(fd: number): { address: string; port: number } {
  return native().originalDst(fd);
}
