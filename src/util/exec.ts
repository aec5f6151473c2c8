import { spawn } from 'node:child_process';
import { CommandError } from '../errors.js';

export interface RunResult {
  stdout: string;
  stderr: string;
}

/**
 * Run an external command without a shell, optionally feeding stdin (how
 * iptables-restore and ipset restore take a whole transaction). Rejects with
 * CommandError carrying the exit code and stderr.
 */
export function run(command: string, args: readonly string[], opts: { input?: string; allowFail?: boolean } = {}): Promise<RunResult & { code: number | null }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (err) => reject(new CommandError(command, args, null, err.message)));
    child.on('close', (code) => {
      if (code !== 0 && !opts.allowFail) reject(new CommandError(command, args, code, stderr));
      else resolve({ stdout, stderr, code });
    });
    // A command that exits without reading stdin makes this write fail with
    // EPIPE; its exit code already tells the outcome, so the pipe error is noise.
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}
