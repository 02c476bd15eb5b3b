// Proves diskless mode's forwarder against real NBD servers: it holds requests until started, forwards every kind of request to the first in-sync peer, retries a peer's EIO (fenced, rejoining) on another peer only after the first peer answered everything in flight, replays what was in flight on a lost connection on the next peer, passes the peer's other errors (EPERM, EINVAL) through unretried, leaves a peer that is no longer a target, fails requests with EIO (and a clear log line) once no peer answered them within the wait bound, and the pure peer choice and error classification behind it.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { ERRNO } from '../nbd/protocol.js';
import { StaticExportRegistry } from '../nbd/registry.js';
import { NbdServer } from '../nbd/server.js';
import { createMemoryLogger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';
import { ForwardingDevice, chooseTarget, classifyPeerError, type ForwardTarget } from './diskless.js';
import { MemoryDevice } from './memory-device.js';

const VOLUME = 'vol0';
const SIZE_BYTES = 4 * 1024 * 1024;
const BLOCK_BYTES = 64 * 1024;

/** A peer's export: memory that can refuse with EIO (fenced), refuse writes with EPERM (strict), or hold requests. */
class PeerDisk implements BlockDevice {
  readonly name = VOLUME;
  readonly description = 'a peer replica';
  refuse: 'NBD_EIO' | 'NBD_EPERM' | undefined;
  hold = false;
  held = 0;
  served = 0;
  readonly memory: MemoryDevice;
  constructor(memory: MemoryDevice) {
    this.memory = memory;
  }
  private async gate(write: boolean): Promise<void> {
    if (this.refuse === 'NBD_EIO' || (this.refuse === 'NBD_EPERM' && write)) throw new MirrorsanError(this.refuse, `peer refuses (${this.refuse})`);
    if (this.hold) {
      this.held++;
      await new Promise<never>(() => {});
    }
    this.served++;
  }
  geometry(): DeviceGeometry {
    return this.memory.geometry();
  }
  async read(offset: number, length: number): Promise<ReadPiece[]> {
    await this.gate(false);
    return this.memory.read(offset, length);
  }
  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    await this.gate(true);
    return this.memory.write(offset, data, options);
  }
  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.gate(true);
    return this.memory.writeZeroes(offset, length, options);
  }
  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    await this.gate(true);
    return this.memory.trim(offset, length, options);
  }
  async flush(): Promise<void> {
    await this.gate(false);
    return this.memory.flush();
  }
  async cache(offset: number, length: number): Promise<void> {
    return this.memory.cache(offset, length);
  }
  blockStatus(offset: number, length: number): Extent[] {
    return this.memory.blockStatus(offset, length);
  }
}

/** A peer node: an NbdServer on a unix socket whose connections can all be cut at once (SIGKILL). */
class Peer {
  readonly disk: PeerDisk;
  readonly target: ForwardTarget;
  private readonly nbd: NbdServer;
  private readonly listener: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly socketPath: string;
  private constructor(node: string, disk: PeerDisk, socketPath: string) {
    this.disk = disk;
    this.socketPath = socketPath;
    this.target = { node, target: { path: socketPath } };
    this.nbd = new NbdServer({ registry: new StaticExportRegistry([disk]), logger: createMemoryLogger() });
    this.listener = net.createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      this.nbd.handleConnection(socket);
    });
  }
  static async start(node: string, memory: MemoryDevice, dir: string): Promise<Peer> {
    const peer = new Peer(node, new PeerDisk(memory), join(dir, `${node}.sock`));
    await new Promise<void>((resolve, reject) => {
      peer.listener.once('error', reject);
      peer.listener.listen(peer.socketPath, resolve);
    });
    return peer;
  }
  get connections(): number {
    return this.sockets.size;
  }
  async crash(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.listener.close(() => resolve()));
  }
  async stop(): Promise<void> {
    if (this.listener.listening) await this.crash();
    await this.nbd.close({ graceMs: 50 });
  }
}

