export { IptablesDataplane, IpsetApplyError, RestoreError, type IptablesDataplaneOptions, type IptablesStats } from './dataplane.js';
export { type Backend, type BackendChoice } from './backend.js';
export { IpsetUnavailableError, SetMismatchError } from './ipset.js';
export { DEFAULT_PREFIX, makeNames, type Names } from './names.js';
