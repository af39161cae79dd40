// The worked example of docs/typescript.md: an agent runtime calls a tool on
// an MCP server with the token authbus keeps for it. `npm test` compiles it,
// so it keeps up with the API.
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { connect } from "@nats-io/transport-node";

import { inboxPrefix, TokenSource } from "@authbus/client";
import { authbusTransport } from "@authbus/client/mcp";

const key = "acme.alice.github"; // tenant.user.server
const nc = await connect({
  servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
  user: process.env.NATS_USER,
  pass: process.env.NATS_PASSWORD,
  inboxPrefix: inboxPrefix(key), // "_INBOX_acme": the only inboxes a tenant's user may use
});
const source = await TokenSource.start(nc, key, { runtime: "agent-1" });
const client = new Client({ name: "agent-1", version: "1.0.0" });
try {
  await client.connect(authbusTransport(source, new URL(process.env.MCP_URL ?? "http://127.0.0.1:8080/mcp")));
  const result = await client.callTool({ name: "echo", arguments: { text: "hello" } });
  console.log(result.content);
} catch (err) {
  if (err instanceof UnauthorizedError) {
    // Only a person can help: log in again and register the new tokens
    // (publisher register, or auth.register); err.message says which key.
    console.error(err.message);
    process.exitCode = 2;
  } else {
    throw err;
  }
} finally {
  await client.close();
  await source.close();
  await nc.close();
}
