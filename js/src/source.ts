import { hostname } from "node:os";

import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { Empty, headers as natsHeaders, type Msg, type MsgHdrs, type NatsConnection, type Subscription } from "@nats-io/transport-node";

import { AuthbusError, NeedsReauthError } from "./errors.js";
import {
  cleanURL,
  decodeEvent,
  encodeEvent,
  errorReply,
  fingerprint,
  inboxPrefix,
  MAX_RUNTIME_LEN,
  msgId,
  parseJSON,
  parseKey,
  Subjects,
  tokenFromData,
  type EventType,
  type Key,
  type NeedsReauth,
  type Token,
  type Unauthorized,
} from "./wire.js";

/** Default of {@link TokenSourceOptions.requestTimeout}, in milliseconds. */
export const DEFAULT_REQUEST_TIMEOUT = 5_000;
/** Default of {@link TokenSourceOptions.waitTimeout}: long enough for a refresh through a slow token endpoint. */
export const DEFAULT_WAIT_TIMEOUT = 20_000;
/** Default of {@link TokenSourceOptions.reaskInterval}. */
export const DEFAULT_REASK_INTERVAL = 2_000;

// How long a needs-re-auth answer is trusted without asking again. The
// auth.rotated of a re-registration clears it at once; asking again only
// matters if that event was missed during a disconnect.
const REAUTH_RECHECK = 30_000;

/** Options of {@link TokenSource.start}. Durations are in milliseconds. */
export interface TokenSourceOptions {
  /** The deployment's subject prefix; `"auth"` by default. It must match the refreshers'. */
  prefix?: string;
  /**
   * Names this runtime in the auth.401 events it publishes (at most 256
   * bytes) and in their CloudEvents source. The default is the host name.
   */
  runtime?: string;
  /** Bounds one auth.token request and one JetStream publish; 5 s by default. */
  requestTimeout?: number;
  /**
   * Bounds how long {@link TokenSource.renew} waits, after its report and its
   * immediate auth.token check, for an auth.rotated with another fingerprint
   * or an auth.needs_reauth; 20 s by default.
   */
  waitTimeout?: number;
  /** How often renew asks auth.token again while it waits; 2 s by default. */
  reaskInterval?: number;
  /** Where the source reports what it cannot return to a caller (a malformed event). Default: console. */
  logger?: { warn(message: string): void };
}

/** What {@link TokenSource.renew} may be told about the refused request. */
export interface RenewOptions {
  /** The URL that answered 401; query, fragment and user info are stripped before it is published. */
  url?: string | URL;
  /** The HTTP status seen; 401 by default. */
  status?: number;
  /** Stops this caller's wait (the shared report and wait go on for others). */
  signal?: AbortSignal;
  /** A W3C `traceparent` to carry in the report's NATS headers. */
  traceparent?: string;
}

/** The acknowledgement of a report, shaped like JetStream's PubAck. */
interface ReportAck {
  readonly stream: string;
  readonly seq: number;
  /** True when the stream dropped the report as a duplicate of an earlier one for the same token. */
  readonly duplicate: boolean;
}

/**
 * TokenSource is the access token of one credential, kept current from the
 * bus. Create it with {@link TokenSource.start}; {@link TokenSource.close}
 * it when done.
 *
 * It subscribes to the key's auth.rotated and auth.needs_reauth events
 * before anything else, reads auth.token at start and whenever its copy is
 * missing or expired, and otherwise follows the events, so `token()` makes
 * no network call in normal operation. A token applies only if its version
 * is higher than the one held: a late re-announcement never replaces a
 * newer token. An auth.needs_reauth of the held version or newer turns the
 * state into a {@link NeedsReauthError}.
 *
 * The NATS connection belongs to the caller (its servers, credentials,
 * reconnect policy and inbox prefix); the source never closes it. A tenant's
 * connection must use the inbox prefix `_INBOX_<tenant>` (see
 * {@link inboxPrefix}): with per-tenant permissions, token replies and
 * publish acknowledgements can reach no other inbox.
 */
export class TokenSource {
  readonly #nc: NatsConnection;
  readonly #js: JetStreamClient;
  readonly #key: Key;
  readonly #subj: Subjects;
  readonly #runtime: string;
  readonly #requestTimeout: number;
  readonly #waitTimeout: number;
  readonly #reaskInterval: number;
  readonly #log: { warn(message: string): void };
  readonly #subs: Subscription[] = [];

