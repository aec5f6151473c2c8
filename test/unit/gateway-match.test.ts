import {
  compareMatches,
  hostMatches,
  intersectHostnames,
  modifyHeaders,
  pathMatches,
  redirectLocation,
  requestMatches,
  rewritePath,
  weightedPicks,
  type RankedMatch,
} from '../../src/gateway/match.js';
import { parseGatewayDuration, toHTTPRoute, type MatchRec } from '../../src/gateway/objects.js';

/**
 * The Gateway API's matching rules, checked against the behaviours the
 * upstream conformance tests expect (HTTPRouteExactPathMatching,
 * HTTPRouteMatching, HTTPRouteMatchingAcrossRoutes, HTTPRouteMethodMatching,
 * HTTPRouteQueryParamMatching, HTTPRouteHostnameIntersection,
 * HTTPRouteRewritePath, HTTPRouteRedirect*, HTTPRouteRequestHeaderModifier).
 * The proxy implements the per-request half again in PipyJS; test/pipy/gateway.test.ts
 * checks it with real requests.
 */

const m = (path: MatchRec['path'], extra: Partial<MatchRec> = {}): MatchRec => ({ path, headers: [], queryParams: [], method: null, ...extra });

describe('path matching', () => {
  it('Exact matches only the whole path (HTTPRouteExactPathMatching)', () => {
    const exact = { type: 'Exact' as const, value: '/one' };
    expect(pathMatches(exact, '/one')).toBe(true);
    expect(pathMatches(exact, '/one/')).toBe(false);
    expect(pathMatches(exact, '/one/example')).toBe(false);
    expect(pathMatches(exact, '/on')).toBe(false);
  });

  it('PathPrefix matches whole path elements, trailing slash ignored (HTTPRouteMatching)', () => {
    for (const value of ['/v2', '/v2/']) {
      const p = { type: 'PathPrefix' as const, value };
      expect(pathMatches(p, '/v2')).toBe(true);
      expect(pathMatches(p, '/v2/')).toBe(true);
      expect(pathMatches(p, '/v2/example')).toBe(true);
      expect(pathMatches(p, '/v2example')).toBe(false);
      expect(pathMatches(p, '/v')).toBe(false);
    }
    expect(pathMatches({ type: 'PathPrefix', value: '/' }, '/anything/at/all')).toBe(true);
  });

  it('RegularExpression is anchored', () => {
    const re = { type: 'RegularExpression' as const, value: '/foo/[0-9]+' };
    expect(pathMatches(re, '/foo/123')).toBe(true);
    expect(pathMatches(re, '/foo/123/x')).toBe(false);
    expect(pathMatches(re, '/x/foo/123')).toBe(false);
  });

  it('headers (case-insensitive names), query parameters (first value of a name) and method all must match', () => {
    const match = m({ type: 'PathPrefix', value: '/' }, {
      method: 'POST',
      headers: [{ type: 'Exact', name: 'version', value: 'two' }],
      queryParams: [{ type: 'RegularExpression', name: 'animal', value: 'wh.+' }],
    });
    const req = { method: 'post', path: '/?animal=whale&animal=dolphin', headers: { version: 'two' } };
    expect(requestMatches(match, req)).toBe(true);
    expect(requestMatches(match, { ...req, method: 'GET' })).toBe(false);
    expect(requestMatches(match, { ...req, path: '/?animal=dolphin&animal=whale' })).toBe(false);
    expect(requestMatches(match, { ...req, headers: { version: 'Two' } })).toBe(false);
  });

  it('an HTTPRoute without matches matches every path; only the first entry of a header name counts', () => {
    const route = toHTTPRoute({
      metadata: { name: 'r', namespace: 'ns' },
      spec: {
        rules: [
          {},
          { matches: [{ headers: [{ name: 'Version', value: 'one' }, { name: 'version', value: 'two' }] }] },
        ],
      },
    });
    expect(route.rules[0]!.matches).toEqual([m({ type: 'PathPrefix', value: '/' })]);
    expect(route.rules[1]!.matches[0]!.headers).toEqual([{ type: 'Exact', name: 'version', value: 'one' }]);
  });
});