interface Fixture {
  dir: string;
  /** One volume's bytes, shared by the peers (they are in-sync replicas). */
  memory: MemoryDevice;
  peers: Peer[];
  targets: ForwardTarget[];
  device: ForwardingDevice;
  log: ReturnType<typeof createMemoryLogger>;
}

async function setUp(options: { peers: number; waitMaxMs?: number; start?: boolean }): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-diskless-'));
  const memory = new MemoryDevice({ name: VOLUME, sizeBytes: SIZE_BYTES, blockSizeMin: 512 });
  const peers: Peer[] = [];
  for (let index = 0; index < options.peers; index++) peers.push(await Peer.start(`n${index + 2}`, memory, dir));
  const targets = peers.map((peer) => peer.target);
  const log = createMemoryLogger();
  const device = new ForwardingDevice({
    name: VOLUME,
    geometry: { ...memory.geometry() },
    targets: () => targets,
    logger: log,
    waitMaxMs: options.waitMaxMs ?? 10_000,
    retryDelayInitialMs: 10,
    retryDelayMaxMs: 50,
  });
  if (options.start ?? true) device.start();
  return { dir, memory, peers, targets, device, log };
}

async function tearDown(f: Fixture): Promise<void> {
  f.device.close();
  for (const peer of f.peers) await peer.stop();
  await rm(f.dir, { recursive: true, force: true });
}

function pattern(seed: number, lengthBytes = BLOCK_BYTES): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i += 4) data.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return data;
}

async function readBytes(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const pieces = await device.read(offset, length);
  return Buffer.concat(pieces.map((piece) => (piece.kind === 'data' ? piece.data : Buffer.alloc(piece.length))));
}