  #closed = false;
  readonly #closedSignal = new AbortController();
  #version = 0; // the newest version seen, of a token or of a needs_reauth
  #tok: Token | undefined;
  #reauth: NeedsReauthError | undefined;
  #reauthAt = 0;
  #changed = latch();
  readonly #inflight = new Set<Promise<unknown>>();
  #fetching: Promise<void> | undefined;
  readonly #renewals = new Map<string, Promise<Token>>();

  private constructor(nc: NatsConnection, key: Key, opts: TokenSourceOptions) {
    this.#nc = nc;
    this.#key = key;
    this.#subj = new Subjects(opts.prefix ?? "auth", key);
    this.#runtime = opts.runtime ?? (hostname().slice(0, MAX_RUNTIME_LEN) || "js-client");
    this.#requestTimeout = opts.requestTimeout ?? DEFAULT_REQUEST_TIMEOUT;
    this.#waitTimeout = opts.waitTimeout ?? DEFAULT_WAIT_TIMEOUT;
    this.#reaskInterval = opts.reaskInterval ?? DEFAULT_REASK_INTERVAL;
    this.#log = opts.logger ?? console;
    this.#js = jetstream(nc, { timeout: this.#requestTimeout });
  }

  /**
   * start subscribes to the key's auth.rotated and auth.needs_reauth, waits
   * for the server to confirm the subscriptions (so no rotation after that
   * is missed), then reads auth.token. It resolves once a token is held or
   * the credential is known to need a person (then `token()` throws the
   * {@link NeedsReauthError}); any other failure closes the source and
   * rejects with an {@link AuthbusError} (`not_found`, `unavailable`,
   * `refused`).
   */
  static async start(nc: NatsConnection, key: string, opts: TokenSourceOptions = {}): Promise<TokenSource> {
    const problems = optionProblems(opts);
    if (problems.length > 0) throw new TypeError(`TokenSource options: ${problems.join("; ")}`);
    const s = new TokenSource(nc, parseKey(key), opts);
    try {
      s.#subscribe();
      await nc.flush();
      await s.#fetch();
    } catch (err) {
      await s.close();
      if (err instanceof AuthbusError) throw err;
      throw new AuthbusError(
        "unavailable",
        `starting the token source of ${s.#key.text}: ${errText(err)}; check the NATS connection and the user's subscribe permissions`,
        { cause: err },
      );
    }
    return s;
  }

  /** The credential key, `tenant.user.server`. */
  get key(): string {
    return this.#key.text;
  }

  /** The token held now, without any network call; undefined when none is. */
  get current(): Token | undefined {
    return this.#tok;
  }

