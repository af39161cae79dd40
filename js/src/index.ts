/**
 * @authbus/client: the authbus client for TypeScript and JavaScript
 * runtimes. A {@link TokenSource} keeps the access token of one credential
 * current from the bus; {@link TokenSource.renew} is the protocol's recipe
 * for a 401; {@link authbusFetch} wraps fetch with both. The MCP SDK adapter
 * is in `@authbus/client/mcp`. See docs/typescript.md.
 *
 * @module
 */
export { AuthbusError, NeedsReauthError, type AuthbusErrorCode } from "./errors.js";
export { authbusFetch, type AuthbusFetchOptions, type FetchLike } from "./fetch.js";
export {
  DEFAULT_REASK_INTERVAL,
  DEFAULT_REQUEST_TIMEOUT,
  DEFAULT_WAIT_TIMEOUT,
  TokenSource,
  type RenewOptions,
  type TokenSourceOptions,
} from "./source.js";
export { fingerprint, inboxPrefix, parseKey, ProtocolError, type Key, type Token } from "./wire.js";
