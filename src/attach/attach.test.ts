// Proves FailoverDevice forwards every request to a node, survives a node crash with requests in flight (replaying them on the next node, no client error), gives up on a node that answers nothing for the request timeout (a stopped process) but not on one that answers slowly, replays a request that a fenced node refused as not serving (the marker is the replicated volume's own text) while passing every other error reply through unretried, and fails held requests with EIO after the failover timeout, also when every node refuses.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { NbdClient, NbdClientError } from '../nbd/client.js';
import { StaticExportRegistry } from '../nbd/registry.js';
import { NbdServer } from '../nbd/server.js';
import { createLogger, createMemoryLogger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from '../volume/device.js';
import { MemoryDevice } from '../volume/memory-device.js';
import { ReplicatedVolume } from '../volume/replicated-volume.js';
import { FailoverDevice, NOT_SERVING_MARKER } from './attach.js';

const VOLUME = 'vol0';
const SIZE_BYTES = 4 * 1024 * 1024;
const BLOCK_BYTES = 64 * 1024;

/**
 * The node's storage: a MemoryDevice that can stop answering (requests held forever, as in a
 * process that is about to be SIGKILLed) and can refuse writes at one offset (a full disk).
 */
class NodeDisk implements BlockDevice {
  readonly name = VOLUME;
  readonly description = 'test node disk';
  hold = false;
  held = 0;
  refuseWritesAt: number | undefined = undefined;
  refusedWrites = 0;
  /** Every request is refused with this (a fenced replicated volume's answer). */
  refuseAll: MirrorsanError | undefined = undefined;
  /** Writes at this offset take this long (a write waiting for its grant on a live node). */
  slowWrite: { offset: number; delayMs: number } | undefined = undefined;
  private readonly memory: MemoryDevice;
  constructor(memory: MemoryDevice) {
    this.memory = memory;
  }
  private async gate(): Promise<void> {
    if (this.refuseAll) throw this.refuseAll;
    if (!this.hold) return;
    this.held++;
    await new Promise<never>(() => {}); // never applied: the process dies first
  }
  geometry(): DeviceGeometry {
    return this.memory.geometry();
  }
  async read(offset: number, length: number): Promise<ReadPiece[]> {
    await this.gate();
    return this.memory.read(offset, length);
  }
  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    if (offset === this.refuseWritesAt) {
      this.refusedWrites++;
      throw new MirrorsanError('NBD_ENOSPC', 'no space left on the node');
    }
    await this.gate();
    if (offset === this.slowWrite?.offset) await new Promise((resolve) => setTimeout(resolve, this.slowWrite!.delayMs));
    return this.memory.write(offset, data, options);
  }
  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.gate();
    return this.memory.writeZeroes(offset, length, options);
  }
  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    await this.gate();
    return this.memory.trim(offset, length, options);
  }
  async flush(): Promise<void> {
    await this.gate();
    return this.memory.flush();
  }
  async cache(offset: number, length: number): Promise<void> {
    return this.memory.cache(offset, length);
  }
  blockStatus(offset: number, length: number): Extent[] {
    return this.memory.blockStatus(offset, length);
  }
}

/** A "node": an NbdServer on a unix socket whose connections can be cut at once, like a SIGKILL. */
class TestNode {
  readonly nbd: NbdServer;
  private readonly listener: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private constructor(disk: BlockDevice) {
    this.nbd = new NbdServer({ registry: new StaticExportRegistry([disk]), logger: createMemoryLogger() });
    this.listener = net.createServer((socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      this.nbd.handleConnection(socket);
    });
  }
  static async start(disk: BlockDevice, socketPath: string): Promise<TestNode> {
    const node = new TestNode(disk);
    await new Promise<void>((resolve, reject) => {
      node.listener.once('error', reject);
      node.listener.listen(socketPath, resolve);
    });
    return node;
  }
  /** Connections reset, listener gone: nothing the node held is answered. */
  async crash(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.listener.close(() => resolve()));
  }
  async stop(): Promise<void> {
    await this.crash();
    await this.nbd.close({ graceMs: 100 });
  }
}

