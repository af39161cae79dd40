// The authbus wire protocol as this client speaks it: credential keys,
// subjects, fingerprints, the CloudEvents envelope and the token service's
// replies. docs/protocol.md is the normative text; the Go package `events`
// is its reference implementation, and the rules below follow it.

import { createHash, randomUUID } from "node:crypto";

/** The longest `runtime` of an auth.401 event, in bytes (docs/protocol.md). */
export const MAX_RUNTIME_LEN = 256;
/** The longest `url` of an auth.401 event, in bytes. */
export const MAX_URL_LEN = 2048;
/** The largest encoded event, in bytes. */
export const MAX_EVENT_SIZE = 16 << 10;
const MAX_ACCESS_TOKEN_SIZE = 12 << 10;
const MAX_TOKEN_TYPE_LEN = 128;

const keyPart = /^[A-Za-z0-9_-]{1,64}$/;
const prefixPattern = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;
const rfc3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

/** A credential key, `tenant.user.server`, split into its parts. */
export interface Key {
  readonly tenant: string;
  readonly user: string;
  readonly server: string;
  /** The key as written on the wire, `tenant.user.server`. */
  readonly text: string;
}

/**
 * parseKey checks a credential key and splits it. It throws a TypeError that
 * names the bad part and the rule.
 */
export function parseKey(key: string): Key {
  const rule = "keys are tenant.user.server, each [A-Za-z0-9_-]{1,64}";
  if (typeof key !== "string") {
    throw new TypeError(`credential key: got ${typeof key}, want a string; ${rule}`);
  }
  const parts = key.split(".");
  if (parts.length !== 3) {
    throw new TypeError(`credential key ${JSON.stringify(key)}: has ${parts.length} parts, want 3; ${rule}`);
  }
  const names = ["tenant", "user", "server"];
  parts.forEach((p, i) => {
    if (!keyPart.test(p)) {
      const what = p === "" ? "is empty" : `is ${JSON.stringify(p)}`;
      throw new TypeError(`credential key ${JSON.stringify(key)}: ${names[i]} (part ${i + 1}) ${what}; ${rule}`);
    }
  });
  const [tenant, user, server] = parts as [string, string, string];
  return { tenant, user, server, text: key };
}

/**
 * inboxPrefix returns the inbox prefix a tenant's NATS connection must use,
 * `_INBOX_<tenant>`, for a tenant name or a credential key. With per-tenant
 * NATS permissions a tenant's user may subscribe only to its own inboxes, and
 * token requests and JetStream publish acknowledgements are answered there:
 * `connect({ servers, inboxPrefix: inboxPrefix("acme.alice.github") })`.
 */
export function inboxPrefix(tenantOrKey: string): string {
  const tenant = tenantOrKey.includes(".") ? parseKey(tenantOrKey).tenant : tenantOrKey;
  if (!keyPart.test(tenant)) {
    throw new TypeError(`tenant ${JSON.stringify(tenant)}: must be 1-64 characters of [A-Za-z0-9_-]`);
  }
  return `_INBOX_${tenant}`;
}

/** The event types; the CloudEvents `type` is fixed whatever the prefix. */
export type EventType = "auth.401" | "auth.expiring" | "auth.rotated" | "auth.needs_reauth";

/** The subjects of one key under a subject prefix. */
export class Subjects {
  readonly prefix: string;
  readonly key: Key;

  constructor(prefix: string, key: Key) {
    if (!prefixPattern.test(prefix)) {
      throw new TypeError(
        `subject prefix ${JSON.stringify(prefix)}: use one or more dot-separated tokens of [A-Za-z0-9_-], such as "auth" (the default) or "acme.auth"`,
      );
    }
    this.prefix = prefix;
    this.key = key;
  }

  /** The subject of an event type, such as `auth.rotated.acme.alice.github`. */
  event(t: EventType): string {
    return `${this.prefix}.${t.slice("auth.".length)}.${this.key.text}`;
  }

  /** The token service's subject, `auth.token.<key>`. */
  get token(): string {
    return `${this.prefix}.token.${this.key.text}`;
  }

  /** The registration service's subject, `auth.register.<key>`. */
  get register(): string {
    return `${this.prefix}.register.${this.key.text}`;
  }
}

/**
 * fingerprint returns the first 16 lowercase hex characters of the SHA-256
 * of an access token: what events, logs and errors carry instead of the
 * token.
 */
export function fingerprint(accessToken: string): string {
  return createHash("sha256").update(accessToken, "utf8").digest("hex").slice(0, 16);
}

/**
 * msgId is the `Nats-Msg-Id` of an inbound event, `{type}:{key}:{fingerprint}`:
 * the events stream drops a second publish with the same id inside its
 * duplicate window, which turns a storm of reports into one refresh.
 */
export function msgId(t: EventType, key: Key, fp: string): string {
  return `${t}:${key.text}:${fp}`;
}

