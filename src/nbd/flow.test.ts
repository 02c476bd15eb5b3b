// Proves the server's concurrency and flow control: out-of-order replies, DISC and graceful close finishing requests in flight, bounded memory for clients that never read or never finish a payload, and the per-connection and server-wide caps.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { MemoryDevice } from '../volume/memory-device.js';
import { NbdClient } from './client.js';
import { ReplyParser, encodeInfoRequestData, encodeRequestHeader } from './codec.js';
import { HookedDevice, RawConnection, eventually, pattern, startServer } from './fixtures.js';
import { CMD, OPT, REP } from './protocol.js';
import type { NbdServer } from './server.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A gate per offset: reads at gated offsets wait until released. */
function gates(device: HookedDevice): { hold(offset: number): void; release(offset: number): void } {
  const held = new Map<number, { promise: Promise<void>; resolve: () => void }>();
  device.readGate = (offset) => held.get(offset)?.promise ?? Promise.resolve();
  return {
    hold(offset) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      held.set(offset, { promise, resolve });
    },
    release(offset) {
      held.get(offset)?.resolve();
      held.delete(offset);
    },
  };
}

async function rawGo(port: number, exportName: string): Promise<RawConnection> {
  const raw = await RawConnection.connect(port);
  await raw.greet();
  const replies = await raw.exchange(OPT.GO, encodeInfoRequestData(exportName, []));
  assert.equal(replies.at(-1)?.type, REP.ACK);
  return raw;
}

function onlyConnection(server: NbdServer) {
  const [connection] = server.stats().connections.filter((c) => c.phase === 'transmission');
  assert.ok(connection, 'a connection in transmission');
  return connection;
}

