import type { TokenSource } from "./source.js";
import { authScheme, type Token } from "./wire.js";

/** The shape of the global `fetch`, and of what {@link authbusFetch} returns. */
export type FetchLike = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

/** Options of {@link authbusFetch}. */
export interface AuthbusFetchOptions {
  /** The fetch that sends the requests; the global `fetch` by default. */
  fetch?: FetchLike;
}

/**
 * authbusFetch returns a `fetch` that sends every request with the current
 * token of `source` (`Authorization: <token_type> <token>`, replacing any
 * Authorization header the caller set) and recovers from a 401 once:
 *
 * 1. it runs the 401 recipe ({@link TokenSource.renew}): one report per
 *    refused token however many requests saw it, then the immediate
 *    auth.token check, then a bounded wait;
 * 2. it sends the request again with the new token, once; a second 401 is
 *    returned to the caller as it is.
 *
 * Bodies: a body that fetch can send twice (a string, `URLSearchParams`,
 * `FormData`, a `Blob`, an `ArrayBuffer` or typed array, or none) is sent
 * again as it is; a `Request` with a body is cloned before the first send,
 * so the clone (buffered in memory as it streams) is the replay. A body
 * given as a stream (`ReadableStream` or async iterable in `init.body`) is
 * spent by the first send: on a 401 the token is still reported (so the
 * next request works) and the 401 response is returned without a replay.
 *
 * When the credential needs a person it throws the {@link NeedsReauthError}
 * instead of sending anything, or instead of replaying. Other failures of the
 * recipe throw an {@link AuthbusError}; an abort of `init.signal` stops the
 * wait with the signal's reason. A `traceparent` request header is carried
 * into the report.
 */
export function authbusFetch(source: TokenSource, opts: AuthbusFetchOptions = {}): FetchLike {
  const base: FetchLike = opts.fetch ?? ((input, init) => fetch(input, init));
  return async (input, init) => {
    const signal = init?.signal ?? (input instanceof Request ? input.signal : undefined);
    const used = await source.token();
    const streamed = isStream(init?.body);
    // fetch reads a Request's body once: keep a copy for the replay.
    const spare = input instanceof Request && input.body !== null && init?.body === undefined ? input.clone() : undefined;
    const res = await base(input, withToken(input, init, used));
    if (res.status !== 401) return res;

    const url = input instanceof Request ? input.url : input;
    const traceparent = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined)).get("traceparent") ?? undefined;
    if (streamed) {
      // The body is spent. Report the 401 unless a newer token is already
      // here, so that the next request works, and hand the 401 back.
      if (source.current?.fingerprint === used.fingerprint) {
        source.renew(used, { url, traceparent }).catch(() => undefined);
      }
      return res;
    }
    await res.body?.cancel().catch(() => undefined);
    const next = await source.renew(used, { url, traceparent, ...(signal ? { signal } : {}) });
    return base(spare ?? input, withToken(spare ?? input, init, next));
  };
}

/** init with the Authorization header of tok set, over the caller's headers. */
function withToken(input: string | URL | Request, init: RequestInit | undefined, tok: Token): RequestInit {
  // As in fetch itself, init.headers, when given, replace a Request's own.
  const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
  headers.set("authorization", `${authScheme(tok.tokenType)} ${tok.accessToken}`);
  return { ...init, headers };
}

function isStream(body: unknown): boolean {
  return (
    body instanceof ReadableStream ||
    (typeof body === "object" && body !== null && Symbol.asyncIterator in body && !(body instanceof Blob))
  );
}
