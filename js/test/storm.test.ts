import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import type { NatsConnection } from "@nats-io/transport-node";

import { authbusFetch, fingerprint, TokenSource } from "../src/index.js";
import { AuthServer, Resource } from "./authserver.js";
import { Proxy } from "./proxy.js";
import { eventually, Refresher, register, uniqueKey, withDeadline } from "./refresher.js";

let refresher: Refresher;
let as: AuthServer;
let resource: Resource;

before(async () => {
  [refresher, as] = await Promise.all([Refresher.start(), AuthServer.start()]);
  resource = await Resource.start(as);
});

after(async () => {
  await Promise.all([refresher?.stop(), as?.close(), resource?.close()]);
});

// Far beyond this test's own deadline: a runtime that waited for an event
// or for its periodic re-ask, instead of asking auth.token right after its
// report, would still be waiting when the test gives up.
const NEVER = 3_600_000;

test("a storm of 401s reported after the rotation: every runtime is answered by its immediate auth.token check; 1 refresh, 0 reuses", { timeout: 90_000 }, async (t) => {
  const N = 20;
  const key = uniqueKey("github");
  const login = as.issue();
  await register(await conn(t), key, as, login);

  // Runtime 0 connects directly; runtimes 1–19 through a proxy that the
  // test cuts while the credential rotates, so they miss auth.rotated.
  const proxy = await Proxy.start(refresher.url);
  t.after(() => proxy.close());
  const conns = [await conn(t), ...(await Promise.all(Array.from({ length: N - 1 }, () => conn(t, proxy.url))))];
  const status = conns.map(watchStatus);
  const sources = await Promise.all(
    conns.map((c, i) => TokenSource.start(c, key, { runtime: `runtime-${i}`, waitTimeout: NEVER, reaskInterval: NEVER })),
  );
  t.after(() => Promise.all(sources.map((s) => s.close())));
  const fetches = sources.map((s) => authbusFetch(s));

  const admin = await refresher.connectAdmin();
  t.after(() => admin.close());
  const reports: string[] = [];
  admin.subscribe(`auth.401.${key}`, {
    callback: (_, m) => {
      reports.push((m.json() as { data: { fingerprint: string } }).data.fingerprint);
    },
  });
  await admin.flush();

  proxy.cut();
  await eventually(() => status.slice(1).every((s) => s.disconnects > 0), 10_000, "runtimes 1–19 did not notice the cut");

  // The access token expires. Runtime 0 gets its 401 first: its report is
  // the one the refreshers act on.
  as.expireAll();
  const first = await fetches[0]!(resource.url);
  assert.equal(first.status, 200);
  assert.equal(as.refreshes, 1);
  const rotated = sources[0]!.current!;
  assert.equal(rotated.version, 2);

  proxy.restore();
  await eventually(() => status.slice(1).every((s) => s.reconnects > 0), 10_000, "runtimes 1–19 did not reconnect");
  for (const s of sources.slice(1)) assert.equal(s.current?.version, 1, "a runtime saw the rotation it was meant to miss");

  // Now runtimes 1–19 get 401 at once. Their reports come after the
  // rotation, so the stream drops them as duplicates and no refresher
  // announces anything: only the auth.token check answers them.
  let slowest = 0;
  const answers = await withDeadline(
    Promise.all(
      fetches.slice(1).map(async (f, i) => {
        const start = performance.now();
        const res = await f(resource.url, { method: "POST", body: `runtime-${i + 1}` });
        slowest = Math.max(slowest, performance.now() - start);
        return res;
      }),
    ),
    30_000,
    "runtimes reporting after the rotation were not answered; did they ask auth.token right after the report?",
  );
  // A figure for the reader, not an assertion: the request, its 401, the
  // report, the auth.token check and the replay.
  t.diagnostic(`slowest of ${N - 1} runtimes, from request to replayed answer: ${slowest.toFixed(1)} ms`);
  for (const [i, res] of answers.entries()) {
    assert.equal(res.status, 200);
    assert.equal(await res.text(), `runtime-${i + 1}`, "the replay lost the request body");
  }
  for (const s of sources) assert.equal(s.current?.fingerprint, rotated.fingerprint);
  assert.equal(as.refreshes, 1, "the storm cost more than one refresh");
  assert.equal(as.reuses, 0, "a spent refresh token was presented again");
  await eventually(() => reports.length === N, 10_000, `expected ${N} reports, saw ${reports.length}`);
  assert.deepEqual(new Set(reports), new Set([fingerprint(login.accessToken)]));
});

async function conn(t: { after(fn: () => unknown): void }, servers?: string): Promise<NatsConnection> {
  const nc = await refresher.connectTenant(servers ? { servers } : {});
  t.after(() => nc.close());
  return nc;
}

/** Counts a connection's disconnects and reconnects. */
function watchStatus(nc: NatsConnection): { disconnects: number; reconnects: number } {
  const seen = { disconnects: 0, reconnects: 0 };
  void (async () => {
    for await (const s of nc.status()) {
      if (s.type === "disconnect") seen.disconnects++;
      if (s.type === "reconnect") seen.reconnects++;
    }
  })();
  return seen;
}
