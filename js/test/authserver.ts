// A test OAuth 2.0 authorization server that answers a refresh the way real
// ones do, and a protected resource that accepts only its live access
// tokens. Every counter is exact: a call is counted before it is answered.

import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export const CLIENT_ID = "agent-runtime";
export const CLIENT_SECRET = "test-client-secret";

/** Tokens of a new grant, as an interactive login hands them to a client. */
export interface Login {
  accessToken: string;
  refreshToken: string;
  expiresIn: number;
}

interface Grant {
  id: number;
  revoked: boolean;
}

/**
 * AuthServer rotates refresh tokens (every refresh returns a new one and
 * spends the old), answers a spent refresh token with `400 invalid_grant`
 * and counts it as a reuse, can revoke a grant (its refresh token and all of
 * its access tokens stop working), and gives every access token
 * `expires_in` seconds, which a test can cut short with expire().
 */
export class AuthServer {
  /** Successful refreshes. */
  refreshes = 0;
  /** Presentations of a refresh token that was already redeemed. */
  reuses = 0;
  /** Refreshes refused because the grant was revoked. */
  revokedRefreshes = 0;
  /** expires_in of every token issued. */
  expiresIn = 3600;

  readonly #server: Server;
  readonly #grants = new Map<number, Grant>();
  readonly #access = new Map<string, { grant: Grant; expired: boolean }>();
  readonly #refresh = new Map<string, { grant: Grant; spent: boolean }>();
  #nextGrant = 1;

  private constructor() {
    this.#server = createServer((req, res) => {
      this.#handle(req, res).catch((err) => {
        res.writeHead(500).end(String(err));
      });
    });
  }

  static async start(): Promise<AuthServer> {
    const as = new AuthServer();
    await listen(as.#server);
    return as;
  }

  get tokenEndpoint(): string {
    return `${baseURL(this.#server)}/token`;
  }

  /** A new grant, as a person's login creates one. */
  issue(): Login {
    const grant = { id: this.#nextGrant++, revoked: false };
    this.#grants.set(grant.id, grant);
    return this.#mint(grant);
  }

  /** Revokes the grant of a token (access or refresh): both kinds stop working. */
  revoke(token: string): void {
    const g = this.#access.get(token)?.grant ?? this.#refresh.get(token)?.grant;
    if (!g) throw new Error("revoke: unknown token");
    g.revoked = true;
  }

  /** Makes every access token issued so far invalid, as if its lifetime had passed; refresh tokens stay good. */
  expireAll(): void {
    for (const a of this.#access.values()) a.expired = true;
  }

  /** Whether a protected resource should accept accessToken. */
  valid(accessToken: string): boolean {
    const a = this.#access.get(accessToken);
    return a !== undefined && !a.expired && !a.grant.revoked;
  }

  async close(): Promise<void> {
    await closeServer(this.#server);
  }

  #mint(grant: Grant): Login {
    const accessToken = `at-${randomBytes(12).toString("hex")}`;
    const refreshToken = `rt-${randomBytes(12).toString("hex")}`;
    this.#access.set(accessToken, { grant, expired: false });
    this.#refresh.set(refreshToken, { grant, spent: false });
    return { accessToken, refreshToken, expiresIn: this.expiresIn };
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (req.method !== "POST" || req.url !== "/token") {
      res.writeHead(404).end();
      return;
    }
    const form = new URLSearchParams(await readBody(req));
    const basic = req.headers.authorization?.match(/^Basic (.+)$/)?.[1];
    const [id, secret] = basic
      ? Buffer.from(basic, "base64").toString().split(":").map(decodeURIComponent)
      : [form.get("client_id"), form.get("client_secret")];
    if (id !== CLIENT_ID || secret !== CLIENT_SECRET) {
      return oauthError(res, 401, "invalid_client", "client authentication failed");
    }
    if (form.get("grant_type") !== "refresh_token") {
      return oauthError(res, 400, "unsupported_grant_type", "only refresh_token is supported");
    }
    const rt = this.#refresh.get(form.get("refresh_token") ?? "");
    if (!rt) return oauthError(res, 400, "invalid_grant", "unknown refresh token");
    if (rt.grant.revoked) {
      this.revokedRefreshes++;
      return oauthError(res, 400, "invalid_grant", "grant revoked");
    }
    if (rt.spent) {
      this.reuses++;
      return oauthError(res, 400, "invalid_grant", "refresh token already used");
    }
    rt.spent = true;
    this.refreshes++;
    const t = this.#mint(rt.grant);
    res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
    res.end(JSON.stringify({ access_token: t.accessToken, token_type: "Bearer", expires_in: t.expiresIn, refresh_token: t.refreshToken }));
  }
}

function oauthError(res: ServerResponse, status: number, error: string, description: string): void {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify({ error, error_description: description }));
}

/** What the protected resource saw of one request. */
export interface Seen {
  status: number;
  accessToken: string;
  body: string;
}

/**
 * Resource is a protected resource: it answers 200 (echoing the request
 * body) to a bearer token the authorization server finds valid, and 401
 * with a WWW-Authenticate challenge to anything else. refuseAll makes it
 * refuse every token.
 */
export class Resource {
  readonly seen: Seen[] = [];
  refuseAll = false;
  readonly #server: Server;

  private constructor(as: AuthServer) {
    this.#server = createServer((req, res) => {
      void readBody(req).then((body) => {
        const tok = req.headers.authorization?.match(/^Bearer (.+)$/)?.[1] ?? "";
        const ok = !this.refuseAll && as.valid(tok);
        this.seen.push({ status: ok ? 200 : 401, accessToken: tok, body });
        if (!ok) {
          res.writeHead(401, { "www-authenticate": 'Bearer error="invalid_token"' }).end("unauthorized");
          return;
        }
        res.writeHead(200, { "content-type": "text/plain" }).end(body);
      });
    });
  }

  static async start(as: AuthServer): Promise<Resource> {
    const r = new Resource(as);
    await listen(r.#server);
    return r;
  }

  get url(): string {
    return `${baseURL(this.#server)}/api`;
  }

  async close(): Promise<void> {
    await closeServer(this.#server);
  }
}

export async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of req) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

export function listen(server: Server): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
}

export function baseURL(server: Server): string {
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

export function closeServer(server: Server): Promise<void> {
  server.closeAllConnections();
  return new Promise((resolve) => server.close(() => resolve()));
}
