// Proves peer links over real TCP: authenticated, pipelined and batched exchange (1 MiB payloads too) with backpressure, reconnect, heartbeat death detection, and refusal (logged with its reason, nothing delivered) of garbage, other clusters, wrong secrets, unknown nodes, other versions, oversized frames and stale epochs, even while 100 garbage connections hit the port.
import assert from 'node:assert/strict';
import net from 'node:net';
import type { Socket } from 'node:net';
import { after, describe, it } from 'node:test';
import { ENTRY_TYPE } from '../journal/entry.js';
import { createMemoryLogger } from '../util/log.js';
import { crc32c } from '../util/crc32c.js';
import { DialerHandshake } from './auth.js';
import type { PeerIdentity } from './auth.js';
import { FRAME_HEADER_BYTES, FRAME_MAGIC, FrameDecoder, MESSAGE_TYPE, NONCE_BYTES, PROTOCOL_VERSION, encodeFrame } from './codec.js';
import type { ReplicationMessage, WriteMessage } from './codec.js';
import { PeerLink, PeerListener } from './peer-link.js';
import type { PeerConnection, PeerConnectionHandlers, PeerLimits, PeerLinkState, PeerMessage, PeerTimings } from './peer-link.js';

const SECRET = 'a shared cluster secret';
const idOf = (nodeId: string, overrides: Partial<PeerIdentity> = {}): PeerIdentity => ({ clusterId: 'prod', nodeId, clusterSecret: SECRET, ...overrides });
const KNOWN = new Set(['n1', 'n2', 'n3']);
const FAST: Partial<PeerTimings> = { handshakeTimeoutMs: 2000, heartbeatIntervalMs: 100, deadAfterMs: 1500, reconnectMinMs: 20, reconnectMaxMs: 200 };

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

async function waitFor(condition: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

const BASE = Buffer.alloc(1024 * 1024 + 256);
for (let i = 0; i < BASE.length; i++) BASE[i] = (i * 131 + (i >> 8)) & 0xff;
/** A payload that depends on the sequence, so a reordered or mixed-up payload is caught. */
function payloadFor(sequence: number, lengthBytes: number): Buffer {
  const start = sequence % 251;
  return BASE.subarray(start, start + lengthBytes);
}

function write(sequence: number, lengthBytes: number, epoch = 7): WriteMessage {
  return { type: 'WRITE', volume: 'vol0', epoch, source: 'n1', sequence, entryType: ENTRY_TYPE.WRITE, offset: sequence * 4096, lengthBytes, payload: payloadFor(sequence, lengthBytes) };
}

interface ListenerFixture {
  listener: PeerListener;
  port: number;
  log: ReturnType<typeof createMemoryLogger>;
  received: PeerMessage[];
  connections: PeerConnection[];
  closes: string[];
}

/** A listener as node n2 that records what it gets and ACKs every WRITE at once. */
async function startListener(options: { timings?: Partial<PeerTimings>; limits?: Partial<PeerLimits>; isStale?: (volume: string, epoch: number) => boolean; port?: number; ack?: boolean } = {}): Promise<ListenerFixture> {
  const log = createMemoryLogger();
  const received: PeerMessage[] = [];
  const connections: PeerConnection[] = [];
  const closes: string[] = [];
  const listener = new PeerListener({
    identity: idOf('n2'),
    endpoint: { host: '127.0.0.1', port: options.port ?? 0 },
    isKnownPeer: (id) => KNOWN.has(id),
    isStale: options.isStale,
    logger: log,
    timings: { ...FAST, ...options.timings },
    limits: options.limits,
    onConnection: (connection): PeerConnectionHandlers => {
      connections.push(connection);
      return {
        onMessage: (message) => {
          received.push(message);
          if (message.type === 'WRITE' && options.ack !== false) {
            assert.ok(connection.send({ type: 'ACK', volume: message.volume, epoch: message.epoch, source: message.source, sequence: message.sequence }));
          }
        },
        onClose: (reason) => closes.push(reason),
      };
    },
  });
  const { port } = await listener.listen();
  cleanups.push(() => listener.close());
  return { listener, port, log, received, connections, closes };
}

interface LinkFixture {
  link: PeerLink;
  log: ReturnType<typeof createMemoryLogger>;
  received: PeerMessage[];
  states: PeerLinkState[];
  drains: number;
}

function startLink(
  port: number,
  options: { identity?: PeerIdentity; peerId?: string; timings?: Partial<PeerTimings>; limits?: Partial<PeerLimits>; onMessage?: (m: PeerMessage) => void; onDrain?: () => void } = {},
): LinkFixture {
  const log = createMemoryLogger();
  const fixture: LinkFixture = { link: undefined as unknown as PeerLink, log, received: [], states: [], drains: 0 };
  fixture.link = new PeerLink({
    identity: options.identity ?? idOf('n1'),
    peerId: options.peerId ?? 'n2',
    endpoint: { host: '127.0.0.1', port },
    localAddress: '127.0.0.1',
    logger: log,
    timings: { ...FAST, ...options.timings },
    limits: options.limits,
    onMessage: (message) => {
      fixture.received.push(message);
      options.onMessage?.(message);
    },
    onState: (state) => fixture.states.push(state),
    onDrain: () => {
      fixture.drains++;
      options.onDrain?.();
    },
  });
  fixture.link.start();
  cleanups.push(() => fixture.link.close());
  return fixture;
}

function rawConnect(port: number): Promise<{ socket: Socket; closed: Promise<void>; data: Buffer[] }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    const data: Buffer[] = [];
    socket.on('data', (chunk) => data.push(chunk));
    socket.on('error', () => {});
    const closed = new Promise<void>((done) => socket.once('close', () => done()));
    cleanups.push(() => void socket.destroy());
    socket.once('connect', () => resolve({ socket, closed, data }));
    socket.once('error', reject);
  });
}

