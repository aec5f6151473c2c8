/**
 * The device-fleet MQTTRouteGroup matches of docs/mqtt.md: the Pipy tier runs
 * them against a real mosquitto (test/pipy/mqtt.test.ts) and the unit tier
 * checks that the document still shows these very matches (test/unit/mqtt.test.ts).
 */
export const FLEET_DEVICES = { name: 'devices', clientId: 'dev-[0-9]+', publish: ['devices/{clientId}/#'], subscribe: ['commands/{clientId}/+'] };
export const FLEET_COLLECTOR = { name: 'collector', clientId: null, publish: ['commands/+/+'], subscribe: ['devices/#'] };