describe('hostnames', () => {
  it('wildcards cover one or more labels, never the bare domain', () => {
    expect(hostMatches('*.example.com', 'foo.example.com')).toBe(true);
    expect(hostMatches('*.example.com', 'foo.bar.example.com')).toBe(true);
    expect(hostMatches('*.example.com', 'example.com')).toBe(false);
    expect(hostMatches('*.example.com', 'fooexample.com')).toBe(false);
    expect(hostMatches('*', 'anything')).toBe(true);
  });

  it('listener and route hostnames intersect as HTTPRouteHostnameIntersection expects', () => {
    // listener very.specific.com: only routes naming it (or a wildcard covering it) attach, serving very.specific.com.
    expect(intersectHostnames('very.specific.com', ['non.matching.com', '*.nonmatchingwildcard.io'])).toEqual([]);
    expect(intersectHostnames('very.specific.com', ['non.matching.com', 'very.specific.com'])).toEqual(['very.specific.com']);
    expect(intersectHostnames('very.specific.com', ['*.specific.com'])).toEqual(['very.specific.com']);
    // listener *.wildcard.io: exact names under it, narrower wildcards; not the bare domain.
    expect(intersectHostnames('*.wildcard.io', ['bar.wildcard.io', 'foo.bar.wildcard.io', 'wildcard.io', 'non.matching.com'])).toEqual(['bar.wildcard.io', 'foo.bar.wildcard.io']);
    expect(intersectHostnames('*.anotherwildcard.io', ['*.anotherwildcard.io'])).toEqual(['*.anotherwildcard.io']);
    expect(intersectHostnames('*.io', ['*.wildcard.io'])).toEqual(['*.wildcard.io']);
    expect(intersectHostnames('*.wildcard.io', ['*.io'])).toEqual(['*.wildcard.io']);
    // Either side without hostnames takes the other's.
    expect(intersectHostnames(null, ['a.example.com'])).toEqual(['a.example.com']);
    expect(intersectHostnames('a.example.com', [])).toEqual(['a.example.com']);
    expect(intersectHostnames(null, [])).toEqual(['*']);
  });
});

describe('precedence', () => {
  const ranked = (match: MatchRec, route = 'ns/r', created = '2024-01-01T00:00:00Z', rule = 0, index = 0): RankedMatch => ({ match, route, created, rule, index });
  const order = (list: RankedMatch[]) => [...list].sort(compareMatches).map((r) => `${r.route}#${r.rule}.${r.index}`);

  it('Exact beats any prefix; the longest prefix wins; method, then header count, then query count break ties', () => {
    const list = [
      ranked(m({ type: 'PathPrefix', value: '/' }), 'ns/a', undefined, 0),
      ranked(m({ type: 'PathPrefix', value: '/v2' }), 'ns/a', undefined, 1),
      ranked(m({ type: 'Exact', value: '/v2' }), 'ns/a', undefined, 2),
      ranked(m({ type: 'PathPrefix', value: '/v2' }, { headers: [{ type: 'Exact', name: 'x', value: '1' }] }), 'ns/a', undefined, 3),
      ranked(m({ type: 'PathPrefix', value: '/v2' }, { method: 'GET' }), 'ns/a', undefined, 4),
      ranked(m({ type: 'PathPrefix', value: '/v2' }, { queryParams: [{ type: 'Exact', name: 'q', value: '1' }] }), 'ns/a', undefined, 5),
    ];
    expect(order(list)).toEqual(['ns/a#2.0', 'ns/a#4.0', 'ns/a#3.0', 'ns/a#5.0', 'ns/a#1.0', 'ns/a#0.0']);
  });

  it('between equal matches of two routes the older route wins, then ns/name (HTTPRouteMatchingAcrossRoutes)', () => {
    const p = m({ type: 'PathPrefix', value: '/' });
    expect(order([ranked(p, 'ns/young', '2024-02-01T00:00:00Z'), ranked(p, 'ns/old', '2024-01-01T00:00:00Z')])).toEqual(['ns/old#0.0', 'ns/young#0.0']);
    expect(order([ranked(p, 'ns/b'), ranked(p, 'ns/a')])).toEqual(['ns/a#0.0', 'ns/b#0.0']);
    // Within a route: rule order, then match order.
    expect(order([ranked(p, 'ns/a', undefined, 1, 0), ranked(p, 'ns/a', undefined, 0, 1), ranked(p, 'ns/a', undefined, 0, 0)])).toEqual(['ns/a#0.0', 'ns/a#0.1', 'ns/a#1.0']);
  });
});