function localAddressOf(socket: Socket): string {
  return `${socket.localAddress}:${socket.localPort}`;
}

function refusalLines(log: { lines: string[] }, code: string): string[] {
  return log.lines.filter((line) => line.includes('peer connection refused') && line.includes(`code=${code}`));
}

/** A frame header with a correct CRC over itself (and an empty body). */
function rawHeader(typeId: number, bodyLength: number, version = PROTOCOL_VERSION): Buffer {
  const header = Buffer.alloc(FRAME_HEADER_BYTES);
  header.writeUInt32BE(FRAME_MAGIC, 0);
  header.writeUInt8(version, 4);
  header.writeUInt8(typeId, 5);
  header.writeUInt32BE(bodyLength, 8);
  header.writeUInt32BE(crc32c(header.subarray(0, 12)), 12);
  return header;
}

/** Performs the dialer's handshake by hand over a raw socket: for frames a PeerLink would never send. */
async function rawAuthenticated(port: number): Promise<{ socket: Socket; closed: Promise<void>; decoder: FrameDecoder }> {
  const { socket, closed } = await rawConnect(port);
  socket.removeAllListeners('data');
  const handshake = new DialerHandshake({ identity: idOf('n3'), listenerId: 'n2' });
  const decoder = new FrameDecoder();
  const send = (m: ReplicationMessage): void => void socket.write(Buffer.concat(encodeFrame(m)));
  send(handshake.start());
  await new Promise<void>((resolve, reject) => {
    socket.on('data', (chunk) => {
      decoder.push(chunk);
      for (let m = decoder.next(); m !== undefined; m = decoder.next()) {
        if (handshake.state === 'authenticated') continue;
        const step = handshake.receive(m);
        if (step.kind === 'refused') return reject(new Error(step.reason));
        step.send.forEach(send);
        if (step.kind === 'authenticated') resolve();
      }
    });
  });
  return { socket, closed, decoder };
}

