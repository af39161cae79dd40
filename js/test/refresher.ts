// Builds the real refresher binary from this repository and runs it with its
// embedded NATS server on a free loopback port, a temporary data directory,
// and the NATS users `refresher permissions` prints: the refreshers' two, a
// runtime user of tenant "acme" (so every test runs under the permissions a
// real tenant gets), and an unrestricted test user that can forge events.

import { execFile, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createWriteStream } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { connect, type NatsConnection, type NodeConnectionOptions } from "@nats-io/transport-node";

import { inboxPrefix } from "../src/index.js";
import { CLIENT_ID, CLIENT_SECRET, type AuthServer, type Login } from "./authserver.js";

const run = promisify(execFile);

// dist/test/refresher.js → the repository root.
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

export const TENANT = "acme";

export class Refresher {
  readonly url: string;
  readonly #child: ChildProcess;
  readonly #dir: string;
  readonly #passwords: { tenant: string; admin: string };
  #exited: Promise<void>;

  private constructor(url: string, child: ChildProcess, dir: string, passwords: { tenant: string; admin: string }, exited: Promise<void>) {
    this.url = url;
    this.#child = child;
    this.#dir = dir;
    this.#passwords = passwords;
    this.#exited = exited;
  }

  /** Builds and starts a refresher; stop() it when done. */
  static async start(): Promise<Refresher> {
    const dir = await mkdtemp(join(tmpdir(), "authbus-js-test-"));
    const bin = join(dir, "refresher");
    await run("go", ["build", "-o", bin, "./cmd/refresher"], { cwd: repoRoot });
    const users = await Promise.all([
      run(bin, ["permissions", "--refresher"]),
      run(bin, ["permissions", "--serving", "--tenant", TENANT]),
      run(bin, ["permissions", "--tenant", TENANT]),
    ]);
    const pw = () => randomBytes(12).toString("hex");
    const passwords = { refresher: pw(), serve: pw(), tenant: pw(), admin: pw() };
    await writeFile(
      join(dir, "nats.conf"),
      `authorization {\n  users: [\n${users.map((u) => u.stdout).join("\n")}\n    { user: "test-admin", password: $AUTHBUS_TEST_ADMIN_PASSWORD }\n  ]\n}\n`,
    );
    const logPath = join(dir, "refresher.log");
    const log = createWriteStream(logPath);
    const child = spawn(
      bin,
      ["--listen", "127.0.0.1:0", "--data-dir", join(dir, "data"), "--nats-config", join(dir, "nats.conf"),
        "--nats-user", "authbus-refresher", "--nats-serve-user", "authbus-serve",
        // With users configured, loopback token endpoints must be allowed
        // explicitly: the test authorization server is one.
        "--allow-loopback-token-hosts",
        "--metrics-addr", "", "--log-format", "json", "--log-level", "info"],
      {
        env: {
          ...process.env,
          NATS_PASSWORD: passwords.refresher,
          NATS_SERVE_PASSWORD: passwords.serve,
          AUTHBUS_PASSWORD_REFRESHER: passwords.refresher,
          AUTHBUS_PASSWORD_SERVE: passwords.serve,
          [`AUTHBUS_PASSWORD_${TENANT.toUpperCase()}`]: passwords.tenant,
          AUTHBUS_TEST_ADMIN_PASSWORD: passwords.admin,
        },
        stdio: ["ignore", "ignore", "pipe"],
      },
    );
    const exited = new Promise<void>((res) => child.once("exit", () => res()));
    let url = "";
    const ready = new Promise<void>((res, rej) => {
      let buf = "";
      child.stderr!.on("data", (chunk: Buffer) => {
        log.write(chunk);
        buf += chunk.toString();
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          let rec: { msg?: string; client_url?: string };
          try {
            rec = JSON.parse(line);
          } catch {
            continue;
          }
          if (rec.msg === "embedded NATS server running" && rec.client_url) url = rec.client_url;
          if (rec.msg === "refresher ready") res();
        }
      });
      child.once("exit", (code) => rej(new Error(`the refresher exited (${code}) before it was ready`)));
    });
    try {
      await withDeadline(ready, 30_000, "the refresher did not get ready within 30 s");
    } catch (err) {
      child.kill("SIGKILL");
      await exited;
      const tail = (await readFile(logPath, "utf8").catch(() => "")).split("\n").slice(-20).join("\n");
      await rm(dir, { recursive: true, force: true });
      throw new Error(`${(err as Error).message}; its log ends:\n${tail}`);
    }
    if (!url) throw new Error("the refresher did not log its NATS client URL");
    return new Refresher(url, child, dir, passwords, exited);
  }

  /** A connection of tenant acme's runtime user, with the tenant's inbox prefix. */
  connectTenant(opts: Partial<NodeConnectionOptions> = {}): Promise<NatsConnection> {
    return connect({
      servers: this.url,
      user: `${TENANT}-runtime`,
      pass: this.#passwords.tenant,
      inboxPrefix: inboxPrefix(TENANT),
      reconnectTimeWait: 50,
      maxReconnectAttempts: -1,
      ...opts,
    });
  }

  /** The environment a separate runtime process of tenant acme connects with. */
  tenantEnv(): Record<string, string> {
    return { NATS_URL: this.url, NATS_USER: `${TENANT}-runtime`, NATS_PASSWORD: this.#passwords.tenant };
  }

  /** A connection without restrictions, to forge events and watch everything. */
  connectAdmin(): Promise<NatsConnection> {
    return connect({ servers: this.url, user: "test-admin", pass: this.#passwords.admin });
  }

  async stop(): Promise<void> {
    this.#child.kill("SIGTERM");
    const timer = setTimeout(() => this.#child.kill("SIGKILL"), 15_000);
    await this.#exited;
    clearTimeout(timer);
    await rm(this.#dir, { recursive: true, force: true });
  }
}

/** Registers a login's tokens under key, as `publisher register` does; returns the version. */
export async function register(nc: NatsConnection, key: string, as: AuthServer, login: Login): Promise<number> {
  const body = {
    token: { access_token: login.accessToken, token_type: "Bearer", refresh_token: login.refreshToken, expires_in: login.expiresIn },
    token_endpoint: as.tokenEndpoint,
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    auth_style: "basic",
  };
  const reply = await nc.request(`auth.register.${key}`, JSON.stringify(body), { timeout: 5_000 });
  const code = reply.headers?.get("Nats-Service-Error-Code");
  if (code) throw new Error(`register ${key}: ${code} ${reply.headers?.get("Nats-Service-Error")}`);
  return (reply.json() as { version: number }).version;
}

/** Rejects with message if p has not settled within ms. */
export async function withDeadline<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => (timer = setTimeout(() => rej(new Error(message)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls cond until it holds, or fails with message after ms. */
export async function eventually(cond: () => boolean, ms: number, message: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${message} (after ${ms} ms)`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

let keySeq = 0;

/** A key of tenant acme no other test of this process uses. */
export function uniqueKey(server: string): string {
  return `${TENANT}.u${process.pid}x${++keySeq}.${server}`;
}
