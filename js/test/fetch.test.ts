import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Empty, headers, type NatsConnection } from "@nats-io/transport-node";

import { authbusFetch, fingerprint, NeedsReauthError, TokenSource } from "../src/index.js";
import { AuthServer, Resource } from "./authserver.js";
import { eventually, Refresher, register, uniqueKey } from "./refresher.js";

let refresher: Refresher;
let as: AuthServer;
let resource: Resource;
let nc: NatsConnection;
let admin: NatsConnection;

before(async () => {
  [refresher, as] = await Promise.all([Refresher.start(), AuthServer.start()]);
  resource = await Resource.start(as);
  [nc, admin] = await Promise.all([refresher.connectTenant(), refresher.connectAdmin()]);
});

after(async () => {
  await Promise.all([nc?.close(), admin?.close()]);
  await Promise.all([refresher?.stop(), as?.close(), resource?.close()]);
});

/**
 * A registered credential, its source, and allReports(): every auth.401
 * published for it so far. allReports sends a marker on the tenant's
 * connection after everything it published; NATS delivers one
 * connection's messages in order, so once the watcher has the marker it
 * has every report before it.
 */
async function setup(t: { after(fn: () => unknown): void }) {
  const key = uniqueKey("api");
  const login = as.issue();
  await register(nc, key, as, login);
  const source = await TokenSource.start(nc, key, { runtime: "fetch-test" });
  t.after(() => source.close());
  const reports: { fingerprint: string; url?: string; msgId?: string }[] = [];
  let marker = 0;
  const subs = [
    admin.subscribe(`auth.401.${key}`, {
      callback: (_, m) => {
        const data = (m.json() as { data: { fingerprint: string; url?: string } }).data;
        reports.push({ ...data, msgId: m.headers?.get("Nats-Msg-Id") });
      },
    }),
    admin.subscribe(`auth.token.${key}`, {
      callback: (_, m) => {
        marker = Math.max(marker, Number(m.headers?.get("x-test-marker") ?? 0));
      },
    }),
  ];
  t.after(() => subs.forEach((s) => s.unsubscribe()));
  await admin.flush();
  const allReports = async () => {
    const n = ++markerSeq;
    const h = headers();
    h.set("x-test-marker", String(n));
    await nc.request(`auth.token.${key}`, Empty, { timeout: 5_000, headers: h });
    await eventually(() => marker >= n, 5_000, "the marker did not arrive");
    return reports;
  };
  const seen = resource.seen.length;
  return { key, login, source, allReports, fetch: authbusFetch(source), seenSince: () => resource.seen.slice(seen) };
}

let markerSeq = 0;

describe("authbusFetch", { timeout: 60_000 }, () => {
  test("sends the token, and after a 401 reports once and replays once with the new token", async (t) => {
    const { key, login, fetch, seenSince, allReports } = await setup(t);
    const refreshes = as.refreshes;
    assert.equal((await fetch(resource.url)).status, 200);

    as.expireAll();
    const res = await fetch(`${resource.url}?secret=do-not-publish`, { method: "POST", body: "payload" });
    assert.equal(res.status, 200);
    assert.equal(await res.text(), "payload");
    const seen = seenSince();
    assert.deepEqual(
      seen.map((s) => [s.status, s.accessToken === login.accessToken, s.body]),
      [[200, true, ""], [401, true, "payload"], [200, false, "payload"]],
    );
    assert.equal(as.refreshes, refreshes + 1);
    const reports = await allReports();
    assert.equal(reports.length, 1);
    assert.equal(reports[0]!.fingerprint, fingerprint(login.accessToken));
    assert.equal(reports[0]!.url, resource.url, "the report must not carry the query");
    assert.equal(reports[0]!.msgId, `auth.401:${key}:${fingerprint(login.accessToken)}`);
  });

  test("concurrent 401s of one token share one report", async (t) => {
    const { fetch, allReports } = await setup(t);
    as.expireAll();
    const results = await Promise.all(Array.from({ length: 8 }, () => fetch(resource.url)));
    assert.deepEqual(results.map((r) => r.status), Array(8).fill(200));
    assert.equal((await allReports()).length, 1);
  });

  test("a second 401 after the replay is returned as it is", async (t) => {
    const { fetch, seenSince } = await setup(t);
    resource.refuseAll = true;
    t.after(() => (resource.refuseAll = false));
    const refreshes = as.refreshes;
    const res = await fetch(resource.url);
    assert.equal(res.status, 401);
    assert.deepEqual(seenSince().map((s) => s.status), [401, 401], "not exactly one replay");
    assert.equal(as.refreshes, refreshes + 1);
  });

  test("a Request with a body is replayed from a copy", async (t) => {
    const { fetch } = await setup(t);
    as.expireAll();
    const res = await fetch(new Request(resource.url, { method: "PUT", body: "from a Request" }));
    assert.equal(res.status, 200);
    assert.equal(await res.text(), "from a Request");
  });

  test("a streamed body is not replayed, but its 401 is reported so the next request works", async (t) => {
    const { fetch, source, seenSince } = await setup(t);
    const held = source.current!;
    as.expireAll();
    const body = new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode("streamed"));
        c.close();
      },
    });
    const res = await fetch(resource.url, { method: "POST", body, duplex: "half" } as RequestInit);
    assert.equal(res.status, 401);
    await eventually(() => source.current?.fingerprint !== held.fingerprint, 10_000, "the 401 was not reported");
    assert.equal((await fetch(resource.url)).status, 200);
    assert.deepEqual(seenSince().map((s) => s.status), [401, 200]);
  });

  test("a revoked grant throws NeedsReauthError instead of replaying, and nothing is sent after that", async (t) => {
    const { login, fetch, seenSince } = await setup(t);
    as.revoke(login.accessToken);
    await assert.rejects(fetch(resource.url), (e: unknown) => e instanceof NeedsReauthError && e.reason === "invalid_grant");
    await assert.rejects(fetch(resource.url), NeedsReauthError);
    assert.deepEqual(seenSince().map((s) => s.status), [401]);
  });
});