/**
 * A token as authbus announces it (auth.rotated data, auth.token reply). It
 * holds a live access token: never log it; log `fingerprint` instead.
 */
export interface Token {
  readonly accessToken: string;
  /** The scheme of the Authorization header as the server gave it ("Bearer", or "bearer" from Dex). */
  readonly tokenType: string;
  /** When the token expires; undefined when the server gave no lifetime. */
  readonly expiresAt: Date | undefined;
  readonly fingerprint: string;
  /** The credential's generation: 1 at the first registration, +1 on every rotation and re-registration. */
  readonly version: number;
}

/** The data of an auth.needs_reauth event. */
export interface NeedsReauth {
  readonly reason: string;
  readonly description: string;
  readonly version: number;
}

/** Thrown for a message that breaks the protocol; the text names the field. */
export class ProtocolError extends Error {
  override name = "ProtocolError";
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function printableASCII(s: string): boolean {
  return /^[\x20-\x7e]*$/.test(s);
}

function parseTime(v: unknown, field: string, problems: string[]): Date | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== "string" || !rfc3339.test(v) || Number.isNaN(Date.parse(v))) {
    problems.push(`${field} is not an RFC 3339 time`);
    return undefined;
  }
  return new Date(v);
}

function checkVersion(v: unknown, problems: string[]): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 1) {
    problems.push("version must be an integer ≥ 1");
    return 0;
  }
  return v;
}

function fail(what: string, problems: string[]): never {
  throw new ProtocolError(`${what}: ${problems.join("; ")}`);
}

/**
 * tokenFromData validates the data of an auth.rotated event or the body of
 * an auth.token reply. Unknown members are ignored, as the protocol's
 * compatibility rule requires.
 */
export function tokenFromData(data: unknown, what: string): Token {
  if (!isObject(data)) fail(what, ["data is not a JSON object"]);
  const problems: string[] = [];
  const at = data.access_token;
  if (typeof at !== "string" || at === "") problems.push("access_token is missing");
  else if (at.length > MAX_ACCESS_TOKEN_SIZE || !printableASCII(at)) {
    problems.push("access_token is not printable ASCII of at most 12 KiB");
  }
  const tt = data.token_type;
  if (typeof tt !== "string" || tt === "" || tt.length > MAX_TOKEN_TYPE_LEN || !printableASCII(tt) || tt.includes(" ")) {
    problems.push("token_type is not a single word such as \"Bearer\"");
  }
  const expiresAt = parseTime(data.expires_at, "expires_at", problems);
  const fp = data.fingerprint;
  if (typeof at === "string" && fp !== fingerprint(at)) problems.push("fingerprint does not match access_token");
  const version = checkVersion(data.version, problems);
  if (problems.length > 0) fail(what, problems);
  return { accessToken: at as string, tokenType: tt as string, expiresAt, fingerprint: fp as string, version };
}

function needsReauthFromData(data: unknown, what: string): NeedsReauth {
  if (!isObject(data)) fail(what, ["data is not a JSON object"]);
  const problems: string[] = [];
  if (typeof data.reason !== "string" || data.reason === "") problems.push("reason is missing");
  const desc = data.error_description;
  if (desc !== undefined && typeof desc !== "string") problems.push("error_description is not a string");
  const version = checkVersion(data.version, problems);
  if (problems.length > 0) fail(what, problems);
  return { reason: data.reason as string, description: (desc as string | undefined) ?? "", version };
}

/**
 * parseJSON parses a message body and refuses a member name that appears
 * twice in one object, as every authbus decoder does (JSON.parse would keep
 * the last one silently, so two decoders could read different tokens).
 */
export function parseJSON(body: Uint8Array | string, what: string): unknown {
  let text: string;
  let v: unknown;
  try {
    text = typeof body === "string" ? body : new TextDecoder("utf-8", { fatal: true }).decode(body);
  } catch {
    throw new ProtocolError(`${what}: not valid UTF-8`);
  }
  try {
    v = JSON.parse(text);
  } catch {
    // Not JSON.parse's message: V8 quotes the text there, which may hold a token.
    throw new ProtocolError(`${what}: not valid JSON`);
  }
  const dup = duplicateMember(text);
  if (dup !== undefined) throw new ProtocolError(`${what}: member ${JSON.stringify(dup)} appears twice`);
  return v;
}

// duplicateMember scans text, already known to be valid JSON, and returns
// the first member name repeated within one object, or undefined.
function duplicateMember(text: string): string | undefined {
  const stack: { names: Set<string> | undefined; wantName: boolean }[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    const top = stack[stack.length - 1];
    if (c === "{") stack.push({ names: new Set(), wantName: true });
    else if (c === "[") stack.push({ names: undefined, wantName: false });
    else if (c === "}" || c === "]") stack.pop();
    else if (c === "," && top?.names) top.wantName = true;
    else if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      if (top?.names && top.wantName) {
        const name = JSON.parse(text.slice(i, j + 1)) as string;
        if (top.names.has(name)) return name;
        top.names.add(name);
        top.wantName = false;
      }
      i = j;
    }
  }
  return undefined;
}

