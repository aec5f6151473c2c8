import { parseExposition } from './metrics.js';

/**
 * What `fsm-node status` says about resilience on a node (issue 18): the
 * endpoints the node proxy has ejected, node proxies it considers down, and
 * services whose circuit is open, read from the agent's /metrics (the proxy's
 * own gauges re-exported as fsm_node_proxy_*, src/proxy/metrics.ts). Pure.
 */

export interface ResilienceView {
  ejected: { service: string; endpoint: string }[];
  peersDown: string[];
  openCircuits: string[];
}

const label = (labels: Array<[string, string]>, name: string): string => labels.find(([k]) => k === name)?.[1] ?? '';

export function resilienceView(metricsText: string): ResilienceView {
  const view: ResilienceView = { ejected: [], peersDown: [], openCircuits: [] };
  for (const f of parseExposition(metricsText).families) {
    for (const s of f.samples) {
      // The agent sums a gauge over the proxy's instances (src/proxy/metrics-sum.ts) and Pipy over
      // its threads, each of which keeps its own outlier and circuit state: 2 means two of them ejected it.
      if (!(s.value >= 1)) continue;
      if (s.name === 'fsm_node_proxy_ejected_endpoints') view.ejected.push({ service: label(s.labels, 'service'), endpoint: label(s.labels, 'endpoint') });
      else if (s.name === 'fsm_node_proxy_peer_down') view.peersDown.push(label(s.labels, 'peer'));
      else if (s.name === 'fsm_node_proxy_circuit_open') view.openCircuits.push(label(s.labels, 'service'));
    }
  }
  view.ejected.sort((a, b) => `${a.service} ${a.endpoint}`.localeCompare(`${b.service} ${b.endpoint}`));
  view.peersDown.sort();
  view.openCircuits.sort();
  return view;
}

export function resilienceStatusRows(v: ResilienceView): Array<[string, string]> {
  const rows: Array<[string, string]> = [];
  const byService = new Map<string, string[]>();
  for (const e of v.ejected) byService.set(e.service, [...(byService.get(e.service) ?? []), e.endpoint]);
  rows.push(['ejected', byService.size === 0 ? 'none' : [...byService].map(([s, eps]) => `${s}: ${eps.join(' ')}`).join('; ')]);
  if (v.peersDown.length > 0) rows.push(['peers down', v.peersDown.join(' ')]);
  rows.push(['open circuits', v.openCircuits.length === 0 ? 'none' : v.openCircuits.join(' ')]);
  return rows;
}
