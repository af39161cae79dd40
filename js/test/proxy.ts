// A TCP proxy in front of the NATS server that a test can cut and restore,
// so that the connections behind it miss what is published meanwhile, as
// runtimes do during a network partition.

import { createConnection, createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";

export class Proxy {
  readonly #server: Server;
  readonly #sockets = new Set<Socket>();
  #down = false;

  private constructor(target: { host: string; port: number }) {
    this.#server = createServer((client) => {
      if (this.#down) {
        client.destroy();
        return;
      }
      const upstream = createConnection(target);
      for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
        this.#sockets.add(a);
        a.on("error", () => b.destroy());
        a.on("close", () => {
          this.#sockets.delete(a);
          b.destroy();
        });
        a.pipe(b);
      }
    });
  }

  /** Starts a proxy to the NATS URL target (nats://host:port). */
  static async start(target: string): Promise<Proxy> {
    const u = new URL(target);
    const p = new Proxy({ host: u.hostname, port: Number(u.port) });
    await new Promise<void>((resolve) => p.#server.listen(0, "127.0.0.1", resolve));
    return p;
  }

  get url(): string {
    return `nats://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  /** Drops every connection and refuses new ones until restore(). */
  cut(): void {
    this.#down = true;
    for (const s of this.#sockets) s.destroy();
  }

  restore(): void {
    this.#down = false;
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