/** A decoded auth.rotated or auth.needs_reauth event. */
export type InboundEvent =
  | { readonly type: "auth.rotated"; readonly token: Token }
  | { readonly type: "auth.needs_reauth"; readonly needsReauth: NeedsReauth };

/**
 * decodeEvent validates a CloudEvents structured-JSON event received on the
 * subject of type t for key (the NATS subject is authoritative: an event
 * whose `subject` attribute names another key is refused).
 */
export function decodeEvent(t: "auth.rotated" | "auth.needs_reauth", key: Key, body: Uint8Array): InboundEvent {
  const what = `${t} event for ${key.text}`;
  if (body.length > MAX_EVENT_SIZE) fail(what, [`it is ${body.length} bytes, over ${MAX_EVENT_SIZE}`]);
  const ev = parseJSON(body, what);
  if (!isObject(ev)) fail(what, ["not a JSON object"]);
  const problems: string[] = [];
  if (ev.specversion !== "1.0") problems.push('specversion is not "1.0"');
  if (typeof ev.id !== "string" || ev.id === "") problems.push("id is missing");
  if (typeof ev.source !== "string" || ev.source === "") problems.push("source is missing");
  if (ev.type !== t) problems.push(`type is ${JSON.stringify(ev.type)}, not ${t}`);
  if (ev.time === undefined) problems.push("time is missing");
  else parseTime(ev.time, "time", problems);
  if (ev.subject !== key.text) problems.push(`subject is ${JSON.stringify(ev.subject)}, not the key of the NATS subject`);
  const ct = ev.datacontenttype;
  if (ct !== undefined && ct !== "application/json") problems.push("datacontenttype is not application/json");
  if (problems.length > 0) fail(what, problems);
  return t === "auth.rotated"
    ? { type: t, token: tokenFromData(ev.data, what) }
    : { type: t, needsReauth: needsReauthFromData(ev.data, what) };
}

/** The data of an auth.401 event. */
export interface Unauthorized {
  fingerprint: string;
  runtime: string;
  status?: number;
  url?: string;
  observed_at?: string;
}

/**
 * encodeEvent returns the CloudEvents structured JSON of an event for key
 * from source, with a new unique id and the current time in UTC.
 */
export function encodeEvent(t: EventType, key: Key, source: string, data: object): Uint8Array {
  const body = JSON.stringify({
    specversion: "1.0",
    id: randomUUID(),
    source,
    type: t,
    time: new Date().toISOString(),
    subject: key.text,
    datacontenttype: "application/json",
    data,
  });
  const bytes = new TextEncoder().encode(body);
  if (bytes.length > MAX_EVENT_SIZE) {
    throw new ProtocolError(`${t} event for ${key.text}: it is ${bytes.length} bytes, over ${MAX_EVENT_SIZE}; shorten the runtime name or the URL`);
  }
  return bytes;
}

/** The JSON body of an error reply (`{error, error_description, reason}`). */
export interface ErrorReply {
  readonly error: string;
  readonly description: string;
  readonly reason: string;
}

/** The error codes by `Nats-Service-Error-Code`; any other status is "unavailable". */
const codeOfStatus: Record<string, string> = {
  "400": "invalid_request",
  "403": "forbidden",
  "404": "not_found",
  "409": "needs_reauth",
  "503": "unavailable",
};

/**
 * errorReply reads an error reply: the status in the `Nats-Service-Error-Code`
 * header decides, and the body adds the description and the re-auth reason
 * when it parses (the headers alone are enough).
 */
export function errorReply(status: string, headerDescription: string, body: Uint8Array): ErrorReply {
  const error = codeOfStatus[status] ?? "unavailable";
  let description = headerDescription;
  let reason = "";
  try {
    const v = parseJSON(body, "error reply");
    if (isObject(v)) {
      if (typeof v.error_description === "string" && v.error_description !== "") description = v.error_description;
      if (typeof v.reason === "string") reason = v.reason;
    }
  } catch {
    // The headers carry the code and the description already.
  }
  return { error, description, reason };
}

/**
 * cleanURL is a URL without user info, query and fragment, which may hold
 * secrets, cut to the protocol's limit: what an auth.401 event may carry.
 */
export function cleanURL(u: string | URL): string {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    return "";
  }
  url.username = "";
  url.password = "";
  url.search = "";
  url.hash = "";
  const s = url.toString();
  return s.length > MAX_URL_LEN ? s.slice(0, MAX_URL_LEN) : s;
}

/**
 * authScheme is the Authorization scheme of a token type, with the usual
 * spellings normalised as Go's x/oauth2 does ("bearer" from Dex → "Bearer").
 */
export function authScheme(tokenType: string): string {
  switch (tokenType.toLowerCase()) {
    case "bearer":
      return "Bearer";
    case "mac":
      return "MAC";
    case "basic":
      return "Basic";
    default:
      return tokenType;
  }
}