describe('filters', () => {
  it('ReplacePrefixMatch and ReplaceFullPath rewrite as HTTPRouteRewritePath expects', () => {
    expect(rewritePath({ type: 'ReplacePrefixMatch', value: '/one' }, '/prefix/one/two', '/prefix/one')).toBe('/one/two');
    expect(rewritePath({ type: 'ReplacePrefixMatch', value: '/' }, '/strip-prefix/three', '/strip-prefix')).toBe('/three');
    expect(rewritePath({ type: 'ReplacePrefixMatch', value: '/' }, '/strip-prefix', '/strip-prefix')).toBe('/');
    expect(rewritePath({ type: 'ReplacePrefixMatch', value: '/one/' }, '/prefix/', '/prefix/')).toBe('/one/');
    expect(rewritePath({ type: 'ReplaceFullPath', value: '/one' }, '/full/one/two', '/full')).toBe('/one');
  });

  it('redirect ports follow the scheme, the filter or the listener, and default ports are left out (HTTPRouteRedirectPortAndScheme)', () => {
    const req = { scheme: 'http' as const, host: 'example.org', listenerPort: 80, path: '/a?x=1', matchedPrefix: '/a' };
    const r = (o: Partial<Parameters<typeof redirectLocation>[0]>) => redirectLocation({ scheme: null, hostname: null, path: null, port: null, ...o }, req);
    expect(r({})).toBe('http://example.org/a?x=1');
    expect(r({ scheme: 'https' })).toBe('https://example.org/a?x=1');
    expect(r({ scheme: 'https', port: 8443 })).toBe('https://example.org:8443/a?x=1');
    expect(r({ port: 8080 })).toBe('http://example.org:8080/a?x=1');
    expect(r({ hostname: 'example.com', path: { type: 'ReplacePrefixMatch', value: '/b' } })).toBe('http://example.com/b?x=1');
    expect(redirectLocation({ scheme: null, hostname: null, path: null, port: null }, { ...req, listenerPort: 8080 })).toBe('http://example.org:8080/a?x=1');
    expect(redirectLocation({ scheme: 'http', hostname: null, path: null, port: null }, { ...req, scheme: 'https', listenerPort: 8443 })).toBe('http://example.org/a?x=1');
  });

  it('header modifiers: set overwrites, add appends with a comma, remove deletes (HTTPRouteRequestHeaderModifier)', () => {
    const out = modifyHeaders(
      { 'x-header-set': 'set-val', 'x-header-add-append': 'append-val-1', 'x-header-remove': 'r' },
      { set: [{ name: 'x-header-set', value: 'set-overwrites-values' }], add: [{ name: 'x-header-add', value: 'header-val-1' }, { name: 'x-header-add-append', value: 'header-val-2' }], remove: ['x-header-remove'] },
    );
    expect(out).toEqual({ 'x-header-set': 'set-overwrites-values', 'x-header-add': 'header-val-1', 'x-header-add-append': 'append-val-1,header-val-2' });
  });

  it('weights give exact ratios; weight 0 is never picked', () => {
    const picks = weightedPicks([3, 1, 0], 400);
    expect(picks.filter((p) => p === 0)).toHaveLength(300);
    expect(picks.filter((p) => p === 1)).toHaveLength(100);
    expect(picks.includes(2)).toBe(false);
  });

  it('durations are GEP-2257', () => {
    expect(parseGatewayDuration('1m30s', 'x')).toBe(90_000);
    expect(parseGatewayDuration('500ms', 'x')).toBe(500);
    expect(() => parseGatewayDuration('1.5s', 'spec.rules[0].timeouts.request')).toThrow(/spec\.rules\[0\]\.timeouts\.request.*"1\.5s"|"1\.5s".*duration/);
  });
});

describe('HTTPRoute validation names the field', () => {
  const route = (rules: unknown[]) => () => toHTTPRoute({ metadata: { name: 'r', namespace: 'ns' }, spec: { rules } });
  it.each([
    [[{ matches: [{ path: { type: 'RegularExpression', value: '(' } }] }], 'spec.rules[0].matches[0].path.value'],
    [[{ matches: [{ path: { type: 'PathPrefix', value: 'no-slash' } }] }], 'spec.rules[0].matches[0].path.value'],
    [[{ filters: [{ type: 'RequestRedirect', requestRedirect: {} }, { type: 'URLRewrite', urlRewrite: {} }] }], 'spec.rules[0].filters'],
    [[{ matches: [{ path: { type: 'Exact', value: '/a' } }], filters: [{ type: 'URLRewrite', urlRewrite: { path: { type: 'ReplacePrefixMatch', replacePrefixMatch: '/b' } } }] }], 'spec.rules[0].filters'],
    [[{ filters: [{ type: 'RequestHeaderModifier', requestHeaderModifier: { set: [{ name: 'a', value: '1' }], remove: ['A'] } }] }], 'spec.rules[0].filters[0].requestHeaderModifier.remove[0]'],
    [[{ filters: [{ type: 'ExtensionRef' }] }], 'spec.rules[0].filters[0].type'],
    [[{ timeouts: { request: '1s', backendRequest: '2s' } }], 'spec.rules[0].timeouts.backendRequest'],
    [[{ backendRefs: [{ name: 'svc', port: 80, weight: -1 }] }], 'spec.rules[0].backendRefs[0].weight'],
  ])('%j -> %s', (rules, field) => {
    expect(route(rules)).toThrow(expect.objectContaining({ field }));
  });
});
