// An MCP server as MCP servers run behind OAuth: the SDK's McpServer on its
// Streamable HTTP server transport (stateful sessions) on node's http, with
// every request refused unless its bearer token is valid at the test
// authorization server.

import { randomUUID } from "node:crypto";
import { createServer, type Server } from "node:http";

import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { isInitializeRequest } from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";

import { baseURL, closeServer, listen, readBody, type AuthServer } from "./authserver.js";

export class ProtectedMcpServer {
  /** The access token of every request that reached the MCP layer, and of every refused one. */
  readonly accepted: string[] = [];
  readonly refused: string[] = [];
  readonly #server: Server;
  readonly #sessions = new Map<string, StreamableHTTPServerTransport>();

  private constructor(as: AuthServer) {
    this.#server = createServer((req, res) => {
      void (async () => {
        const tok = req.headers.authorization?.match(/^Bearer (.+)$/)?.[1] ?? "";
        const raw = await readBody(req);
        if (!as.valid(tok)) {
          this.refused.push(tok);
          res.writeHead(401, { "www-authenticate": 'Bearer error="invalid_token"' }).end();
          return;
        }
        this.accepted.push(tok);
        const body: unknown = raw ? JSON.parse(raw) : undefined;
        const id = req.headers["mcp-session-id"];
        let transport = typeof id === "string" ? this.#sessions.get(id) : undefined;
        if (!transport) {
          if (id !== undefined || !isInitializeRequest(body)) {
            res.writeHead(404).end("unknown session");
            return;
          }
          const t = new StreamableHTTPServerTransport({
            sessionIdGenerator: () => randomUUID(),
            onsessioninitialized: (sid) => void this.#sessions.set(sid, t),
          });
          await newServer().connect(t);
          transport = t;
        }
        await transport.handleRequest(req, res, body);
      })().catch((err: unknown) => {
        if (!res.headersSent) res.writeHead(500);
        res.end(String(err));
      });
    });
  }

  static async start(as: AuthServer): Promise<ProtectedMcpServer> {
    const s = new ProtectedMcpServer(as);
    await listen(s.#server);
    return s;
  }

  get url(): URL {
    return new URL(`${baseURL(this.#server)}/mcp`);
  }

  get sessions(): number {
    return this.#sessions.size;
  }

  async close(): Promise<void> {
    await Promise.all([...this.#sessions.values()].map((t) => t.close()));
    await closeServer(this.#server);
  }
}

function newServer(): McpServer {
  const server = new McpServer({ name: "protected-echo", version: "1.0.0" });
  server.registerTool(
    "echo",
    { description: "Echoes its text", inputSchema: { text: z.string() } },
    async ({ text }) => ({ content: [{ type: "text", text }] }),
  );
  return server;
}
