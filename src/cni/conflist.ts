import { CniCode, CniError, PLUGIN_TYPE } from './protocol.js';

/**
 * Chaining our plugin into a CNI conflist and out again, as text (pure).
 *
 * Not parse-and-reserialise: uninstall must leave the primary CNI's file
 * byte for byte as it was. Install appends `,<indentation>{...our conf...}`
 * after the last element of the top-level "plugins" array, copying the
 * indentation the file uses between elements; uninstall removes exactly the
 * span from the end of the element before ours to the end of ours. A file the
 * primary CNI rewrote meanwhile simply has no entry of ours (repair appends
 * again). Elements are found by a small string-aware scanner.
 */

interface Span {
  start: number;
  end: number;
}

const isWs = (c: string): boolean => c === ' ' || c === '\t' || c === '\n' || c === '\r';

function skipWs(s: string, i: number): number {
  while (i < s.length && isWs(s[i]!)) i++;
  return i;
}

function skipString(s: string, i: number): number {
  for (i++; i < s.length; i++) {
    if (s[i] === '\\') i++;
    else if (s[i] === '"') return i + 1;
  }
  throw new Error('unterminated string');
}

function skipValue(s: string, i: number): number {
  const c = s[i];
  if (c === '"') return skipString(s, i);
  if (c === '{' || c === '[') {
    let depth = 0;
    while (i < s.length) {
      const ch = s[i]!;
      if (ch === '"') {
        i = skipString(s, i);
        continue;
      }
      if (ch === '{' || ch === '[') depth++;
      else if (ch === '}' || ch === ']') {
        depth--;
        if (depth === 0) return i + 1;
      }
      i++;
    }
    throw new Error('unterminated object or array');
  }
  while (i < s.length && !',}] \t\r\n'.includes(s[i]!)) i++;
  return i;
}

/** The elements of the top-level "plugins" array, and where the array closes. */
function pluginElements(text: string): { elements: Span[]; close: number } {
  let i = skipWs(text, 0);
  if (text[i] !== '{') throw new Error('not a JSON object');
  i = skipWs(text, i + 1);
  while (text[i] === '"') {
    const kEnd = skipString(text, i);
    const key = JSON.parse(text.slice(i, kEnd)) as string;
    i = skipWs(text, kEnd);
    if (text[i] !== ':') throw new Error(`expected ":" after ${key}`);
    i = skipWs(text, i + 1);
    if (key === 'plugins') {
      if (text[i] !== '[') throw new Error('"plugins" is not an array');
      const elements: Span[] = [];
      i = skipWs(text, i + 1);
      while (text[i] !== ']') {
        const end = skipValue(text, i);
        elements.push({ start: i, end });
        i = skipWs(text, end);
        if (text[i] === ',') i = skipWs(text, i + 1);
        else if (text[i] !== ']') throw new Error('expected "," or "]" in "plugins"');
      }
      return { elements, close: i };
    }
    i = skipWs(text, skipValue(text, i));
    if (text[i] === ',') i = skipWs(text, i + 1);
  }
  throw new Error('no "plugins" array');
}

function parseElement(text: string, e: Span): { type?: unknown } {
  try {
    return JSON.parse(text.slice(e.start, e.end)) as { type?: unknown };
  } catch {
    return {};
  }
}

function checked(file: string, text: string): { elements: Span[]; close: number } {
  try {
    JSON.parse(text);
    return pluginElements(text);
  } catch (err) {
    throw new CniError(CniCode.invalidConfig, `${file} is not a CNI conflist we can chain into`, (err as Error).message);
  }
}

/** Is our plugin in this conflist, and is it the last plugin (where a chained plugin belongs)? */
export function chainState(file: string, text: string, conf: object): 'absent' | 'current' | 'stale' {
  const { elements } = checked(file, text);
  const ours = elements.filter((e) => parseElement(text, e).type === PLUGIN_TYPE);
  if (ours.length === 0) return 'absent';
  const last = elements[elements.length - 1]!;
  return ours.length === 1 && ours[0] === last && text.slice(last.start, last.end) === JSON.stringify(conf) ? 'current' : 'stale';
}

/** Remove every entry of ours (the exact text install added). */
export function unchain(file: string, text: string): string {
  let out = text;
  for (;;) {
    const { elements } = checked(file, out);
    const idx = elements.findIndex((e) => parseElement(out, e).type === PLUGIN_TYPE);
    if (idx < 0) return out;
    const e = elements[idx]!;
    if (idx > 0) out = out.slice(0, elements[idx - 1]!.end) + out.slice(e.end);
    else {
      // First element (nobody chains us first, but a hand edit might): take the following comma too.
      const next = elements[1];
      out = out.slice(0, e.start) + (next ? out.slice(next.start) : out.slice(skipWs(out, e.end)));
    }
  }
}

/** Our plugin appended as the last element (replacing an older entry of ours). */
export function chain(file: string, text: string, conf: object): string {
  const base = unchain(file, text);
  const { elements, close } = checked(file, base);
  if (elements.length === 0) throw new CniError(CniCode.invalidConfig, `${file} has no plugins`, 'a chained plugin needs a primary CNI plugin before it');
  const last = elements[elements.length - 1]!;
  // The whitespace the file puts before an element, e.g. "\n    ".
  let sep = '';
  if (elements.length > 1) {
    const prev = elements[elements.length - 2]!;
    sep = base.slice(prev.end, last.start).replace(/^\s*,/, '');
  } else {
    const open = base.lastIndexOf('[', last.start);
    sep = base.slice(open + 1, last.start);
  }
  void close;
  return `${base.slice(0, last.end)},${sep}${JSON.stringify(conf)}${base.slice(last.end)}`;
}