interface Fixture {
  dir: string;
  memory: MemoryDevice;
  disk: NodeDisk;
  node: TestNode;
  device: FailoverDevice;
  front: NbdServer;
  user: NbdClient;
  log: ReturnType<typeof createMemoryLogger>;
  cleanup: Array<() => Promise<void> | void>;
}

async function setUp(options: { secondNode: boolean; failoverTimeoutMs: number; requestTimeoutMs?: number }): Promise<Fixture> {
  const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-attach-'));
  const memory = new MemoryDevice({ name: VOLUME, sizeBytes: SIZE_BYTES, blockSizeMin: 512 });
  const disk = new NodeDisk(memory);
  const node = await TestNode.start(disk, join(dir, 'a.sock'));
  const log = createMemoryLogger();
  const nodes = [{ path: join(dir, 'a.sock') }, ...(options.secondNode ? [{ path: join(dir, 'b.sock') }] : [])];
  const device = await FailoverDevice.open({
    name: VOLUME,
    nodes,
    logger: log,
    failoverTimeoutMs: options.failoverTimeoutMs,
    backoffInitialMs: 10,
    backoffMaxMs: 50,
    ...(options.requestTimeoutMs ? { requestTimeoutMs: options.requestTimeoutMs } : {}),
  });
  const front = new NbdServer({ registry: new StaticExportRegistry([device]), logger: createMemoryLogger() });
  await front.listen({ path: join(dir, 'front.sock') });
  const user = await NbdClient.connect({ path: join(dir, 'front.sock') }, { exportName: VOLUME });
  const fixture: Fixture = { dir, memory, disk, node, device, front, user, log, cleanup: [] };
  return fixture;
}

async function tearDown(f: Fixture): Promise<void> {
  f.user.close();
  await f.front.close({ graceMs: 100 });
  await f.device.close();
  await f.node.stop();
  for (const step of f.cleanup) await step();
  await rm(f.dir, { recursive: true, force: true });
}

function pattern(seed: number, lengthBytes = BLOCK_BYTES): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i += 4) data.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return data;
}