describe('peer links over TCP', () => {
  it('exchanges many pipelined WRITEs (4 KiB and 1 MiB) and ACKs in order, with backpressure', async () => {
    const server = await startListener();
    const acks: number[] = [];
    const sizes: number[] = [];
    for (let i = 0; i < 3000; i++) sizes.push(i % 125 === 0 ? 1024 * 1024 : 4096); // 24 MiB in 1 MiB writes
    let next = 0;
    let refusals = 0;
    let allSent: () => void = () => {};
    const sentAll = new Promise<void>((resolve) => (allSent = resolve));
    const pump = (): void => {
      while (next < sizes.length) {
        if (!client.link.send(write(next + 1, sizes[next]!))) {
          refusals++;
          return; // resumed by onDrain
        }
        next++;
      }
      allSent();
    };
    const client = startLink(server.port, {
      limits: { sendQueueMaxBytes: 4 * 1024 * 1024 },
      onMessage: (m) => m.type === 'ACK' && acks.push(m.sequence),
      onDrain: pump,
    });
    await waitFor(() => client.link.state === 'up', 'link up');
    pump();
    await sentAll;
    await waitFor(() => acks.length === sizes.length, 'every ACK', 10000);
    assert.deepEqual(acks, sizes.map((_, i) => i + 1), 'ACKs arrive in sequence order');
    assert.ok(refusals > 0 && client.drains > 0, 'the send queue cap pushed back at least once');
    const writes = server.received as WriteMessage[];
    assert.equal(writes.length, sizes.length);
    for (const [i, w] of writes.entries()) {
      assert.equal(w.sequence, i + 1);
      assert.ok(w.payload.equals(payloadFor(i + 1, sizes[i]!)), `payload of ${i + 1}`);
    }
    assert.deepEqual(client.states, ['up']);
  });

  it('batches: frames queued in one event-loop turn leave in one vectored socket write', async () => {
    const server = await startListener({ timings: { heartbeatIntervalMs: 1000, deadAfterMs: 5000 } });
    const client = startLink(server.port, { timings: { heartbeatIntervalMs: 1000, deadAfterMs: 5000 } });
    await waitFor(() => client.link.state === 'up', 'link up');
    await new Promise((resolve) => setTimeout(resolve, 20)); // let the handshake's writes finish

    // Count real socket writes of the dialer's socket (the one whose remote port is the listener's).
    const proto = net.Socket.prototype as unknown as Record<'_write' | '_writev', (...args: unknown[]) => unknown>;
    const original = { write: proto._write, writev: proto._writev };
    let socketWrites = 0;
    proto._write = function (this: Socket, ...args: unknown[]) {
      if (this.remotePort === server.port) socketWrites++;
      return original.write.apply(this, args);
    };
    proto._writev = function (this: Socket, ...args: unknown[]) {
      if (this.remotePort === server.port) socketWrites++;
      return original.writev.apply(this, args);
    };
    try {
      const before = { ...client.link.stats! };
      for (let i = 1; i <= 500; i++) assert.ok(client.link.send({ type: 'SYNC', volume: 'vol0', epoch: 7, source: 'n1', sequence: i }));
      await waitFor(() => server.received.length === 500, '500 frames received');
      const stats = client.link.stats!;
      assert.equal(stats.framesSent - before.framesSent, 500);
      assert.equal(stats.writeBatches - before.writeBatches, 1);
      assert.equal(socketWrites, 1, `500 frames took ${socketWrites} socket writes`);
    } finally {
      proto._write = original.write;
      proto._writev = original.writev;
    }
    assert.deepEqual(server.received.map((m) => (m as { sequence: number }).sequence), Array.from({ length: 500 }, (_, i) => i + 1));
  });

  it('reconnects after the listener side closes the connection, and after the listener restarts', async () => {
    const server = await startListener();
    const client = startLink(server.port);
    await waitFor(() => client.link.state === 'up', 'link up');
    server.listener.connectionFor('n1')!.close('test closes it');
    await waitFor(() => client.states.length >= 3, 'down then up again');
    assert.deepEqual(client.states.slice(0, 3), ['up', 'down', 'up']);
    assert.ok(client.link.send(write(1, 4096)));
    await waitFor(() => client.received.some((m) => m.type === 'ACK' && m.sequence === 1), 'ACK on the new connection');
    assert.equal(client.link.connectionsOpened, 2);

    await server.listener.close();
    await waitFor(() => client.link.state === 'down', 'down after listener close');
    const restarted = await startListener({ port: server.port });
    await waitFor(() => client.link.state === 'up', 'up again after the listener restarted');
    assert.ok(client.link.send(write(2, 4096)));
    await waitFor(() => restarted.received.length === 1, 'WRITE reaches the restarted listener');
  });

  it('heartbeats declare a silent peer dead within deadAfterMs, then the link recovers', async () => {
    const timings = { heartbeatIntervalMs: 50, deadAfterMs: 300 };
    const server = await startListener({ timings });
    // A TCP proxy that can swallow everything on existing connections (a partition, not a close).
    const pairs: { client: Socket; upstream: Socket; blackholed: boolean }[] = [];
    let partitioned = false;
    const proxy = net.createServer((clientSocket) => {
      if (partitioned) {
        clientSocket.destroy(); // no new connection crosses the partition either
        return;
      }
      const upstream = net.connect({ host: '127.0.0.1', port: server.port });
      const pair = { client: clientSocket, upstream, blackholed: false };
      pairs.push(pair);
      clientSocket.on('data', (d) => pair.blackholed || upstream.write(d));
      upstream.on('data', (d) => pair.blackholed || clientSocket.write(d));
      const destroy = (): void => {
        clientSocket.destroy();
        upstream.destroy();
      };
      clientSocket.on('error', destroy).on('close', () => pair.blackholed || destroy());
      upstream.on('error', destroy).on('close', () => pair.blackholed || destroy());
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => {
      for (const p of pairs) {
        p.client.destroy();
        p.upstream.destroy();
      }
      return new Promise<void>((resolve) => proxy.close(() => resolve()));
    });
    const client = startLink((proxy.address() as net.AddressInfo).port, { timings });
    await waitFor(() => client.link.state === 'up', 'link up');
    // Heartbeats keep an idle link alive well past deadAfterMs.
    await new Promise((resolve) => setTimeout(resolve, 600));
    assert.deepEqual(client.states, ['up']);
    assert.ok(client.link.stats!.lastRttMs >= 0, 'PONGs measured a round trip');

    partitioned = true;
    for (const p of pairs) p.blackholed = true;
    const partitionedAt = Date.now();
    await waitFor(() => client.link.state === 'down', 'dialer declares the peer dead', 2000);
    const detectedMs = Date.now() - partitionedAt;
    assert.ok(detectedMs >= 250 && detectedMs < 1500, `detected after ${detectedMs} ms`);
    assert.ok(client.log.lines.some((l) => l.includes('peer link down') && l.includes('no frame received for')));
    await waitFor(() => server.closes.some((r) => r.includes('no frame received')), 'listener side declares it dead too', 2000);
    // The partition heals: new connections pass again and the link comes back by itself.
    partitioned = false;
    await waitFor(() => client.link.state === 'up', 'link up again', 3000);
  });

  it('gives up a handshake with a server that accepts and never answers, and keeps retrying', async () => {
    const sockets: Socket[] = [];
    const mute = net.createServer((s) => sockets.push(s));
    await new Promise<void>((resolve) => mute.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => {
      sockets.forEach((s) => s.destroy());
      return new Promise<void>((resolve) => mute.close(() => resolve()));
    });
    const client = startLink((mute.address() as net.AddressInfo).port, { timings: { handshakeTimeoutMs: 150 } });
    await waitFor(() => sockets.length >= 2, 'a second attempt after the first timed out');
    assert.ok(refusalLines(client.log, 'REPL_HANDSHAKE_TIMEOUT').length >= 1);
    assert.equal(client.link.state, 'down');
    assert.deepEqual(client.states, []);
  });
});

describe('peer listener refusals (logged with the reason; nothing delivered)', () => {
  it('refuses raw garbage bytes', async () => {
    const server = await startListener();
    const raw = await rawConnect(server.port);
    const local = localAddressOf(raw.socket);
    raw.socket.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
    await raw.closed;
    const lines = refusalLines(server.log, 'REPL_BAD_FRAME');
    assert.equal(lines.length, 1);
    assert.match(lines[0]!, new RegExp(`remote=${local.replace(/\./g, '\\.')} `));
    assert.match(lines[0]!, /bad frame magic 0x47455420/);
    assert.equal(server.connections.length, 0);
    assert.equal(raw.data.length, 0, 'nothing is answered to garbage');
  });

  it('refuses a valid HELLO with another cluster id, a wrong secret, and an unknown node id', async () => {
    const server = await startListener();
    const cases: [PeerIdentity, string, RegExp][] = [
      [idOf('n1', { clusterId: 'staging' }), 'REPL_CLUSTER_MISMATCH', /cluster \\?"staging\\?", not \\?"prod\\?"/],
      [idOf('n1', { clusterSecret: 'not the secret' }), 'REPL_AUTH', /wrong HMAC/],
      [idOf('n9'), 'REPL_AUTH', /unknown node id \\?"n9\\?"/],
    ];
    for (const [identity, code, reason] of cases) {
      const client = startLink(server.port, { identity });
      await waitFor(() => refusalLines(server.log, code).some((l) => reason.test(l)), `${code} refusal logged`);
      await waitFor(() => client.log.lines.some((l) => l.includes('peer link attempt failed')), 'the dialer saw the refusal');
      await client.link.close();
      assert.deepEqual(client.states, [], 'never up');
    }
    assert.equal(server.connections.length, 0);
    assert.equal(server.received.length, 0);
  });

  it('refuses another protocol version, and a data frame before authentication', async () => {
    const server = await startListener();
    const hello = Buffer.concat(encodeFrame({ type: 'HELLO', protocolVersion: PROTOCOL_VERSION, clusterId: 'prod', nodeId: 'n1', nonce: Buffer.alloc(NONCE_BYTES, 1) }));
    hello[4] = PROTOCOL_VERSION + 1;
    const v2 = await rawConnect(server.port);
    v2.socket.write(hello);
    await v2.closed;
    assert.equal(refusalLines(server.log, 'REPL_VERSION_MISMATCH').length, 1);

    const early = await rawConnect(server.port);
    early.socket.write(Buffer.concat(encodeFrame(write(1, 4096))));
    await early.closed;
    assert.ok(refusalLines(server.log, 'REPL_BAD_FRAME').some((l) => l.includes('WRITE frame not accepted at this point')));
    assert.equal(server.received.length, 0);
  });

  it('closes a connection announcing a 4 GiB frame without allocating it, before and after authentication', async () => {
    const server = await startListener();
    const arrayBuffersBefore = process.memoryUsage().arrayBuffers;
    const pre = await rawConnect(server.port);
    pre.socket.write(rawHeader(MESSAGE_TYPE.HELLO, 0xffff_ffff));
    await pre.closed;
    assert.equal(refusalLines(server.log, 'REPL_FRAME_TOO_LARGE').length, 1);

    const authed = await rawAuthenticated(server.port);
    await waitFor(() => server.connections.length === 1, 'raw client authenticated');
    authed.socket.write(Buffer.concat(encodeFrame(write(1, 4096))));
    await waitFor(() => server.received.length === 1, 'a valid WRITE is delivered');
    authed.socket.write(rawHeader(MESSAGE_TYPE.WRITE, 0xffff_ffff));
    await authed.closed;
    assert.ok(server.log.lines.some((l) => l.includes('peer connection closed') && l.includes('code=REPL_FRAME_TOO_LARGE') && l.includes('peer=n3')));
    assert.equal(server.closes.length, 1);
    assert.equal(server.received.length, 1, 'nothing after the valid WRITE');
    const grownBytes = process.memoryUsage().arrayBuffers - arrayBuffersBefore;
    assert.ok(grownBytes < 64 * 1024 * 1024, `array buffers grew by ${grownBytes} bytes`);
  });

  it('answers stale-epoch frames with ERROR(REPL_EPOCH_STALE) and never delivers them; a stale stream frame also closes the connection so that the source repositions', async () => {
    const server = await startListener({ isStale: (volume, epoch) => volume === 'vol0' && epoch < 5 });
    const client = startLink(server.port);
    await waitFor(() => client.link.state === 'up', 'link up');
    // Answers carry no stream position to lose: refused, and the link stays up.
    client.link.send({ type: 'ACK', volume: 'vol0', epoch: 3, source: 'n2', sequence: 9 });
    client.link.send({ type: 'CHECKPOINT_ACK', volume: 'vol0', epoch: 4, source: 'n2', sequence: 9 });
    await waitFor(() => client.received.filter((m) => m.type === 'ERROR').length === 2, 'two ERRORs');
    assert.deepEqual(client.states, ['up'], 'the link stays up: an answer leaves no hole');
    // A stale WRITE leaves a hole in the source's stream, which nothing else would tell it about:
    // refused, then the connection closes; the link redials and the source resends from there.
    client.link.send(write(1, 4096, 3));
    await waitFor(() => client.received.filter((m) => m.type === 'ERROR').length === 3 && client.states.length === 3 && client.link.state === 'up', 'the ERROR, then the link down and up again');
    assert.deepEqual(client.states, ['up', 'down', 'up']);
    client.link.send(write(1, 4096, 5));
    await waitFor(() => client.received.some((m) => m.type === 'ACK'), 'the ACK of the fresh WRITE');
    assert.deepEqual(server.received.map((m) => [m.type, (m as WriteMessage).epoch]), [['WRITE', 5]]);
    const errors = client.received.filter((m) => m.type === 'ERROR');
    assert.ok(errors.every((e) => e.code === 'REPL_EPOCH_STALE'));
    assert.match(errors[2]!.message, /WRITE for volume vol0 at epoch 3 refused: stale epoch/);
    assert.equal(server.connections[0]!.stats.staleFramesRefused, 3);
    const staleLines = server.log.lines.filter((l) => l.includes('refused frame with a stale epoch') && l.includes('warn'));
    assert.equal(staleLines.length, 2, 'one warn line per (volume, epoch), not per frame');
    assert.match(staleLines[0]!, /code=REPL_EPOCH_STALE .*volume=vol0 epoch=3/);
    assert.ok(server.log.lines.some((l) => l.includes('peer connection closed') && l.includes('code=REPL_EPOCH_STALE')), server.log.lines.join('\n'));
  });

  it('limits concurrent unauthenticated connections and times out silent ones', async () => {
    const server = await startListener({ limits: { unauthenticatedMax: 4 }, timings: { handshakeTimeoutMs: 400 } });
    const idle = await Promise.all([0, 1, 2, 3].map(() => rawConnect(server.port)));
    await waitFor(() => server.listener.unauthenticatedCount === 4, 'four authenticating');
    const extra = await rawConnect(server.port);
    await extra.closed;
    assert.equal(refusalLines(server.log, 'REPL_BUSY').length, 1);
    await Promise.all(idle.map((c) => c.closed));
    assert.equal(refusalLines(server.log, 'REPL_HANDSHAKE_TIMEOUT').length, 4);
    assert.equal(server.listener.unauthenticatedCount, 0);
  });

  it('100 garbage connections do not disturb an authenticated link running at the same time', async () => {
    const server = await startListener();
    const acks: number[] = [];
    const client = startLink(server.port, { onMessage: (m) => m.type === 'ACK' && acks.push(m.sequence) });
    await waitFor(() => client.link.state === 'up', 'link up');
    const total = 2000;
    let sent = 0;
    const sender = setInterval(() => {
      for (let i = 0; i < 50 && sent < total; i++) if (client.link.send(write(sent + 1, 4096))) sent++;
      if (sent === total) clearInterval(sender);
    }, 1);
    const garbage = await Promise.all(
      Array.from({ length: 100 }, async (_, i) => {
        const raw = await rawConnect(server.port);
        raw.socket.write(i % 2 === 0 ? Buffer.alloc(64, i) : rawHeader(MESSAGE_TYPE.WRITE, 32 * 1024 * 1024));
        return raw;
      }),
    );
    await Promise.all(garbage.map((g) => g.closed));
    await waitFor(() => acks.length === total, 'every ACK', 10000);
    assert.deepEqual(acks, Array.from({ length: total }, (_, i) => i + 1));
    assert.deepEqual(client.states, ['up']);
    const refused = server.log.lines.filter((l) => l.includes('peer connection refused'));
    assert.equal(refused.length, 100);
    assert.equal(server.connections.length, 1);
    assert.equal(server.received.length, total);
  });
});
