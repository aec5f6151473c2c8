import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { COVER_CASES, MATCH_CASES } from '../support/mqtt-topic-cases.js';
import { findPipy, pipySkipReason } from '../support/pipy.js';

/**
 * The topic matching tables of test/unit/mqtt.test.ts, run by Pipy itself on
 * proxy/mqtt-topic.js: PipyJS is not Node's JavaScript (a '\u0000' escape,
 * for one, once made every filter look invalid there and not here).
 */

const skip = pipySkipReason();
if (skip) console.log(skip);
const maybe = skip ? describe.skip : describe;

const ENTRY = `
import * as t from './mqtt-topic.js'
var cases = JSON.decode(pipy.load('cases.json'))
var out = cases.map(c => c[0] === 'match' ? t.topicMatches(t.levels(c[1]), c[2])
  : c[0] === 'covers' ? t.filterCovers(t.levels(c[1]), t.levels(c[2]))
  : c[0] === 'validFilter' ? t.validFilter(c[1])
  : c[0] === 'validTopic' ? t.validTopicName(c[1])
  : c[0] === 'substitute' ? t.substitute(t.levels(c[1]), { '{clientId}': c[2], '{serviceAccount}': 'sa' })
  : null)
console.log('RESULT ' + JSON.stringify(out))
pipy.exit(0)
`;

maybe('MQTT topic matching under PipyJS (proxy/mqtt-topic.js in Pipy)', () => {
  test('Pipy gives the answers Node gives', () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsmt-mqtt-topic-'));
    try {
      copyFileSync(fileURLToPath(new URL('../../proxy/mqtt-topic.js', import.meta.url)), join(dir, 'mqtt-topic.js'));
      writeFileSync(join(dir, 'main.js'), ENTRY);
      const cases: [string, string, string?][] = [
        ...MATCH_CASES.map(([f, t]): [string, string, string] => ['match', f, t]),
        ...COVER_CASES.map(([a, s]): [string, string, string] => ['covers', a, s]),
        ...['a/+/b', '#', 'a/#/b', 'a#', '', 'a\u0000b'].map((f): [string, string] => ['validFilter', f]),
        ...['a/b', 'a/+', '', 'x\u0000'].map((f): [string, string] => ['validTopic', f]),
        ...['dev-1', '#', 'a/b', ''].map((v): [string, string, string] => ['substitute', 'devices/{clientId}/#', v]),
      ];
      const expected = [
        ...MATCH_CASES.map((c) => c[2]),
        ...COVER_CASES.map((c) => c[2]),
        true, true, false, false, false, false,
        true, false, false, false,
        ['devices', 'dev-1', '#'], null, null, null,
      ];
      writeFileSync(join(dir, 'cases.json'), JSON.stringify(cases));
      const r = spawnSync(findPipy()!, ['--log-level=info', join(dir, 'main.js')], { cwd: dir, encoding: 'utf8', timeout: 20_000 });
      const line = `${r.stdout}${r.stderr}`.split('\n').find((l) => l.includes('RESULT '));
      if (!line) throw new Error(`pipy printed no result (exit ${r.status}): ${r.stdout} ${r.stderr}`);
      const got = JSON.parse(line.slice(line.indexOf('RESULT ') + 7)) as unknown[];
      expect(cases.map((c, i) => [...c, got[i]])).toEqual(cases.map((c, i) => [...c, expected[i]]));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