async function waitFor(probe: () => boolean, what: string, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

test('requests pass through to the node with its geometry', async () => {
  const f = await setUp({ secondNode: false, failoverTimeoutMs: 5_000 });
  try {
    assert.equal(f.user.sizeBytes, SIZE_BYTES);
    assert.equal(f.user.blockSizes?.minimum, 512);
    assert.equal(f.user.canMultiConn, f.memory.geometry().multiConn);
    await f.user.write(0, pattern(1));
    await f.user.write(BLOCK_BYTES, pattern(2), { fua: true });
    await f.user.writeZeroes(2 * BLOCK_BYTES, BLOCK_BYTES, { noHole: true });
    await f.user.trim(3 * BLOCK_BYTES, BLOCK_BYTES);
    await f.user.flush();
    assert.deepEqual(await f.user.read(0, 2 * BLOCK_BYTES), Buffer.concat([pattern(1), pattern(2)]));
    assert.deepEqual(await f.user.read(2 * BLOCK_BYTES, 2 * BLOCK_BYTES), Buffer.alloc(2 * BLOCK_BYTES));
    assert.deepEqual(await f.memory.read(0, BLOCK_BYTES), [{ offset: 0, kind: 'data', data: pattern(1) }]);
    assert.equal(f.memory.counters.flushes, 1);
    assert.equal(f.memory.counters.fuaWrites, 1);
    assert.deepEqual({ ...f.device.stats(), node: '' }, { state: 'connected', node: '', failovers: 0, replayed: 0, pauseMsLast: 0, pending: 0, waiting: 0, failedRequests: 0, stalls: 0, notServing: 0 });
  } finally {
    await tearDown(f);
  }
});

test('a node crash with requests in flight is a pause: they are replayed on the next node, in order, without an error', async () => {
  const f = await setUp({ secondNode: true, failoverTimeoutMs: 10_000 });
  try {
    const blocks = 24;
    for (let i = 0; i < blocks; i++) await f.user.write(i * BLOCK_BYTES, pattern(i));
    // The node stops answering: everything from here on is in flight when it dies.
    f.disk.hold = true;
    const writes = Array.from({ length: blocks }, (_, i) => f.user.write((blocks + i) * BLOCK_BYTES, pattern(1000 + i)));
    const flush = f.user.flush();
    const reads = Array.from({ length: blocks }, (_, i) => f.user.read(i * BLOCK_BYTES, BLOCK_BYTES));
    const inflight = 2 * blocks + 1;
    await waitFor(() => f.disk.held === inflight, `${inflight} requests held by the node`);
    await f.node.crash();
    // Nobody serves the volume for a while: the reconnect attempts fail and back off.
    await new Promise((resolve) => setTimeout(resolve, 150));
    assert.equal(f.device.stats().state, 'reconnecting');
    // A request that arrives during the outage is held too.
    const late = f.user.write(2 * blocks * BLOCK_BYTES, pattern(9999));
    await waitFor(() => f.device.stats().pending === inflight + 1, 'the late request to be held');
    const second = await TestNode.start(new NodeDisk(f.memory), join(f.dir, 'b.sock'));
    f.cleanup.push(() => second.stop());

    await Promise.all([...writes, flush, late]);
    const readBack = await Promise.all(reads);
    for (let i = 0; i < blocks; i++) assert.deepEqual(readBack[i], pattern(i), `read of block ${i}`);
    for (let i = 0; i < blocks; i++) assert.deepEqual(await f.user.read((blocks + i) * BLOCK_BYTES, BLOCK_BYTES), pattern(1000 + i), `block ${blocks + i}`);
    assert.deepEqual(await f.user.read(2 * blocks * BLOCK_BYTES, BLOCK_BYTES), pattern(9999));

    const stats = f.device.stats();
    assert.equal(stats.state, 'connected');
    assert.equal(stats.failovers, 1);
    assert.equal(stats.replayed, inflight + 1);
    assert.ok(stats.pauseMsLast >= 150 && stats.pauseMsLast < 5_000, `pause ${stats.pauseMsLast} ms`);
    assert.equal(stats.node, `unix:${join(f.dir, 'b.sock')}`);
    const failoverLine = f.log.lines.find((line) => / failover /.test(line));
    assert.ok(failoverLine, f.log.lines.join('\n'));
    assert.match(failoverLine, new RegExp(`left=unix:${f.dir}/a.sock joined=unix:${f.dir}/b.sock replayed=${inflight + 1} pauseMs=\\d+`));
    assert.equal(f.front.stats().requestErrors, 0, 'the user saw no error');
  } finally {
    await tearDown(f);
  }
});

test("a node's error reply is passed to the client as it is, not retried", async () => {
  const f = await setUp({ secondNode: false, failoverTimeoutMs: 5_000 });
  try {
    f.disk.refuseWritesAt = BLOCK_BYTES;
    await assert.rejects(f.user.write(BLOCK_BYTES, pattern(1)), (error: unknown) => error instanceof NbdClientError && error.nbdError === 28);
    assert.equal(f.disk.refusedWrites, 1);
    // A read past the end is refused by the node (the front server would refuse it first,
    // so ask the device directly).
    await assert.rejects(f.device.read(SIZE_BYTES, 4096), (error: unknown) => isMirrorsanError(error, 'NBD_EINVAL'));
    assert.equal(f.node.nbd.stats().requestErrors, 2);
    assert.equal(f.device.stats().failovers, 0);
    assert.equal(f.device.stats().state, 'connected');
    await f.user.write(0, pattern(2));
    assert.deepEqual(await f.user.read(0, BLOCK_BYTES), pattern(2));
  } finally {
    await tearDown(f);
  }
});

test('with no node back within the failover timeout held requests fail with EIO, then the device recovers', async () => {
  const failoverTimeoutMs = 300;
  const f = await setUp({ secondNode: false, failoverTimeoutMs });
  try {
    await f.user.write(0, pattern(3));
    await f.node.crash();
    const started = Date.now();
    await assert.rejects(f.user.read(0, BLOCK_BYTES), (error: unknown) => error instanceof NbdClientError && error.nbdError === 5);
    const waitedMs = Date.now() - started;
    assert.ok(waitedMs >= failoverTimeoutMs / 2 && waitedMs < failoverTimeoutMs + 2_000, `failed after ${waitedMs} ms`);
    assert.equal(f.device.stats().state, 'down');
    assert.equal(f.device.stats().failedRequests, 1);
    assert.ok(f.log.lines.some((line) => line.includes('failover timed out')));
    // New requests fail at once while no node is there.
    await assert.rejects(f.user.write(0, pattern(4)), (error: unknown) => error instanceof NbdClientError && error.nbdError === 5);
    // The node comes back on its address: the device keeps looking, and serves again.
    const back = await TestNode.start(new NodeDisk(f.memory), join(f.dir, 'a.sock'));
    f.cleanup.push(() => back.stop());
    await waitFor(() => f.device.stats().state === 'connected', 'the device to reconnect');
    assert.deepEqual(await f.user.read(0, BLOCK_BYTES), pattern(3));
  } finally {
    await tearDown(f);
  }
});

test('a node that answers nothing for the request timeout (a stopped process) is given up on: its requests are replayed on the next node', async () => {
  const requestTimeoutMs = 300;
  const f = await setUp({ secondNode: true, failoverTimeoutMs: 10_000, requestTimeoutMs });
  try {
    const second = await TestNode.start(new NodeDisk(f.memory), join(f.dir, 'b.sock'));
    f.cleanup.push(() => second.stop());
    await f.user.write(0, pattern(1));
    // The connection stays open and nothing comes back, as from a process under SIGSTOP.
    f.disk.hold = true;
    const started = performance.now();
    const writes = Array.from({ length: 8 }, (_, i) => f.user.write((1 + i) * BLOCK_BYTES, pattern(100 + i)));
    const read = f.user.read(0, BLOCK_BYTES);
    await Promise.all(writes);
    assert.deepEqual(await read, pattern(1));
    const waitedMs = performance.now() - started;
    assert.ok(waitedMs >= requestTimeoutMs && waitedMs < requestTimeoutMs + 2_000, `replayed after ${Math.round(waitedMs)} ms`);
    for (let i = 0; i < 8; i++) assert.deepEqual(await f.user.read((1 + i) * BLOCK_BYTES, BLOCK_BYTES), pattern(100 + i));
    const stats = f.device.stats();
    assert.equal(stats.stalls, 1);
    assert.equal(stats.failovers, 1);
    assert.equal(stats.replayed, 9);
    assert.ok(stats.pauseMsLast >= requestTimeoutMs, `the pause counts from the node's last answer: ${stats.pauseMsLast} ms`);
    assert.equal(stats.node, `unix:${join(f.dir, 'b.sock')}`);
    assert.ok(f.log.lines.some((line) => /node lost .*reason="no answer for \d+ ms with 9 requests outstanding/.test(line)), f.log.lines.join('\n'));
    assert.equal(f.front.stats().requestErrors, 0, 'the user saw no error');
  } finally {
    await tearDown(f);
  }
});

test('a node that keeps answering is not given up on, even when one request takes longer than the request timeout', async () => {
  const requestTimeoutMs = 500;
  const f = await setUp({ secondNode: true, failoverTimeoutMs: 10_000, requestTimeoutMs });
  try {
    // A write waiting for its grant on a live node: slow, while everything else is answered.
    f.disk.slowWrite = { offset: 0, delayMs: 3 * requestTimeoutMs };
    const slow = f.user.write(0, pattern(7));
    for (let i = 0; i < 20; i++) {
      await f.user.read(BLOCK_BYTES, BLOCK_BYTES);
      await new Promise((resolve) => setTimeout(resolve, 75));
    }
    await slow;
    assert.deepEqual(await f.user.read(0, BLOCK_BYTES), pattern(7));
    assert.equal(f.device.stats().stalls, 0);
    assert.equal(f.device.stats().failovers, 0);
  } finally {
    await tearDown(f);
  }
});

test("a fenced node's refusal (not serving on this node) is replayed on the next node; any other EIO is the client's", async () => {
  const f = await setUp({ secondNode: true, failoverTimeoutMs: 10_000 });
  try {
    const second = await TestNode.start(new NodeDisk(f.memory), join(f.dir, 'b.sock'));
    f.cleanup.push(() => second.stop());
    await f.user.write(0, pattern(1));
    f.disk.refuseAll = new MirrorsanError('NBD_EIO', `volume ${VOLUME}: ${NOT_SERVING_MARKER}: lease lost: the coordinator lease of n1 ran out`);
    await f.user.write(BLOCK_BYTES, pattern(2));
    assert.deepEqual(await f.user.read(0, 2 * BLOCK_BYTES), Buffer.concat([pattern(1), pattern(2)]));
    assert.equal(f.device.stats().notServing, 1);
    assert.equal(f.device.stats().failovers, 1);
    assert.equal(f.front.stats().requestErrors, 0, 'the user saw no error');
  } finally {
    await tearDown(f);
  }
  // A plain I/O error says nothing about where else the request could go: passed through.
  const g = await setUp({ secondNode: false, failoverTimeoutMs: 5_000 });
  try {
    g.disk.refuseAll = new MirrorsanError('NBD_EIO', 'the disk failed');
    await assert.rejects(g.user.read(0, BLOCK_BYTES), (error: unknown) => error instanceof NbdClientError && error.nbdError === 5 && /the disk failed/.test(error.message));
    assert.equal(g.device.stats().notServing, 0);
    assert.equal(g.device.stats().failovers, 0);
  } finally {
    await tearDown(g);
  }
});

test('when every node refuses as not serving, held requests fail with EIO after the failover timeout (no endless replay)', async () => {
  const failoverTimeoutMs = 400;
  const f = await setUp({ secondNode: true, failoverTimeoutMs });
  try {
    const refusal = new MirrorsanError('NBD_EIO', `volume ${VOLUME}: ${NOT_SERVING_MARKER}: n2 is not in the in-sync set of epoch 7`);
    const secondDisk = new NodeDisk(f.memory);
    secondDisk.refuseAll = refusal;
    const second = await TestNode.start(secondDisk, join(f.dir, 'b.sock'));
    f.cleanup.push(() => second.stop());
    f.disk.refuseAll = refusal;
    const started = performance.now();
    await assert.rejects(f.user.write(0, pattern(1)), (error: unknown) => error instanceof NbdClientError && error.nbdError === 5 && /came back within/.test(error.message));
    const waitedMs = performance.now() - started;
    assert.ok(waitedMs >= failoverTimeoutMs - 50 && waitedMs < failoverTimeoutMs + 2_000, `failed after ${Math.round(waitedMs)} ms`);
    // The replays back off: a handful of attempts, not one per event-loop turn.
    const refusals = f.device.stats().notServing;
    assert.ok(refusals >= 2 && refusals < 40, `${refusals} refusals`);
    assert.equal(f.disk.refusedWrites + secondDisk.refusedWrites, 0);
  } finally {
    await tearDown(f);
  }
});

test('the marker is what a fenced replicated volume answers', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-attach-marker-'));
  const volume = await ReplicatedVolume.open({
    name: VOLUME,
    sizeBytes: SIZE_BYTES,
    dir,
    self: 'n1',
    // n1 is not in the in-sync set: it refuses I/O until it has caught up.
    membership: { epoch: 3, replicas: ['n1', 'n2'], inSync: ['n2'] },
    transport: { sendToPeer: () => false, answerSource: () => false, resetInbound: () => undefined },
    logger: createLogger({ level: 'error' }),
  });
  try {
    await assert.rejects(volume.read(0, 4096), (error: unknown) => isMirrorsanError(error, 'NBD_EIO') && error.message.includes(NOT_SERVING_MARKER));
    await assert.rejects(
      (async () => volume.write(0, Buffer.alloc(4096), { fua: false }))(),
      (error: unknown) => isMirrorsanError(error, 'NBD_EIO') && error.message.includes(NOT_SERVING_MARKER),
    );
  } finally {
    await volume.close();
    await rm(dir, { recursive: true, force: true });
  }
});
