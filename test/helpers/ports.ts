// Port picking for tests that run real servers: a random base in a range no other service on
// a CI box is likely to use, probed before use; callers still retry if a race takes a port.
import net from 'node:net';
import { sleep } from './process.js';

const BASE_PORT_MIN = 20_000;
const BASE_PORT_MAX = 50_000;

/** True if nothing listens on 127.0.0.1:port and we may bind it. */
export async function portIsFree(port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ port, host: '127.0.0.1', exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/**
 * A random base port P such that every P + offset is free right now (e.g. offsets
 * [0, 100, 200] for a node's NBD, peer and admin ports).
 */
export async function pickBasePort(offsets: readonly number[], attempts = 50): Promise<number> {
  for (let attempt = 0; attempt < attempts; attempt++) {
    const base = BASE_PORT_MIN + Math.floor(Math.random() * (BASE_PORT_MAX - BASE_PORT_MIN));
    let free = true;
    for (const offset of offsets) {
      if (!(await portIsFree(base + offset))) {
        free = false;
        break;
      }
    }
    if (free) return base;
  }
  throw new Error(`no free base port found in ${attempts} attempts`);
}

/** Resolves once a TCP connect to 127.0.0.1:port succeeds; throws after timeoutMs. */
export async function waitForPort(port: number, timeoutMs: number, isAlive: () => boolean = () => true): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const connected = await new Promise<boolean>((resolve) => {
      const socket = net.connect({ port, host: '127.0.0.1' });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (connected) return;
    if (!isAlive()) throw new Error(`the server meant to listen on port ${port} exited`);
    if (Date.now() > deadline) throw new Error(`nothing listens on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}
