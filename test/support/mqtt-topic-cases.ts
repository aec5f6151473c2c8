/**
 * MQTT topic matching cases (MQTT 3.1.1/5 section 4.7), shared by the unit
 * test (proxy/mqtt-topic.js under Node) and the Pipy tier (the same module
 * under PipyJS, whose JavaScript differs: no \u escapes, no while loops).
 */

/** [filter, topic name, matches] */
export const MATCH_CASES: [string, string, boolean][] = [
    // '#': the parent level and everything below
    ['sport/tennis/player1/#', 'sport/tennis/player1', true],
    ['sport/tennis/player1/#', 'sport/tennis/player1/ranking', true],
    ['sport/tennis/player1/#', 'sport/tennis/player1/score/wimbledon', true],
    ['sport/#', 'sport', true],
    ['sport/#', 'sports', false],
    ['#', 'anything/at/all', true],
    // '+': exactly one level, an empty level included
    ['sport/tennis/+', 'sport/tennis/player1', true],
    ['sport/tennis/+', 'sport/tennis/player1/ranking', false],
    ['sport/+', 'sport', false],
    ['sport/+', 'sport/', true],
    ['+/+', '/finance', true],
    ['/+', '/finance', true],
    ['+', '/finance', false],
    ['+/tennis/#', 'sport/tennis/x', true],
    // literal levels are case sensitive and exact
    ['devices/d1/temp', 'devices/d1/temp', true],
    ['devices/d1/temp', 'Devices/d1/temp', false],
    ['devices/d1', 'devices/d1/temp', false],
    // '$' topics are not matched by a leading wildcard, only by filters naming them
    ['#', '$SYS/broker/uptime', false],
    ['+/monitor/Clients', '$SYS/monitor/Clients', false],
    ['$SYS/#', '$SYS/broker/uptime', true],
    ['$SYS/monitor/+', '$SYS/monitor/Clients', true],
    ['devices/#', 'devices/$x', true],
];

/** [allowed filter, subscription filter, allowed covers it] */
export const COVER_CASES: [string, string, boolean][] = [
    ['public/#', 'public/a', true],
    ['public/#', 'public/#', true],
    ['public/#', 'public', true],
    ['public/#', 'public/+/x', true],
    ['public/#', '#', false],
    ['public/#', '+/a', false],
    ['public/+', 'public/a', true],
    ['public/+', 'public/+', true],
    ['public/+', 'public/#', false],
    ['public/+', 'public/a/b', false],
    ['public/+', 'public', false],
    ['public/a', 'public/+', false],
    ['+/status', 'dev1/status', true],
    ['+/status', '+/status', true],
    ['#', '#', true],
    ['#', 'a/b/c', true],
    // '$' topics: an allowed leading wildcard does not reach them, so it does not cover a filter naming them
    ['#', '$SYS/#', false],
    ['+/x', '$SYS/x', false],
    ['$SYS/#', '$SYS/broker/+', true],
    // a leading wildcard in the subscription reaches no '$' topic, so '#' is covered by '#' only
    ['$SYS/#', '#', false],
];
