import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { fingerprint, inboxPrefix, parseKey, ProtocolError } from "../src/index.js";
import { cleanURL, decodeEvent, errorReply, parseJSON, tokenFromData } from "../src/wire.js";

// The examples of docs/protocol.md were captured from a running refresher;
// decoding them here keeps this client and the document in agreement.
const protocol = readFileSync(resolve(dirname(fileURLToPath(import.meta.url)), "../../../docs/protocol.md"), "utf8");

function example(kind: string, subject: string, block: "example" | "headers" = "example"): string {
  const marker = `<!-- ${block}: ${kind} ${subject} -->`;
  const at = protocol.indexOf(marker);
  assert.ok(at >= 0, `docs/protocol.md has no ${marker}`);
  const m = protocol.slice(at + marker.length).match(/^\s*```\w*\n([\s\S]*?)```/);
  assert.ok(m, `no code block after ${marker}`);
  return m[1]!;
}

const enc = (s: string) => new TextEncoder().encode(s);
const key = parseKey("acme.alice.github");

describe("wire", () => {
  test("decodes the auth.rotated example, whose fingerprint is that of its token", () => {
    const ev = decodeEvent("auth.rotated", key, enc(example("event", "auth.rotated.acme.alice.github")));
    assert.equal(ev.type, "auth.rotated");
    if (ev.type !== "auth.rotated") return;
    assert.equal(ev.token.fingerprint, fingerprint(ev.token.accessToken));
    assert.equal(ev.token.version, 2);
    assert.ok(ev.token.expiresAt instanceof Date);
  });

  test("decodes the auth.needs_reauth example", () => {
    const ev = decodeEvent("auth.needs_reauth", key, enc(example("event", "auth.needs_reauth.acme.alice.github")));
    assert.deepEqual(ev, { type: "auth.needs_reauth", needsReauth: { reason: "invalid_grant", description: "token revoked", version: 2 } });
  });

  test("decodes the auth.token reply and error reply examples", () => {
    const tok = tokenFromData(parseJSON(example("token-reply", "auth.token.acme.alice.github"), "reply"), "reply");
    assert.equal(tok.version, 1);
    const headers: Record<string, string> = Object.fromEntries(
      example("error-reply", "auth.token.acme.alice.github", "headers")
        .trim()
        .split("\n")
        .map((l) => [l.slice(0, l.indexOf(":")), l.slice(l.indexOf(":") + 1).trim()]),
    );
    const e = errorReply(headers["Nats-Service-Error-Code"] ?? "", headers["Nats-Service-Error"] ?? "", enc(example("error-reply", "auth.token.acme.alice.github")));
    assert.deepEqual(e, { error: "needs_reauth", description: headers["Nats-Service-Error"], reason: "invalid_grant" });
  });

  test("the auth.401 example's Nats-Msg-Id is type:key:fingerprint", () => {
    const ev = JSON.parse(example("event", "auth.401.acme.alice.github")) as { data: { fingerprint: string } };
    assert.match(example("event", "auth.401.acme.alice.github", "headers"), new RegExp(`^Nats-Msg-Id: auth\\.401:acme\\.alice\\.github:${ev.data.fingerprint}$`, "m"));
  });

  test("refuses what every authbus decoder refuses", () => {
    const good = JSON.parse(example("event", "auth.rotated.acme.alice.github")) as Record<string, unknown>;
    const bad: [string, string][] = [
      ["another key", JSON.stringify({ ...good, subject: "acme.bob.github" })],
      ["a wrong type", JSON.stringify({ ...good, type: "auth.401" })],
      ["a repeated member", JSON.stringify(good).replace('"specversion":"1.0"', '"specversion":"1.0","specversion":"1.0"')],
      ["a repeated data member", JSON.stringify(good).replace('"version":2', '"version":2,"version":3')],
      ["a fingerprint of another token", JSON.stringify({ ...good, data: { ...(good.data as object), access_token: "at-other" } })],
      ["a version of 0", JSON.stringify({ ...good, data: { ...(good.data as object), version: 0 } })],
    ];
    for (const [what, body] of bad) {
      assert.throws(() => decodeEvent("auth.rotated", key, enc(body)), ProtocolError, what);
    }
    // Unknown members are ignored, so newer publishers can add fields.
    decodeEvent("auth.rotated", key, enc(JSON.stringify({ ...good, ext: 1, data: { ...(good.data as object), extra: "x" } })));
    // Escaped quotes inside strings do not confuse the repeated-member check.
    parseJSON('{"a":"x\\"y","b":{"a":1},"c":["a","a"]}', "test");
  });

  test("keys, inbox prefixes and URLs", () => {
    assert.throws(() => parseKey("acme.alice"), /has 2 parts, want 3/);
    assert.throws(() => parseKey("acme.al ice.github"), /user \(part 2\) is "al ice"/);
    assert.equal(inboxPrefix("acme.alice.github"), "_INBOX_acme");
    assert.equal(inboxPrefix("acme"), "_INBOX_acme");
    assert.equal(cleanURL("https://user:pw@api.example/mcp?token=secret#frag"), "https://api.example/mcp");
  });
});

test("a malformed body never echoes its text into the error", () => {
  assert.throws(
    () => decodeEvent("auth.rotated", key, enc('{"data":{"access_token":at-secret-value}}')),
    (e: unknown) => e instanceof ProtocolError && !e.message.includes("at-secret"),
  );
});