  /**
   * token returns the current token. It makes no network call while the held
   * copy is valid; otherwise it asks auth.token (concurrent callers share one
   * request) and returns what it gets, even if that has expired (the first
   * 401 it causes gets it replaced). It throws a {@link NeedsReauthError}
   * while a person must log in, or an {@link AuthbusError}.
   */
  async token(): Promise<Token> {
    let fetched = false;
    for (;;) {
      this.#checkOpen("token");
      const reauthFresh = this.#reauth && (fetched || Date.now() - this.#reauthAt < REAUTH_RECHECK);
      if (reauthFresh) throw this.#reauthCopy();
      if (this.#tok && (fetched || !expired(this.#tok))) return this.#tok;
      if (fetched) {
        // Not expected: a reply that does not apply means a newer event did.
        throw new AuthbusError("unavailable", `token for ${this.key}: the token service answered but no token is held; retry`);
      }
      await this.#fetch();
      fetched = true;
    }
  }

  /**
   * renew is the recipe for a 401 (docs/protocol.md): given the token that
   * was refused (a Token, or the access token itself), it returns a token
   * with another fingerprint, or throws a {@link NeedsReauthError} when only
   * a person can help.
   *
   * If a token other than the refused one is already held, that is the
   * answer. Otherwise it publishes auth.401 for the refused token's
   * fingerprint with `Nats-Msg-Id: auth.401:<key>:<fingerprint>` through
   * JetStream; then it asks auth.token at once, because a report that
   * arrives after the rotation is dropped by the stream as a duplicate and
   * no refresher will announce anything for it; if that answer has another
   * fingerprint, it is the answer. Otherwise it waits for an auth.rotated
   * with another fingerprint or an auth.needs_reauth (the subscriptions
   * exist since start), at most `waitTimeout`, asking auth.token again every
   * `reaskInterval`. Concurrent calls for the same refused token share one
   * report and one wait.
   *
   * Errors: {@link NeedsReauthError}; {@link AuthbusError} with code
   * `timeout`, `unavailable` (the report could not be published and no new
   * token is known), `closed`; or the reason of `opts.signal`.
   */
  async renew(refused: Token | string, opts: RenewOptions = {}): Promise<Token> {
    const fp = typeof refused === "string" ? fingerprint(refused) : refused.fingerprint;
    const refusedVersion = typeof refused === "string" ? 0 : refused.version;
    const known = this.#answer(fp, refusedVersion);
    if (known) return known;
    let shared = this.#renewals.get(fp);
    if (!shared) {
      shared = this.#own(this.#recover(fp, refusedVersion, opts)).finally(() => this.#renewals.delete(fp));
      this.#renewals.set(fp, shared);
    }
    return abortable(shared, opts.signal);
  }

  /**
   * close unsubscribes, ends every wait (they reject with code `closed`),
   * and resolves when the requests and publishes it started have settled
   * (each is bounded by `requestTimeout`). It does not close the connection.
   * Calling it again is harmless.
   */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#closedSignal.abort(new AuthbusError("closed", `token source of ${this.key} closed; create a new one`));
      for (const sub of this.#subs) {
        if (!sub.isClosed()) sub.unsubscribe();
      }
      this.#notify();
    }
    await Promise.allSettled([...this.#inflight]);
  }

  // --- state -------------------------------------------------------------

  #subscribe(): void {
    const on = (t: "auth.rotated" | "auth.needs_reauth") => (err: Error | null, msg: Msg) => {
      if (err) {
        this.#log.warn(`authbus: the subscription to ${this.#subj.event(t)} ended: ${err.message}; check the user's subscribe permissions`);
        return;
      }
      let ev;
      try {
        ev = decodeEvent(t, this.#key, msg.data);
      } catch (e) {
        this.#log.warn(`authbus: ignoring a malformed ${t} event: ${errText(e)}`);
        return;
      }
      if (ev.type === "auth.rotated") this.#applyToken(ev.token);
      else this.#applyReauth(ev.needsReauth, false);
    };
    for (const t of ["auth.rotated", "auth.needs_reauth"] as const) {
      this.#subs.push(this.#nc.subscribe(this.#subj.event(t), { callback: on(t) }));
    }
  }

  /** Installs tok if it is newer than anything held. */
  #applyToken(tok: Token): void {
    if (this.#closed || tok.version <= this.#version) return;
    this.#version = tok.version;
    this.#tok = tok;
    this.#reauth = undefined;
    this.#notify();
  }

  /**
   * Records that a person must log in. An event applies when its version is
   * at least the one held (it carries the version of the generation that
   * failed); a reply carries none and applies only if nothing newer arrived
   * since its request was sent (then nr.version is the version held then).
   */
  #applyReauth(nr: NeedsReauth, fromReply: boolean): void {
    const applies = !this.#closed && nr.version >= this.#version && (!fromReply || nr.version === this.#version);
    if (!applies) return;
    this.#version = nr.version;
    this.#tok = undefined;
    this.#reauth = new NeedsReauthError(this.key, nr.reason, nr.description, nr.version);
    this.#reauthAt = Date.now();
    this.#notify();
  }

