import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import type { NatsConnection } from "@nats-io/transport-node";

import { AuthbusError, fingerprint, NeedsReauthError, TokenSource } from "../src/index.js";
import { AuthServer } from "./authserver.js";
import { eventually, Refresher, register, TENANT, uniqueKey } from "./refresher.js";

let refresher: Refresher;
let as: AuthServer;
let nc: NatsConnection;

before(async () => {
  [refresher, as] = await Promise.all([Refresher.start(), AuthServer.start()]);
  nc = await refresher.connectTenant();
});

after(async () => {
  await nc?.close();
  await Promise.all([refresher?.stop(), as?.close()]);
});

describe("TokenSource", { timeout: 60_000 }, () => {
  test("holds the token at start and follows rotations; an older announcement never replaces a newer token", async (t) => {
    const key = uniqueKey("github");
    const login1 = as.issue();
    assert.equal(await register(nc, key, as, login1), 1);
    const src = await TokenSource.start(nc, key, { runtime: "test" });
    t.after(() => src.close());

    const first = await src.token();
    assert.equal(first.accessToken, login1.accessToken);
    assert.equal(first.version, 1);
    assert.equal(first.fingerprint, fingerprint(login1.accessToken));
    assert.ok(first.expiresAt && first.expiresAt.getTime() > Date.now());

    // A person logs in again: the re-registration's auth.rotated reaches the source.
    const login2 = as.issue();
    assert.equal(await register(nc, key, as, login2), 2);
    await eventually(() => src.current?.version === 2, 10_000, "the source never applied version 2");
    assert.equal((await src.token()).accessToken, login2.accessToken);

    // A late announcement of version 1, then a marker on the same
    // connection: NATS delivers them in order, so once the marker is here
    // the old announcement has been handled.
    const admin = await refresher.connectAdmin();
    t.after(() => admin.close());
    const marker = `_INBOX_${TENANT}.marker.${key}`;
    const seen = new Promise<void>((resolve) => nc.subscribe(marker, { max: 1, callback: () => resolve() }));
    await nc.flush();
    admin.publish(`auth.rotated.${key}`, rotatedEvent(key, login1.accessToken, 1));
    admin.publish(marker, "");
    await seen;
    assert.equal(src.current?.version, 2, "an older auth.rotated replaced the newer token");
    assert.equal((await src.token()).accessToken, login2.accessToken);
  });

  test("a revoked grant surfaces as NeedsReauthError, at once for a later source, and a new login repairs it", async (t) => {
    const key = uniqueKey("linear");
    const login = as.issue();
    await register(nc, key, as, login);
    const src = await TokenSource.start(nc, key, { runtime: "test" });
    t.after(() => src.close());
    const held = await src.token();

    as.revoke(login.accessToken);
    const before = as.revokedRefreshes;
    const err = await src.renew(held, { url: "https://api.example/x?secret=1" }).then(
      () => assert.fail("renew answered a token after the grant was revoked"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof NeedsReauthError, `got ${err}`);
    assert.equal(err.code, "needs_reauth");
    assert.equal(err.reason, "invalid_grant");
    assert.equal(err.description, "grant revoked");
    assert.equal(err.version, 1);
    assert.equal(err.key, key);
    assert.equal(as.revokedRefreshes, before + 1);
    await assert.rejects(src.token(), NeedsReauthError);

    // A runtime that starts now learns it from its first auth.token read.
    const later = await TokenSource.start(nc, key, { runtime: "later" });
    t.after(() => later.close());
    await assert.rejects(later.token(), (e: unknown) => e instanceof NeedsReauthError && e.reason === "invalid_grant");

    const relogin = as.issue();
    await register(nc, key, as, relogin);
    await eventually(() => src.current !== undefined && later.current !== undefined, 10_000, "the new login never reached the sources");
    assert.equal((await src.token()).accessToken, relogin.accessToken);
    assert.equal((await later.token()).accessToken, relogin.accessToken);
  });

  test("start fails with not_found for a key never registered", async () => {
    await assert.rejects(TokenSource.start(nc, uniqueKey("nothing")), (e: unknown) => e instanceof AuthbusError && e.code === "not_found");
  });

  test("a tenant connection without the _INBOX_<tenant> prefix gets no token, and is told why", async (t) => {
    const key = uniqueKey("github");
    await register(nc, key, as, as.issue());
    const bare = await refresher.connectTenant({ inboxPrefix: undefined });
    t.after(() => bare.close());
    await assert.rejects(
      TokenSource.start(bare, key, { requestTimeout: 2_000 }),
      (e: unknown) => e instanceof AuthbusError && e.code === "unavailable" && e.message.includes(`_INBOX_${TENANT}`),
    );
  });

  test("close ends the waits it started", async () => {
    // The token endpoint is down: the refreshers retry, and nothing answers.
    const gone = await AuthServer.start();
    const key = uniqueKey("github");
    await register(nc, key, gone, gone.issue());
    await gone.close();
    const src = await TokenSource.start(nc, key, { waitTimeout: 600_000, reaskInterval: 600_000 });
    const waiting = src.renew(await src.token()).catch((e: unknown) => e);
    await src.close();
    const err = await waiting;
    assert.ok(err instanceof AuthbusError, `got ${err}`);
    assert.equal(err.code, "closed");
    await assert.rejects(src.token(), (e: unknown) => e instanceof AuthbusError && e.code === "closed");
  });

  test("start refuses a malformed key, naming the part", async () => {
    await assert.rejects(TokenSource.start(nc, "acme..github"), /user \(part 2\) is empty/);
  });
});

function rotatedEvent(key: string, accessToken: string, version: number): string {
  return JSON.stringify({
    specversion: "1.0",
    id: `forged-${version}`,
    source: "test/forger",
    type: "auth.rotated",
    time: new Date().toISOString(),
    subject: key,
    datacontenttype: "application/json",
    data: { access_token: accessToken, token_type: "Bearer", fingerprint: fingerprint(accessToken), version },
  });
}
