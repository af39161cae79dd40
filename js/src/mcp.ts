// The MCP TypeScript SDK adapter: a Streamable HTTP client transport whose
// requests carry the authbus token. This module imports
// @modelcontextprotocol/sdk (an optional peer dependency of this package);
// the core entry point does not.

import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import {
  StreamableHTTPClientTransport,
  type StreamableHTTPClientTransportOptions,
} from "@modelcontextprotocol/sdk/client/streamableHttp.js";

import { NeedsReauthError } from "./errors.js";
import { authbusFetch, type FetchLike } from "./fetch.js";
import type { TokenSource } from "./source.js";

/**
 * The SDK's authorization error (`UnauthorizedError`, so existing handlers
 * catch it), raised when the credential needs a person to log in again. The
 * authbus detail is in `needsReauth` and in `cause`.
 */
export class AuthbusUnauthorizedError extends UnauthorizedError {
  override name = "AuthbusUnauthorizedError";
  readonly needsReauth: NeedsReauthError;

  constructor(err: NeedsReauthError) {
    super(err.message);
    this.needsReauth = err;
    this.cause = err;
  }
}

/**
 * mcpFetch is {@link authbusFetch} for the MCP SDK: the same token, report
 * and replay, but a {@link NeedsReauthError} is thrown as the SDK's
 * authorization error ({@link AuthbusUnauthorizedError}, an
 * `UnauthorizedError`). Pass it as the `fetch` option of any SDK transport.
 */
export function mcpFetch(source: TokenSource, base?: FetchLike): FetchLike {
  const f = authbusFetch(source, base ? { fetch: base } : {});
  return async (input, init) => {
    try {
      return await f(input, init);
    } catch (err) {
      if (err instanceof NeedsReauthError) throw new AuthbusUnauthorizedError(err);
      throw err;
    }
  };
}

/**
 * Options of {@link authbusTransport}: those of the SDK's transport except
 * `authProvider`, whose 401 handling (discovery, then a refresh-token grant
 * from this process) is what authbus replaces. `fetch`, if given, is the
 * fetch underneath the authbus one.
 */
export type AuthbusTransportOptions = Omit<StreamableHTTPClientTransportOptions, "authProvider">;

/**
 * authbusTransport returns the SDK's StreamableHTTPClientTransport for url,
 * with every request sent through {@link mcpFetch} of source:
 *
 * ```ts
 * const client = new Client({ name: "agent", version: "1.0.0" });
 * await client.connect(authbusTransport(source, new URL("https://mcp.example.com/mcp")));
 * ```
 */
export function authbusTransport(source: TokenSource, url: URL, opts: AuthbusTransportOptions = {}): StreamableHTTPClientTransport {
  // The SDK calls fetch with a URL, never a Request, so its narrower fetch
  // type fits underneath.
  return new StreamableHTTPClientTransport(url, { ...opts, fetch: mcpFetch(source, opts.fetch as FetchLike | undefined) });
}