  #notify(): void {
    this.#changed.fire();
    this.#changed = latch();
  }

  #reauthCopy(): NeedsReauthError {
    const r = this.#reauth as NeedsReauthError;
    return new NeedsReauthError(r.key, r.reason, r.description, r.version);
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new AuthbusError("closed", `${what} for ${this.key}: the token source is closed; create a new one`);
  }

  /** The answer to a 401 of token fp that the state already gives, if any. */
  #answer(fp: string, refusedVersion: number): Token | undefined {
    this.#checkOpen("renewing the token");
    if (this.#reauth && this.#reauth.version >= refusedVersion) throw this.#reauthCopy();
    if (this.#tok && this.#tok.fingerprint !== fp) return this.#tok;
    return undefined;
  }

  /** Tracks p so that close() can wait for it. */
  #own<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const done = () => this.#inflight.delete(p);
    p.then(done, done);
    return p;
  }

  // --- the recipe --------------------------------------------------------

  async #recover(fp: string, refusedVersion: number, opts: RenewOptions): Promise<Token> {
    const data: Unauthorized = {
      fingerprint: fp,
      runtime: this.#runtime,
      status: opts.status ?? 401,
      observed_at: new Date().toISOString(),
    };
    if (opts.url !== undefined) {
      const url = cleanURL(opts.url);
      if (url) data.url = url;
    }
    let reportErr: unknown;
    try {
      await this.#publish("auth.401", fp, data, opts.traceparent);
    } catch (err) {
      reportErr = err;
    }
    // The immediate check: a request sent after the report was acknowledged
    // sees any rotation that made the report a duplicate.
    await this.#requestToken().catch(() => undefined);
    const now = this.#answer(fp, refusedVersion);
    if (now) return now;
    if (reportErr) throw reportErr; // no refresh was asked for: waiting is pointless

    const deadline = Date.now() + this.#waitTimeout;
    let nextAsk = Date.now() + this.#reaskInterval;
    for (;;) {
      const changed = this.#changed.promise;
      const wake = Math.min(nextAsk, deadline) - Date.now();
      const timedOut = await waitOrTimeout(changed, wake, this.#closedSignal.signal);
      const found = this.#answer(fp, refusedVersion);
      if (found) return found;
      if (!timedOut) continue;
      if (Date.now() >= deadline) {
        throw new AuthbusError(
          "timeout",
          `no new token for ${this.key} within ${this.#waitTimeout} ms after a 401 of token ${fp}; check that refreshers are running and the token endpoint answers, or raise waitTimeout`,
        );
      }
      await this.#requestToken().catch(() => undefined); // errors are the refreshers' business here
      nextAsk = Date.now() + this.#reaskInterval;
    }
  }

  /**
   * The one place an event is published into the events stream: a JetStream
   * publish with the protocol's Nats-Msg-Id, whose PubAck says whether the
   * stream dropped it as a duplicate.
   */
  async #publish(t: EventType, fp: string, data: object, traceparent?: string): Promise<ReportAck> {
    const subject = this.#subj.event(t);
    const body = encodeEvent(t, this.#key, `authbus/client-js/${this.#runtime}`, data);
    let hdrs: MsgHdrs | undefined;
    if (traceparent) {
      hdrs = natsHeaders();
      hdrs.set("traceparent", traceparent);
    }
    try {
      const ack = await this.#js.publish(subject, body, {
        msgID: msgId(t, this.#key, fp),
        timeout: this.#requestTimeout,
        ...(hdrs ? { headers: hdrs } : {}),
      });
      return { stream: ack.stream, seq: ack.seq, duplicate: ack.duplicate };
    } catch (err) {
      const name = (err as Error)?.name;
      if (name === "JetStreamNotEnabled" || isNoResponders(err)) {
        throw new AuthbusError(
          "unavailable",
          `publishing ${subject}: no stream captures it; start a refresher (cmd/refresher), which creates the events stream, or check the subject prefix`,
          { cause: err },
        );
      }
      throw new AuthbusError(
        "unavailable",
        `publishing ${subject}: ${errText(err)}; check the NATS connection, the user's publish permissions and its inbox prefix (${inboxPrefix(this.#key.tenant)})`,
        { cause: err },
      );
    }
  }

  /** Reads auth.token, sharing a request already in flight. */
  #fetch(): Promise<void> {
    this.#fetching ??= this.#own(this.#requestToken()).finally(() => {
      this.#fetching = undefined;
    });
    return this.#fetching;
  }

  /** One auth.token request; applies what it answers. */
  async #requestToken(): Promise<void> {
    this.#checkOpen("requesting the token");
    const since = this.#version;
    const subject = this.#subj.token;
    let reply: Msg;
    try {
      reply = await this.#own(this.#nc.request(subject, Empty, { timeout: this.#requestTimeout }));
    } catch (err) {
      throw this.#requestError(subject, err);
    }
    const status = reply.headers?.get("Nats-Service-Error-Code") ?? "";
    if (status !== "") {
      const e = errorReply(status, reply.headers?.get("Nats-Service-Error") ?? "", reply.data);
      switch (e.error) {
        case "needs_reauth":
          this.#applyReauth({ reason: e.reason || "unknown", description: e.description, version: since }, true);
          return; // the state now says it, or says something newer
        case "not_found":
          throw new AuthbusError("not_found", `token for ${this.key}: ${e.description}`);
        case "invalid_request":
        case "forbidden":
          throw new AuthbusError("refused", `token for ${this.key}: the service answered ${status} (${e.description}); retrying will not help`);
        default:
          throw new AuthbusError("unavailable", `token for ${this.key}: the service answered ${status} (${e.description}); retry later`);
      }
    }
    let tok: Token;
    try {
      tok = tokenFromData(parseJSON(reply.data, "auth.token reply"), `auth.token reply for ${this.key}`);
    } catch (err) {
      throw new AuthbusError(
        "unavailable",
        `${errText(err)}; check that the refreshers speak this protocol version`,
        { cause: err },
      );
    }
    this.#applyToken(tok);
  }

  #requestError(subject: string, err: unknown): AuthbusError {
    if (this.#closed) return new AuthbusError("closed", `token for ${this.key}: the token source is closed`, { cause: err });
    if (isNoResponders(err)) {
      return new AuthbusError("unavailable", `no refresher serves ${subject}; start one (cmd/refresher) on this NATS deployment`, { cause: err });
    }
    if ((err as Error)?.name === "TimeoutError") {
      return new AuthbusError(
        "unavailable",
        `no answer from ${subject} within ${this.#requestTimeout} ms; check the refreshers, and the user's permissions for the subject and its inbox prefix ${inboxPrefix(this.#key.tenant)} (a denied request looks like a timeout)`,
        { cause: err },
      );
    }
    return new AuthbusError(
      "unavailable",
      `requesting ${subject}: ${errText(err)}; check the user's permissions and that the connection uses the inbox prefix ${inboxPrefix(this.#key.tenant)}`,
      { cause: err },
    );
  }
}

