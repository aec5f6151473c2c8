/**
 * Node 20 defines Symbol.dispose (as Symbol.for('nodejs.dispose')) in its main
 * realm only; vm contexts such as jest's test environment lack it. Installing
 * the same registered symbol there makes `using` work everywhere, and objects
 * crossing realms still agree on the key. Imported first by every module here
 * that defines [Symbol.dispose].
 */
if (typeof Symbol.dispose !== 'symbol') {
  Object.defineProperty(Symbol, 'dispose', { value: Symbol.for('nodejs.dispose'), configurable: false, writable: false });
}
export {};
