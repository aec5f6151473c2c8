/**
 * The proxy's lines in `fsm-node status` (pure): one summary row, and with
 * several instances one row each, so a dead instance shows while the node
 * stays ready on the others.
 */

export interface ProxyInstanceView {
  slot: number;
  pid?: number;
  up: boolean;
  listening: boolean;
  restarts: number;
  crashes?: number;
  crashLoop?: boolean;
  adminPort?: number;
  threads?: number;
  lastExit?: string;
}

export interface ProxyView {
  kind: string;
  pid?: number;
  up: boolean;
  listening: boolean;
  restarts: number;
  adopted: boolean;
  instances?: ProxyInstanceView[];
  /** Old instances still answering what they had in flight after a config hand-over or an upgrade. */
  draining?: number;
}

const plural = (n: number, word: string): string => `${n} ${word}${n === 1 ? '' : 's'}`;

export function proxyStatusRows(p: ProxyView): Array<[string, string]> {
  const adopted = (p.adopted ? ', adopted' : '') + (p.draining ? `, ${p.draining} old draining` : '');
  const list = p.instances ?? [];
  if (list.length <= 1) return [['proxy', `${p.kind} pid ${p.pid ?? '-'}, ${p.listening ? 'listening' : 'NOT listening'}, ${p.restarts} restarts${adopted}`]];
  const listening = list.filter((i) => i.listening).length;
  const rows: Array<[string, string]> = [
    ['proxy', `${p.kind}, ${listening} of ${list.length} instances listening${p.listening ? '' : ' (NOT ready)'}, ${plural(p.restarts, 'restart')}${adopted}`],
  ];
  for (const i of list) {
    const state = i.listening ? 'listening' : i.up ? 'NOT listening' : 'DOWN (restarting)';
    const extra = [
      i.adminPort !== undefined ? `admin ${i.adminPort}` : undefined,
      i.threads !== undefined ? plural(i.threads, 'thread') : undefined,
      plural(i.restarts, 'restart'),
      i.crashLoop ? 'CRASH LOOP' : undefined,
      !i.listening && i.lastExit ? `last exit: ${i.lastExit}` : undefined,
    ].filter(Boolean);
    rows.push([`  instance ${i.slot}`, `pid ${i.pid ?? '-'}, ${state}, ${extra.join(', ')}`]);
  }
  return rows;
}