async function waitFor(probe: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

test('the peer choice skips peers that failed recently, and says when to look again', () => {
  const targets: ForwardTarget[] = [{ node: 'n2', target: { path: '/a' } }, { node: 'n3', target: { path: '/b' } }];
  assert.deepEqual(chooseTarget(targets, new Map(), 100), { target: targets[0] });
  assert.deepEqual(chooseTarget(targets, new Map([['n2', 150]]), 100), { target: targets[1] });
  assert.deepEqual(chooseTarget(targets, new Map([['n2', 150], ['n3', 120]]), 100), { retryAtMs: 120 });
  assert.deepEqual(chooseTarget(targets, new Map([['n2', 100]]), 100), { target: targets[0] }, 'avoided until, not through');
  assert.deepEqual(chooseTarget([], new Map(), 100), { retryAtMs: undefined });
  // Retried: the peer cannot serve now. Passed on: the peer's answer about the request itself.
  for (const errno of [ERRNO.EIO, ERRNO.ESHUTDOWN, ERRNO.ENOSPC]) assert.equal(classifyPeerError(errno), 'retry');
  for (const errno of [ERRNO.EPERM, ERRNO.EINVAL, ERRNO.ENOTSUP, ERRNO.EOVERFLOW]) assert.equal(classifyPeerError(errno), 'pass');
});

test('requests are held until start, then every kind is forwarded to the first in-sync peer', async () => {
  const f = await setUp({ peers: 2, start: false });
  try {
    const early = f.device.write(0, pattern(1), { fua: false });
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(f.device.stats().state, 'held');
    assert.equal(f.peers[0]!.disk.served, 0, 'nothing reached a peer before start');
    f.device.start();
    await early;
    await f.device.write(BLOCK_BYTES, pattern(2), { fua: true });
    await f.device.writeZeroes(2 * BLOCK_BYTES, BLOCK_BYTES, { fua: false, mayTrim: false, fastZero: false });
    await f.device.trim(3 * BLOCK_BYTES, BLOCK_BYTES, { fua: false });
    await f.device.flush();
    await f.device.cache(0, BLOCK_BYTES);
    assert.deepEqual(await readBytes(f.device, 0, 2 * BLOCK_BYTES), Buffer.concat([pattern(1), pattern(2)]));
    assert.deepEqual(await readBytes(f.device, 2 * BLOCK_BYTES, 2 * BLOCK_BYTES), Buffer.alloc(2 * BLOCK_BYTES));
    assert.equal(f.memory.counters.fuaWrites, 1);
    assert.equal(f.memory.counters.flushes, 1);
    assert.equal(f.peers[1]!.disk.served, 0, 'only the first peer was used');
    const stats = f.device.stats();
    assert.equal(stats.state, 'connected');
    assert.equal(stats.node, 'n2');
    assert.equal(stats.connections, 1);
    assert.equal(stats.forwardedRequests, 8);
    assert.deepEqual(f.device.blockStatus(SIZE_BYTES - 4096, 1 << 20), [{ offset: SIZE_BYTES - 4096, length: 4096, hole: false, zero: false }]);
  } finally {
    await tearDown(f);
  }
});

test("a peer's EIO is retried on another peer once the first answered what it had in flight; the client sees no error", async () => {
  const f = await setUp({ peers: 2 });
  try {
    await f.device.write(0, pattern(1), { fua: false });
    const first = f.peers[0]!.disk;
    first.refuse = 'NBD_EIO'; // fenced, rejoining, or its own disk failed
    const writes = Array.from({ length: 16 }, (_, i) => f.device.write((i + 1) * BLOCK_BYTES, pattern(100 + i), { fua: false }));
    const flush = f.device.flush();
    await Promise.all([...writes, flush]);
    for (let i = 0; i < 16; i++) assert.deepEqual(await readBytes(f.device, (i + 1) * BLOCK_BYTES, BLOCK_BYTES), pattern(100 + i));
    const stats = f.device.stats();
    assert.equal(stats.node, 'n3');
    assert.ok(stats.retriedRequests >= 1, `retried ${stats.retriedRequests}`);
    assert.equal(stats.failedRequests, 0);
    assert.equal(stats.replayedRequests, 0, 'the peer was left gracefully: nothing was in doubt');
    assert.ok(f.log.lines.some((line) => /forwarding peer refused a request: moving to another in-sync peer .*peer=n2 .*next=n3/.test(line)), f.log.lines.join('\n'));
    await waitFor(() => f.peers[0]!.connections === 0, 'the connection to n2 to be closed');
  } finally {
    await tearDown(f);
  }
});

test('a lost connection replays what was in flight on the next peer, in arrival order', async () => {
  const f = await setUp({ peers: 2 });
  try {
    await f.device.write(0, pattern(1), { fua: false });
    f.peers[0]!.disk.hold = true; // about to be SIGKILLed: what it holds is never applied
    const writes = Array.from({ length: 8 }, (_, i) => f.device.write((i + 1) * BLOCK_BYTES, pattern(200 + i), { fua: false }));
    const read = readBytes(f.device, 0, BLOCK_BYTES);
    await waitFor(() => f.peers[0]!.disk.held === 9, 'nine requests held by n2');
    await f.peers[0]!.crash();
    await Promise.all(writes);
    assert.deepEqual(await read, pattern(1));
    for (let i = 0; i < 8; i++) assert.deepEqual(await readBytes(f.device, (i + 1) * BLOCK_BYTES, BLOCK_BYTES), pattern(200 + i));
    const stats = f.device.stats();
    assert.equal(stats.node, 'n3');
    assert.equal(stats.replayedRequests, 9);
    assert.equal(stats.failedRequests, 0);
    assert.ok(f.log.lines.some((line) => /forwarding connection lost: replaying its requests on the next in-sync peer peer=n2 .*replayed=9/.test(line)), f.log.lines.join('\n'));
  } finally {
    await tearDown(f);
  }
});

test("a peer's answer about the request itself (EPERM of a strict volume, EINVAL) is passed on, not retried", async () => {
  const f = await setUp({ peers: 2 });
  try {
    f.peers[0]!.disk.refuse = 'NBD_EPERM';
    await assert.rejects(f.device.write(0, pattern(1), { fua: false }), (error: unknown) => isMirrorsanError(error, 'NBD_EPERM') && /peer refuses/.test((error as Error).message));
    assert.deepEqual(await readBytes(f.device, 0, 4096), Buffer.alloc(4096), 'reads still go through');
    f.peers[0]!.disk.refuse = undefined;
    // Past the end: the peer's NBD server refuses it (our own server would have, before us).
    await assert.rejects(f.device.read(SIZE_BYTES, 4096), (error: unknown) => isMirrorsanError(error, 'NBD_EINVAL'));
    const stats = f.device.stats();
    assert.equal(stats.retriedRequests, 0);
    assert.equal(stats.node, 'n2');
    assert.equal(f.peers[1]!.disk.served, 0);
  } finally {
    await tearDown(f);
  }
});

test('a peer that leaves the in-sync set is left once its requests are answered', async () => {
  const f = await setUp({ peers: 2 });
  try {
    await f.device.write(0, pattern(1), { fua: false });
    assert.equal(f.device.stats().node, 'n2');
    f.targets.splice(0, 1); // the record no longer lists n2 in sync
    await f.device.write(BLOCK_BYTES, pattern(2), { fua: false });
    await f.device.write(2 * BLOCK_BYTES, pattern(3), { fua: false });
    assert.equal(f.device.stats().node, 'n3');
    assert.ok(f.peers[1]!.disk.served >= 1);
    assert.deepEqual(await readBytes(f.device, BLOCK_BYTES, 2 * BLOCK_BYTES), Buffer.concat([pattern(2), pattern(3)]));
  } finally {
    await tearDown(f);
  }
});

test('with no in-sync peer a request waits its bound, then fails with EIO and a clear log line; later ones go through once a peer is back', async () => {
  const waitMaxMs = 300;
  const f = await setUp({ peers: 1, waitMaxMs });
  try {
    const saved = f.targets.splice(0, 1);
    const started = performance.now();
    await assert.rejects(f.device.write(0, pattern(1), { fua: false }), (error: unknown) => isMirrorsanError(error, 'NBD_EIO') && /no in-sync peer answered within 300 ms: no in-sync peer could be reached/.test((error as Error).message));
    const waitedMs = performance.now() - started;
    assert.ok(waitedMs >= waitMaxMs - 5 && waitedMs < waitMaxMs + 1000, `waited ${Math.round(waitedMs)} ms`);
    assert.ok(f.log.lines.some((line) => /no in-sync peer to forward to: requests wait/.test(line)));
    assert.ok(f.log.lines.some((line) => /error .*forwarded requests failed: no in-sync peer answered in time failed=1 waitMaxMs=300/.test(line)), f.log.lines.join('\n'));
    assert.equal(f.device.stats().failedRequests, 1);
    // A peer appears (a record change): the next request goes through.
    f.targets.push(...saved);
    await f.device.write(0, pattern(2), { fua: false });
    assert.deepEqual(await readBytes(f.device, 0, BLOCK_BYTES), pattern(2));
    // A peer that keeps refusing: the request fails after its bound too, naming the last error.
    f.peers[0]!.disk.refuse = 'NBD_EIO';
    await assert.rejects(f.device.read(0, 4096), (error: unknown) => isMirrorsanError(error, 'NBD_EIO') && /n2: .*peer refuses/.test((error as Error).message));
  } finally {
    await tearDown(f);
  }
});

test('drain waits for every request; close fails what is still pending with NBD_SHUTDOWN', async () => {
  const f = await setUp({ peers: 1 });
  try {
    await f.device.write(0, pattern(1), { fua: false });
    await f.device.drain();
    f.peers[0]!.disk.hold = true;
    const held = f.device.write(BLOCK_BYTES, pattern(2), { fua: false });
    let drained = false;
    void f.device.drain().then(() => (drained = true));
    await waitFor(() => f.peers[0]!.disk.held === 1, 'the write held by the peer');
    assert.equal(drained, false);
    f.device.close();
    await assert.rejects(held, (error: unknown) => isMirrorsanError(error, 'NBD_SHUTDOWN'));
    await waitFor(() => drained, 'drain to end at close');
    await assert.rejects(f.device.flush(), (error: unknown) => isMirrorsanError(error, 'NBD_SHUTDOWN'));
  } finally {
    await tearDown(f);
  }
});
