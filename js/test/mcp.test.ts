import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, test } from "node:test";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import type { NatsConnection } from "@nats-io/transport-node";

import { NeedsReauthError, TokenSource } from "../src/index.js";
import { AuthbusUnauthorizedError, authbusTransport } from "../src/mcp.js";
import { AuthServer } from "./authserver.js";
import { ProtectedMcpServer } from "./mcpserver.js";
import { eventually, Refresher, register, uniqueKey } from "./refresher.js";

let refresher: Refresher;
let as: AuthServer;
let mcp: ProtectedMcpServer;
let nc: NatsConnection;

before(async () => {
  [refresher, as] = await Promise.all([Refresher.start(), AuthServer.start()]);
  mcp = await ProtectedMcpServer.start(as);
  nc = await refresher.connectTenant();
});

after(async () => {
  await nc?.close();
  await Promise.all([refresher?.stop(), as?.close(), mcp?.close()]);
});

test("MCP clients on the authbus transport follow a rotation, survive an expiry with one refresh for all sessions, and see a revoked grant as UnauthorizedError", { timeout: 60_000 }, async (t) => {
  const key = uniqueKey("mcp");
  const login1 = as.issue();
  await register(nc, key, as, login1);
  const source = await TokenSource.start(nc, key, { runtime: "mcp-test" });
  t.after(() => source.close());

  // Three sessions of one runtime, on one token source.
  const clients = await Promise.all(
    [1, 2, 3].map(async (i) => {
      const c = new Client({ name: `agent-${i}`, version: "1.0.0" });
      await c.connect(authbusTransport(source, mcp.url));
      return c;
    }),
  );
  t.after(() => Promise.all(clients.map((c) => c.close())));
  assert.equal(mcp.sessions, 3);
  const echo = async (c: Client, text: string) => {
    const r = await c.callTool({ name: "echo", arguments: { text } });
    return (r.content as { type: string; text: string }[])[0]?.text;
  };
  const callAll = (text: string) => Promise.all(clients.map((c, i) => echo(c, `${text}-${i}`)));
  assert.deepEqual(await callAll("first"), ["first-0", "first-1", "first-2"]);
  assert.ok(mcp.accepted.every((tok) => tok === login1.accessToken));

  // Mid-session, a person logs in again and the new tokens are registered;
  // the old grant is revoked, so a client still sending the old token would
  // get 401 and cost a refresh.
  const login2 = as.issue();
  as.revoke(login1.accessToken);
  await register(nc, key, as, login2);
  await eventually(() => source.current?.accessToken === login2.accessToken, 10_000, "the rotation did not reach the source");
  const mark = mcp.accepted.length;
  assert.deepEqual(await callAll("rotated"), ["rotated-0", "rotated-1", "rotated-2"]);
  assert.ok(mcp.accepted.slice(mark).every((tok) => tok === login2.accessToken));

  // The token expires: every session gets 401 at once; one report, one
  // refresh, and each request is replayed with the new token.
  as.expireAll();
  const refused = mcp.refused.length;
  assert.deepEqual(await callAll("expired"), ["expired-0", "expired-1", "expired-2"]);
  assert.ok(mcp.refused.length > refused, "no session met the expiry");
  assert.notEqual(source.current?.accessToken, login2.accessToken);
  assert.equal(mcp.accepted.at(-1), source.current?.accessToken);
  assert.equal(as.refreshes, 1, "one refresh in total for all sessions");
  assert.equal(as.reuses, 0);
  assert.equal(mcp.sessions, 3, "the sessions survived");

  // The grant is revoked: the SDK's authorization error, carrying the reason.
  as.revoke(source.current!.accessToken);
  const err = await echo(clients[0]!, "revoked").then(
    () => assert.fail("the call succeeded on a revoked grant"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof UnauthorizedError, `got ${err}`);
  assert.ok(err instanceof AuthbusUnauthorizedError);
  assert.ok(err.needsReauth instanceof NeedsReauthError);
  assert.equal(err.needsReauth.reason, "invalid_grant");
  await assert.rejects(echo(clients[1]!, "again"), UnauthorizedError);
  assert.equal(as.refreshes, 1);
});

test("the worked example of docs/typescript.md runs, and the document shows it as it is", { timeout: 60_000 }, async () => {
  const here = dirname(fileURLToPath(import.meta.url));
  const login = as.issue();
  await register(nc, "acme.alice.github", as, login);
  const { stdout } = await promisify(execFile)(process.execPath, [resolve(here, "../examples/mcp-agent.js")], {
    env: { ...process.env, ...refresher.tenantEnv(), MCP_URL: mcp.url.toString() },
  });
  assert.match(stdout, /hello/);
  assert.ok(mcp.accepted.includes(login.accessToken));

  const source = readFileSync(resolve(here, "../../examples/mcp-agent.ts"), "utf8");
  const doc = readFileSync(resolve(here, "../../../docs/typescript.md"), "utf8");
  const body = source.slice(source.indexOf("import { UnauthorizedError }"));
  assert.ok(doc.includes(body), "docs/typescript.md does not show js/examples/mcp-agent.ts as it is; copy it from the import lines on");
});