describe('NBD flow control and concurrency', () => {
  it('answers out of order: a slow read does not hold back a fast one, cookies are echoed', async () => {
    const hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: 8 * MiB }), 'hooked');
    const t = await startServer({ extra: [hooked] });
    try {
      const gate = gates(hooked);
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'hooked' });
      await client.write(0, pattern(0, 2 * MiB));
      gate.hold(0);
      const order: string[] = [];
      const slow = client.read(0, 4096).then((data) => (order.push('slow'), data));
      const fast = client.read(4096, 4096).then((data) => (order.push('fast'), data));
      assert.deepEqual(await fast, pattern(4096, 4096));
      gate.release(0);
      assert.deepEqual(await slow, pattern(0, 4096));
      assert.deepEqual(order, ['fast', 'slow']);

      // Many reads with varying delays: every one gets its own bytes back.
      let seed = 7;
      hooked.readGate = async () => {
        seed = (seed * 1103515245 + 12345) & 0x7fffffff;
        await new Promise((resolve) => setTimeout(resolve, seed % 15));
      };
      const completion: number[] = [];
      const reads = Array.from({ length: 64 }, (_, i) =>
        client.read(i * 32 * KiB, 32 * KiB).then((data) => {
          completion.push(i);
          assert.deepEqual(data, pattern(i * 32 * KiB, 32 * KiB), `read ${i}`);
        }),
      );
      await Promise.all(reads);
      assert.notDeepEqual(completion, [...completion].sort((a, b) => a - b), 'replies came back out of order');
      await client.disconnect();
    } finally {
      await t.close();
    }
  });

  it('DISC finishes the requests in flight, sends no reply of its own, then closes', async () => {
    const hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: MiB }), 'hooked');
    const t = await startServer({ extra: [hooked] });
    try {
      const gate = gates(hooked);
      gate.hold(0);
      const raw = await rawGo(t.port, 'hooked');
      raw.send(encodeRequestHeader({ cookie: 11n, type: CMD.READ, flags: 0, offset: 0, length: 512 }, false));
      raw.send(encodeRequestHeader({ cookie: 12n, type: CMD.DISC, flags: 0, offset: 0, length: 0 }, false));
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(raw.closed, false, 'DISC waits for the read in flight');
      gate.release(0);
      const parser = new ReplyParser(raw.queue, { mode: 'structured', payloadBytesMax: MiB, readLengthForCookie: () => 512 });
      const reply = await raw.read(() => parser.next());
      assert.equal(reply.cookie, 11n);
      assert.equal(reply.payload?.length, 512);
      assert.equal(await raw.closedWithin(2000), true);
      assert.equal(raw.queue.length, 0, 'nothing after the read reply: DISC has no reply');
    } finally {
      await t.close();
    }
  });

  it('close() stops accepting, lets requests in flight finish and be answered, then ends connections', async () => {
    const hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: MiB }), 'hooked');
    const t = await startServer({ extra: [hooked] });
    const gate = gates(hooked);
    const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'hooked' });
    const idle = await RawConnection.connect(t.port);
    await idle.greet();
    gate.hold(0);
    const inflight = client.read(0, 4096);
    await eventually(() => onlyConnection(t.server).inflightRequests === 1, 2000, 'the read to be in flight');
    const closing = t.server.close({ graceMs: 5000 });
    assert.equal(await idle.closedWithin(2000), true, 'a connection still haggling is closed at once');
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: t.port }, { timeoutMs: 1000 }));
    gate.release(0);
    assert.equal((await inflight).length, 4096);
    await closing;
    await client.closed();
    assert.equal(t.server.stats().connectionsOpen, 0);
  });

  it('a client that sends READs and never reads the replies holds a bounded amount of server memory', async () => {
    const capBytes = 2 * MiB;
    const t = await startServer({ limits: { inflightBytesPerConnectionMax: capBytes, requestsInflightPerConnectionMax: 64 } });
    try {
      const raw = await rawGo(t.port, 'disk');
      raw.socket.pause(); // never read
      const requests = 2000;
      const readBytes = 64 * KiB;
      const frames = Buffer.concat(
        Array.from({ length: requests }, (_, i) => encodeRequestHeader({ cookie: BigInt(i), type: CMD.READ, flags: 0, offset: (i % 1000) * readBytes, length: readBytes }, false)),
      );
      raw.send(frames);
      await eventually(() => onlyConnection(t.server).readingPaused, 5000, 'the server to stop reading');
      await new Promise((resolve) => setTimeout(resolve, 200));
      const stuck = onlyConnection(t.server);
      assert.equal(stuck.readingPaused, true);
      assert.ok(stuck.requestsServed < requests, `served ${stuck.requestsServed} of ${requests}: the server stopped taking requests`);
      // Reply bytes queued in the socket plus requests in flight stay within the cap (plus one reply).
      assert.ok(stuck.writeBufferBytes + stuck.inflightBytes <= capBytes + readBytes + 16, `holding ${stuck.writeBufferBytes + stuck.inflightBytes} bytes`);
      // Everyone else is served meanwhile.
      const other = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      assert.equal((await other.read(0, 4096)).length, 4096);
      await other.disconnect();
      // Once the client reads, every reply arrives.
      let received = 0;
      const parser = new ReplyParser(raw.queue, { mode: 'simple', payloadBytesMax: MiB, readLengthForCookie: () => readBytes });
      raw.socket.resume();
      await raw.read(() => {
        for (let reply = parser.next(); reply !== undefined; reply = parser.next()) {
          assert.equal(reply.error, 0);
          received++;
        }
        return received === requests ? true : undefined;
      }, 20_000);
      raw.destroy();
    } finally {
      await t.close();
    }
  });

  it('a WRITE whose payload never arrives waits harmlessly; closing the socket frees it', async () => {
    const t = await startServer();
    try {
      const raw = await rawGo(t.port, 'disk');
      raw.send(encodeRequestHeader({ cookie: 1n, type: CMD.WRITE, flags: 0, offset: 0, length: MiB }, false));
      raw.send(Buffer.alloc(1000, 1));
      await eventually(() => onlyConnection(t.server).heldPayloadBytes === MiB, 2000, 'the partial payload to be held');
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(raw.closed, false);
      const other = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      await other.write(4096, Buffer.from('others keep working'));
      assert.equal((await other.read(4096, 19)).toString(), 'others keep working');
      await other.disconnect();
      raw.destroy();
      await eventually(() => t.server.stats().connectionsOpen === 0, 2000, 'the stalled connection to be cleaned up');
      assert.equal(t.server.stats().inflightBytesTotal, 0);
      assert.equal(t.device.contents(0, 1)[0], 0, 'the half-received WRITE was never applied');
    } finally {
      await t.close();
    }
  });

  it('caps requests in flight per connection, and reads again once they complete', async () => {
    const hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: 8 * MiB }), 'hooked');
    const t = await startServer({ extra: [hooked], limits: { requestsInflightPerConnectionMax: 8 } });
    try {
      let release!: () => void;
      const blocked = new Promise<void>((resolve) => (release = resolve));
      hooked.readGate = () => blocked;
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'hooked' });
      const reads = Array.from({ length: 100 }, (_, i) => client.read(i * 4096, 4096));
      await eventually(() => onlyConnection(t.server).inflightRequests === 8, 2000, '8 requests in flight');
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(onlyConnection(t.server).inflightRequests, 8);
      assert.equal(onlyConnection(t.server).readingPaused, true);
      release();
      assert.equal((await Promise.all(reads)).length, 100);
      await client.disconnect();
    } finally {
      await t.close();
    }
  });

  it('caps bytes in flight server-wide without deadlock: every connection finishes', async () => {
    const hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: 8 * MiB }), 'hooked');
    const capBytes = 256 * KiB;
    const t = await startServer({ extra: [hooked], limits: { inflightBytesTotalMax: capBytes } });
    try {
      hooked.readGate = () => new Promise((resolve) => setTimeout(resolve, 2));
      let peak = 0;
      const sampler = setInterval(() => (peak = Math.max(peak, t.server.stats().inflightBytesTotal)), 1);
      const clients = await Promise.all(
        Array.from({ length: 4 }, () => NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'hooked' })),
      );
      await Promise.all(clients.map((client) => Promise.all(Array.from({ length: 32 }, (_, i) => client.read(i * 64 * KiB, 64 * KiB)))));
      clearInterval(sampler);
      // Admission is checked before each request: the cap can be passed by at most one request per connection.
      assert.ok(peak <= capBytes + clients.length * 64 * KiB, `peak ${peak}`);
      assert.ok(peak > 0);
      await Promise.all(clients.map((client) => client.disconnect()));
      assert.equal(t.server.stats().inflightBytesTotal, 0);
    } finally {
      await t.close();
    }
  });

  it('counts requests served and errors', async () => {
    const t = await startServer();
    try {
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      await client.write(0, Buffer.alloc(512));
      await client.read(0, 512);
      await client.rawRequest({ type: 99 });
      await client.disconnect();
      const stats = t.server.stats();
      assert.equal(stats.requestsServed, 3);
      assert.equal(stats.requestErrors, 1);
      assert.equal(stats.connectionsAccepted, 1);
    } finally {
      await t.close();
    }
  });
});