/** A promise and the function that resolves it (Promise.withResolvers needs Node 22). */
function latch(): { promise: Promise<void>; fire: () => void } {
  let fire!: () => void;
  const promise = new Promise<void>((resolve) => {
    fire = resolve;
  });
  return { promise, fire };
}

function optionProblems(o: TokenSourceOptions): string[] {
  const p: string[] = [];
  for (const name of ["requestTimeout", "waitTimeout", "reaskInterval"] as const) {
    const v = o[name];
    if (v !== undefined && !(Number.isFinite(v) && v > 0)) p.push(`${name} is ${v}; pass a positive number of milliseconds, or leave it out`);
  }
  if (o.runtime !== undefined && (o.runtime === "" || Buffer.byteLength(o.runtime) > MAX_RUNTIME_LEN)) {
    p.push(`runtime must be 1-${MAX_RUNTIME_LEN} bytes`);
  }
  return p;
}

function expired(t: Token): boolean {
  return t.expiresAt !== undefined && Date.now() >= t.expiresAt.getTime();
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isNoResponders(err: unknown): boolean {
  const e = err as { isNoResponders?: () => boolean; name?: string } | undefined;
  return e?.name === "NoRespondersError" || (typeof e?.isNoResponders === "function" && e.isNoResponders());
}

/**
 * waitOrTimeout resolves true after ms, false when p settles first; it
 * rejects with the reason of signal. It leaves no timer behind.
 */
async function waitOrTimeout(p: Promise<void>, ms: number, signal: AbortSignal): Promise<boolean> {
  signal.throwIfAborted();
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  try {
    return await Promise.race([
      p.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), Math.max(0, ms));
      }),
      new Promise<boolean>((_, reject) => {
        onAbort = () => reject(signal.reason);
        signal.addEventListener("abort", onAbort, { once: true });
      }),
    ]);
  } finally {
    clearTimeout(timer);
    if (onAbort) signal.removeEventListener("abort", onAbort);
  }
}

/** p, or the reason of signal if it aborts first. */
function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(signal.reason);
  let onAbort: (() => void) | undefined;
  return Promise.race([
    p,
    new Promise<T>((_, reject) => {
      onAbort = () => reject(signal.reason);
      signal.addEventListener("abort", onAbort, { once: true });
    }),
  ]).finally(() => signal.removeEventListener("abort", onAbort as () => void));
}
