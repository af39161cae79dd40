/**
 * What a caller can tell apart, in `AuthbusError.code`:
 *
 * - `not_found`: no credential is registered under the key; register it
 *   (auth.register, or `publisher register`) first.
 * - `unavailable`: no refresher answered, or it could not answer now; check
 *   that refreshers run, the connection, and the user's permissions and inbox
 *   prefix. Retrying later may succeed.
 * - `refused`: the token service refused the request as malformed or
 *   forbidden; retrying the same request will not help.
 * - `timeout`: after a 401, no new token arrived within the wait bound.
 * - `closed`: the TokenSource was closed.
 * - `needs_reauth`: a person must log in again (a {@link NeedsReauthError}).
 */
export type AuthbusErrorCode = "not_found" | "unavailable" | "refused" | "timeout" | "closed" | "needs_reauth";

/**
 * The error of every failure of this package. Its message says what to do;
 * it never holds an access token (fingerprints only).
 */
export class AuthbusError extends Error {
  override name = "AuthbusError";
  readonly code: AuthbusErrorCode;

  constructor(code: AuthbusErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/**
 * The credential cannot be refreshed until a person logs in again and
 * registers the new tokens (auth.register). The fetch wrapper throws it
 * instead of retrying, and `TokenSource.token()` throws it while the
 * credential is in that state.
 */
export class NeedsReauthError extends AuthbusError {
  override name = "NeedsReauthError";
  /** The credential key, `tenant.user.server`. */
  readonly key: string;
  /** The token endpoint's OAuth error code (`invalid_grant`, …) or authbus's own (`no_refresh_token`). */
  readonly reason: string;
  /** The token endpoint's `error_description` as given; may be empty. */
  readonly description: string;
  /** The credential generation that failed, or 0 when the token service reported the state without one. */
  readonly version: number;

  constructor(key: string, reason: string, description: string, version: number) {
    const detail = description ? `${reason}: ${description}` : reason;
    super("needs_reauth", `credential ${key} needs a new login (${detail}); log in again and register the new tokens for ${key}`);
    this.key = key;
    this.reason = reason;
    this.description = description;
    this.version = version;
  }
}
