// Proves the multi-source replica store: entries from several sources and the node itself
// reach the image in arrival order, partitions stay bounded, reads wait for overlapping
// received entries, and replay (k-way merge by apply stamp) rebuilds exactly the arrival
// order after a crash, cuts torn tails, refuses mid-log corruption and honours checkpoints;
// large aligned writes (DIRECT_WRITE) log no payload, are synced with the image and are never
// overwritten by older entries at replay.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ENTRY_HEADER_BYTES, ENTRY_TYPE, decodeEntryAt, encodeHeader } from '../journal/entry.js';
import { SEGMENT_HEADER_BYTES } from '../journal/segment.js';
import { segmentFileName } from '../journal/wal.js';
import { AllocationMap } from '../store/alloc-map.js';
import { isMirrorsanError } from '../errors.js';
import { createMemoryLogger } from '../util/log.js';
import {
  ReplicaStore,
  STAMP_MAX,
  decodeCheckpoint,
  encodeCheckpoint,
  stampFields,
  stampOf,
  type ReplicaStoreOptions,
  type StoreEntryType,
} from './replica-store.js';

const SIZE_BYTES = 64 * 1024;
const SOURCES = ['a', 'b', 'c'] as const;

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'replica-store-'));
}

function openStore(dir: string, options: Partial<ReplicaStoreOptions> = {}): Promise<ReplicaStore> {
  return ReplicaStore.open({ dir, sizeBytes: SIZE_BYTES, logger: createMemoryLogger(), segmentCapacityBytes: 0, ...options });
}

/** A small seeded PRNG (mulberry32): every run draws the same operations. */
function prng(seed: number): (limit: number) => number {
  let state = seed >>> 0;
  return (limit) => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * limit);
  };
}

interface Op {
  /** A source id, or 'self' for the node's own write. */
  origin: string;
  sequence: number;
  type: StoreEntryType;
  offset: number;
  lengthBytes: number;
  payload: Buffer | undefined;
}

/** `count` operations interleaved across the sources (and self), inside [0, spanBytes). */
function generate(seed: number, count: number, spanBytes: number, origins: readonly string[], firstSequence: Record<string, number> = {}): Op[] {
  const random = prng(seed);
  const next: Record<string, number> = {};
  for (const origin of origins) next[origin] = firstSequence[origin] ?? 1;
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const origin = origins[random(origins.length)]!;
    const roll = random(10);
    const type: StoreEntryType = roll < 8 ? ENTRY_TYPE.WRITE : roll < 9 ? ENTRY_TYPE.ZERO : ENTRY_TYPE.TRIM;
    const offset = random(spanBytes - 1);
    const lengthBytes = 1 + random(Math.min(9000, spanBytes - offset));
    // Distinct bytes per operation, so the order of overlapping ones shows in the result.
    const payload = type === ENTRY_TYPE.WRITE ? Buffer.alloc(lengthBytes, (i % 251) + 1) : undefined;
    if (payload) payload.writeUInt8(random(256), lengthBytes - 1);
    ops.push({ origin, sequence: next[origin]!++, type, offset, lengthBytes, payload });
  }
  return ops;
}

function applyToModel(model: Buffer, ops: readonly Op[]): Buffer {
  for (const op of ops) {
    if (op.payload) op.payload.copy(model, op.offset);
    else model.fill(0, op.offset, op.offset + op.lengthBytes);
  }
  return model;
}

/** Hands `ops` to the store in order, without waiting in between; resolves when all applied. */
async function submit(store: ReplicaStore, ops: readonly Op[], afterEach?: () => void): Promise<void> {
  const done: Promise<unknown>[] = [];
  for (const op of ops) {
    if (op.origin === 'self') done.push(store.writeLocal(op.type, op.offset, op.lengthBytes, op.payload));
    else done.push(store.applyRemote(op.origin, { sequence: op.sequence, type: op.type, offset: op.offset, lengthBytes: op.lengthBytes }, op.payload));
    afterEach?.();
  }
  await Promise.all(done);
}

/** Zeroes the image file, as if none of its writes since creation had reached the disk. */
function wipeImage(dir: string): void {
  const image = path.join(dir, 'volume.img');
  fs.truncateSync(image, 0);
  fs.truncateSync(image, SIZE_BYTES);
}

test('stamps round-trip through the header fields; the checkpoint file round-trips and detects damage', () => {
  for (const stamp of [1, 0xffff_ffff, 2 ** 32, 2 ** 32 + 5, STAMP_MAX]) {
    const fields = stampFields(stamp);
    assert.ok(fields.flags <= 0xffff && fields.sourceId <= 0xffff_ffff);
    assert.equal(stampOf({ type: ENTRY_TYPE.WRITE, sequence: 1, offset: 0, lengthBytes: 1, ...fields }), stamp);
  }
  assert.throws(() => stampFields(STAMP_MAX + 1));
  assert.throws(() => stampFields(0));
  const map = AllocationMap.forSize(SIZE_BYTES, 4096);
  map.setRange(3, 2);
  const record = { format: 1, stamp: 77, ownSequence: 5, sources: { a: 9, b: 0 }, sizeBytes: SIZE_BYTES, blockSizeBytes: 4096 };
  const encoded = encodeCheckpoint(record, map);
  const decoded = decodeCheckpoint(encoded, 'test');
  assert.deepEqual(decoded.record, record);
  assert.deepEqual(decoded.map.runs(0, 16), map.runs(0, 16));
  for (const at of [0, 5, 14, encoded.length - 1]) {
    const damaged = Buffer.from(encoded);
    damaged[at]! ^= 0x10;
    assert.throws(() => decodeCheckpoint(damaged, 'test'), (error: unknown) => isMirrorsanError(error, 'STORE_IO'));
  }
});

test('three sources and local writes, overlapping and interleaved: the image equals the arrival-order model; partitions stay bounded', async () => {
  const dir = tempDir();
  const store = await openStore(dir, { partitionEntriesMax: 8, partitionBytesMax: 24 * 1024 });
  try {
    for (const source of SOURCES) assert.deepEqual(await store.addSource(source), { durableSequence: 0, checkpointSequence: 0 });
    const ops = generate(1, 400, SIZE_BYTES, [...SOURCES, 'self']);
    let maxEntries = 0;
    let maxBytes = 0;
    await submit(store, ops, () => {
      for (const source of Object.values(store.stats().sources)) {
        maxEntries = Math.max(maxEntries, source.partitionEntries);
        maxBytes = Math.max(maxBytes, source.partitionBytes);
      }
    });
    assert.ok(maxEntries > 1 && maxEntries < 8, `partition held at most ${maxEntries} entries`);
    assert.ok(maxBytes < 24 * 1024, `partition held at most ${maxBytes} bytes`);
    const stats = store.stats();
    for (const source of SOURCES) {
      const count = ops.filter((op) => op.origin === source).length;
      assert.equal(stats.sources[source]!.received, count);
      assert.ok(stats.sources[source]!.spilled >= count - 8, 'full partitions spilled by themselves');
    }
    assert.deepEqual(await store.read(0, SIZE_BYTES), applyToModel(Buffer.alloc(SIZE_BYTES), ops));
  } finally {
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('reads wait for overlapping entries received before them', async () => {
  const dir = tempDir();
  const store = await openStore(dir);
  try {
    await store.addSource('a');
    await store.addSource('b');
    for (let round = 0; round < 5; round++) {
      const applied: Promise<void>[] = [];
      let last = Buffer.alloc(0);
      for (let i = 1; i <= 12; i++) {
        const source = i % 2 === 0 ? 'a' : 'b';
        last = Buffer.alloc(16 * 1024, round * 16 + i);
        const sequence = store.stats().sources[source]!.received + 1;
        applied.push(store.applyRemote(source, { sequence, type: ENTRY_TYPE.WRITE, offset: 4096, lengthBytes: last.length }, last));
      }
      // Acknowledged on receipt: nothing awaited the applies before this read.
      const read = await store.read(8192, 4096);
      assert.deepEqual(read, last.subarray(4096, 8192), `round ${round}`);
      await Promise.all(applied);
    }
  } finally {
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a crash after spills: replay merges the logs by stamp and reproduces the arrival order across sources', async () => {
  const dir = tempDir();
  const copy = tempDir();
  const store = await openStore(dir, { partitionEntriesMax: 5 });
  let lost: Op[] = [];
  try {
    for (const source of SOURCES) await store.addSource(source);
    // Every operation inside 12 KiB: nearly all overlap, so the order decides the bytes.
    const ops = generate(2, 300, 12 * 1024, [...SOURCES, 'self']);
    await submit(store, ops);
    for (const source of SOURCES) await store.spill(source, { sync: true });
    await store.flushLocal();
    // Received and applied after the last spill, fewer than a partition holds: in memory
    // only, lost in the crash.
    lost = generate(3, 4, 12 * 1024, ['a'], { a: ops.filter((op) => op.origin === 'a').length + 1 });
    await submit(store, lost);
    fs.cpSync(dir, copy, { recursive: true });
  } finally {
    await store.close({ checkpoint: false });
  }
  wipeImage(copy);
  const reopened = await openStore(copy);
  try {
    const ops = generate(2, 300, 12 * 1024, [...SOURCES, 'self']);
    const expected = applyToModel(Buffer.alloc(SIZE_BYTES), ops);
    // The test can fail: replaying source by source gives other bytes.
    const bySource = [...SOURCES, 'self'].flatMap((origin) => ops.filter((op) => op.origin === origin));
    assert.notDeepEqual(applyToModel(Buffer.alloc(SIZE_BYTES), bySource), expected);
    assert.deepEqual(await reopened.read(0, SIZE_BYTES), expected);
    assert.equal(reopened.recovery.replayedEntries, ops.length);
    assert.equal(reopened.recovery.lastStamp, ops.length, 'the lost entries\' stamps are not in any log');
    for (const source of SOURCES) {
      const count = ops.filter((op) => op.origin === source).length;
      assert.deepEqual(reopened.recovery.sources.get(source), { durableSequence: count, checkpointSequence: 0 });
    }
    assert.equal(reopened.recovery.ownSequence, ops.filter((op) => op.origin === 'self').length);
    // The source resends from durableSequence + 1: the stream continues there.
    const resent = lost[0]!;
    await reopened.applyRemote('a', { sequence: resent.sequence, type: resent.type, offset: resent.offset, lengthBytes: resent.lengthBytes }, resent.payload);
    assert.equal(await reopened.spill('a', { sync: true }), resent.sequence);
  } finally {
    await reopened.close();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('a torn tail in one container is cut; corruption in the middle of a container refuses the open', async () => {
  const dir = tempDir();
  const store = await openStore(dir);
  const ops = generate(4, 60, 12 * 1024, ['a', 'b', 'self']);
  try {
    await store.addSource('a');
    await store.addSource('b');
    await submit(store, ops);
    await store.spill('a', { sync: true });
    await store.spill('b', { sync: true });
  } finally {
    await store.close({ checkpoint: false });
  }
  const segmentOfB = (root: string): string => path.join(root, 'containers', 'b', segmentFileName(1));
  const torn = tempDir();
  const corrupt = tempDir();
  fs.cpSync(dir, torn, { recursive: true });
  fs.cpSync(dir, corrupt, { recursive: true });
  try {
    // Torn: the last entry of b lost its final bytes.
    fs.truncateSync(segmentOfB(torn), fs.statSync(segmentOfB(torn)).size - 3);
    wipeImage(torn);
    const reopened = await openStore(torn);
    try {
      const lastOfB = ops.filter((op) => op.origin === 'b').at(-1)!;
      assert.deepEqual(reopened.recovery.cutTails, ['b']);
      assert.equal(reopened.recovery.sources.get('b')!.durableSequence, lastOfB.sequence - 1);
      assert.equal(reopened.recovery.sources.get('a')!.durableSequence, ops.filter((op) => op.origin === 'a').length);
      assert.deepEqual(await reopened.read(0, SIZE_BYTES), applyToModel(Buffer.alloc(SIZE_BYTES), ops.filter((op) => op !== lastOfB)));
    } finally {
      await reopened.close();
    }
    // Corrupt: a payload byte of b's first entry, with valid entries after it.
    const fd = fs.openSync(segmentOfB(corrupt), 'r+');
    const at = SEGMENT_HEADER_BYTES + ENTRY_HEADER_BYTES;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    byte[0]! ^= 0xff;
    fs.writeSync(fd, byte, 0, 1, at);
    fs.closeSync(fd);
    const firstOfB = ops.find((op) => op.origin === 'b')!;
    assert.equal(firstOfB.type, ENTRY_TYPE.WRITE, 'the damaged entry has a payload');
    await assert.rejects(openStore(corrupt), (error: unknown) => isMirrorsanError(error, 'JOURNAL_CORRUPT'));
  } finally {
    for (const root of [dir, torn, corrupt]) fs.rmSync(root, { recursive: true, force: true });
  }
});

test('checkpoint while entries keep arriving, then reopen: replay starts at the stamp, segments are dropped, streams continue', async () => {
  const dir = tempDir();
  const origins = [...SOURCES, 'self'];
  const first = generate(5, 200, SIZE_BYTES, origins);
  const countOf = (ops: readonly Op[], origin: string): number => ops.filter((op) => op.origin === origin).length;
  const after = (ops: readonly Op[]): Record<string, number> => Object.fromEntries(origins.map((origin) => [origin, countOf(ops, origin) + 1]));
  const second = generate(6, 200, SIZE_BYTES, origins, after(first));
  // Preallocated segments small enough that both batches rotate through several.
  const store = await openStore(dir, { segmentCapacityBytes: 64 * 1024, partitionEntriesMax: 16 });
  let checkpointStamp: number;
  try {
    for (const source of SOURCES) await store.addSource(source);
    const firstDone = submit(store, first);
    const checkpoint = store.checkpoint();
    const secondDone = submit(store, second);
    const result = await checkpoint;
    await Promise.all([firstDone, secondDone]);
    checkpointStamp = result.stamp;
    assert.equal(result.stamp, first.length, 'the checkpoint covers exactly what had arrived when it started');
    for (const source of SOURCES) {
      assert.equal(result.sources.get(source), countOf(first, source));
      assert.equal(store.sourceState(source)!.checkpointSequence, countOf(first, source));
      const { containerBytes } = store.stats().sources[source]!;
      assert.ok(containerBytes < 8 * 64 * 1024, `container of ${source} holds ${containerBytes} bytes after the checkpoint`);
    }
    for (const source of SOURCES) await store.spill(source, { sync: true });
    await store.flushLocal();
  } finally {
    await store.close({ checkpoint: false });
  }
  wipeImage(dir);
  // The wiped image lost the checkpointed bytes too: put them back from the model, as a
  // durable image would hold them, so that the result shows exactly what replay applied.
  const checkpointed = applyToModel(Buffer.alloc(SIZE_BYTES), first);
  const fd = fs.openSync(path.join(dir, 'volume.img'), 'r+');
  fs.writeSync(fd, checkpointed, 0, SIZE_BYTES, 0);
  fs.closeSync(fd);
  const reopened = await openStore(dir, { segmentCapacityBytes: 64 * 1024 });
  try {
    assert.equal(reopened.recovery.checkpointStamp, checkpointStamp);
    assert.equal(reopened.recovery.replayedEntries, second.length);
    for (const source of SOURCES) {
      assert.deepEqual(reopened.recovery.sources.get(source), {
        durableSequence: countOf(first, source) + countOf(second, source),
        checkpointSequence: countOf(first, source),
      });
    }
    const expected = applyToModel(Buffer.alloc(SIZE_BYTES), [...first, ...second]);
    assert.deepEqual(await reopened.read(0, SIZE_BYTES), expected);
    // Every stream, the own WAL included, continues after what it recovered.
    const third = generate(7, 60, SIZE_BYTES, origins, after([...first, ...second]));
    await submit(reopened, third);
    const afterThird = applyToModel(expected, third); // (updates expected in place)
    assert.deepEqual(await reopened.read(0, SIZE_BYTES), afterThird);
    const result = await reopened.checkpoint();
    assert.equal(result.stamp, reopened.recovery.lastStamp + third.length);
    // Received but never spilled: a clean close checkpoints, so nothing needs replay.
    const fourth = generate(8, 5, SIZE_BYTES, ['a'], after([...first, ...second, ...third]));
    await submit(reopened, fourth);
    assert.equal(reopened.stats().sources['a']!.partitionEntries, fourth.length);
    await reopened.close();
    const final = await openStore(dir, { segmentCapacityBytes: 64 * 1024 });
    try {
      assert.equal(final.recovery.replayedEntries, 0);
      assert.equal(final.recovery.sources.get('a')!.checkpointSequence, fourth.at(-1)!.sequence);
      assert.deepEqual(await final.read(0, SIZE_BYTES), applyToModel(afterThird, fourth));
    } finally {
      await final.close();
    }
  } finally {
    await reopened.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('refusals: unknown sources, out-of-order sequences, bad source ids, ranges outside the volume', async () => {
  const dir = tempDir();
  const store = await openStore(dir);
  try {
    const entry = { sequence: 1, type: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 4 } as const;
    assert.throws(() => store.applyRemote('nobody', entry, Buffer.alloc(4)), /unknown source/);
    await store.addSource('a');
    assert.throws(() => store.applyRemote('a', { ...entry, sequence: 2 }, Buffer.alloc(4)), /entry 2 after 0/);
    assert.throws(() => store.applyRemote('a', { ...entry, offset: SIZE_BYTES - 2 }, Buffer.alloc(4)), (error: unknown) => isMirrorsanError(error, 'STORE_RANGE'));
    await assert.rejects(store.addSource('../x'), (error: unknown) => isMirrorsanError(error, 'CONFIG_INVALID'));
    await store.applyRemote('a', entry, Buffer.alloc(4, 9));
    assert.deepEqual(await store.read(0, 4), Buffer.alloc(4, 9));
  } finally {
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// ---- DIRECT_WRITE: large aligned writes go to the image only ------------------------------

const DIRECT_SIZE_BYTES = 4 * 1024 * 1024;
const BLOCK = 4096;

function openDirectStore(dir: string, options: Partial<ReplicaStoreOptions> = {}): Promise<ReplicaStore> {
  return ReplicaStore.open({ dir, sizeBytes: DIRECT_SIZE_BYTES, logger: createMemoryLogger(), segmentCapacityBytes: 0, directWriteMinBytes: 64 * 1024, ...options });
}

/** Bytes that differ per operation and per position, so any misplaced or stale byte shows. */
function pattern(lengthBytes: number, seed: number): Buffer {
  const out = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i++) out[i] = (i * 31 + seed * 17 + 7) & 0xff;
  return out;
}

/** Every store log's bytes: the own WAL and each container. */
function logBytes(store: ReplicaStore): number {
  const stats = store.stats();
  return Object.values(stats.sources).reduce((sum, source) => sum + source.containerBytes, stats.ownLogBytes);
}

/**
 * Overwrites with 0xee the image blocks that a logged WRITE of `ops` touched and no large
 * aligned one (a DIRECT_WRITE) did: their bytes live in the logs, so replay must rebuild them.
 */
function garbleLoggedBlocks(dir: string, ops: readonly Op[], sizeBytes: number): number {
  const DIRECT = 2;
  const LOGGED = 1;
  const owner = new Uint8Array(sizeBytes / BLOCK);
  for (const op of ops) {
    if (op.type !== ENTRY_TYPE.WRITE) continue;
    const direct = op.lengthBytes >= 64 * 1024 && op.offset % BLOCK === 0 && op.lengthBytes % BLOCK === 0;
    const last = Math.ceil((op.offset + op.lengthBytes) / BLOCK);
    for (let block = Math.floor(op.offset / BLOCK); block < last; block++) owner[block] = Math.max(owner[block]!, direct ? DIRECT : LOGGED);
  }
  const fd = fs.openSync(path.join(dir, 'volume.img'), 'r+');
  const garbage = Buffer.alloc(BLOCK, 0xee);
  let garbled = 0;
  for (let block = 0; block < owner.length; block++) {
    if (owner[block] !== LOGGED) continue;
    fs.writeSync(fd, garbage, 0, BLOCK, block * BLOCK);
    garbled++;
  }
  fs.closeSync(fd);
  return garbled;
}

test('DIRECT_WRITE: large aligned writes, own and remote, log no payload; FUA and SYNC sync the image; replay never overwrites them with older entries', async () => {
  const dir = tempDir();
  const copy = tempDir();
  const store = await openDirectStore(dir);
  const big = 256 * 1024;
  const model = Buffer.alloc(DIRECT_SIZE_BYTES);
  const ops: Op[] = [];
  const seq: Record<string, number> = { a: 0, b: 0 };
  const run = async (origin: string, type: StoreEntryType, offset: number, lengthBytes: number, payload?: Buffer): Promise<void> => {
    const op: Op = { origin, sequence: origin === 'self' ? 0 : ++seq[origin]!, type, offset, lengthBytes, payload };
    ops.push(op);
    applyToModel(model, [op]);
    await submit(store, [op]);
  };
  try {
    await store.addSource('a');
    await store.addSource('b');
    // Older logged entries, then a newer direct write over the same blocks: replay must keep
    // the direct bytes. Then newer logged entries over part of it: replay must apply them.
    await run('self', ENTRY_TYPE.WRITE, 0, 8192, pattern(8192, 1));
    await run('a', ENTRY_TYPE.WRITE, BLOCK + 512, 1024, pattern(1024, 2));
    await run('b', ENTRY_TYPE.TRIM, big, big);
    await store.spill('a', { sync: false });
    const before = { logs: logBytes(store), directs: store.stats().directWrites };
    await run('self', ENTRY_TYPE.WRITE, 0, big, pattern(big, 3)); // direct, own
    await run('a', ENTRY_TYPE.WRITE, 2 * big, big, pattern(big, 4)); // direct, remote
    await store.spill('a', { sync: false });
    assert.equal(store.stats().directWrites - before.directs, 2);
    assert.ok(logBytes(store) - before.logs <= 2 * ENTRY_HEADER_BYTES, `the direct writes logged no payload (${logBytes(store) - before.logs} bytes)`);
    await run('b', ENTRY_TYPE.WRITE, 2 * BLOCK, BLOCK, pattern(BLOCK, 5)); // newer, logged, inside the own direct range
    await run('self', ENTRY_TYPE.WRITE, 2 * big + 100, 300, pattern(300, 6)); // newer, logged, inside a's direct range
    await run('b', ENTRY_TYPE.WRITE, big, big, pattern(big, 7)); // direct over the trimmed range
    await run('a', ENTRY_TYPE.TRIM, big + 64 * 1024, 64 * 1024); // newer trim inside b's direct range
    await run('a', ENTRY_TYPE.WRITE, 2 * 1024 * 1024 + 100, 10_000, pattern(10_000, 10)); // logged, away from any direct write
    await run('self', ENTRY_TYPE.ZERO, 2 * 1024 * 1024 + BLOCK, 2000); // logged zeros inside it
    // SYNC of b: its direct write reaches the container only after an image sync covering it.
    const imageSyncsBeforeSync = store.stats().imageSyncs;
    assert.equal(await store.spill('b', { sync: true }), seq.b);
    assert.ok(store.stats().imageSyncs > imageSyncsBeforeSync, 'a spill with a direct write synced the image first');
    assert.equal(await store.spill('a', { sync: true }), seq.a);
    await run('self', ENTRY_TYPE.WRITE, 3 * big, big, pattern(big, 8)); // direct, own, at the end
    // FLUSH (or FUA) after the own direct write: its entry and the image are durable.
    const imageSyncs = store.stats().imageSyncs;
    await store.flushLocal();
    assert.ok(store.stats().imageSyncs > imageSyncs, 'the own FLUSH synced the image after a direct write');
    assert.deepEqual(await store.read(0, DIRECT_SIZE_BYTES), model);
    // A crash now: the files as they are, no checkpoint.
    fs.cpSync(dir, copy, { recursive: true });
  } finally {
    await store.close({ checkpoint: false });
  }
  const garbled = garbleLoggedBlocks(copy, ops, DIRECT_SIZE_BYTES);
  assert.ok(garbled > 0);
  const reopened = await openDirectStore(copy);
  try {
    assert.equal(reopened.recovery.replayedEntries, ops.length);
    assert.deepEqual(reopened.recovery.sources.get('a'), { durableSequence: seq.a, checkpointSequence: 0 });
    assert.deepEqual(reopened.recovery.sources.get('b'), { durableSequence: seq.b, checkpointSequence: 0 });
    assert.deepEqual(await reopened.read(0, DIRECT_SIZE_BYTES), model, 'replay kept every direct write and applied the newer entries');
    assert.ok(fs.readFileSync(path.join(copy, 'volume.img')).equals(model), 'the image file equals the content');
    // The newer trim inside b's direct range reads as zeros and is a hole in the map again:
    // what a later partial write into it would pad with.
    await reopened.writeLocal(ENTRY_TYPE.WRITE, big + 64 * 1024 + 10, 20, pattern(20, 9));
    const expected = Buffer.alloc(BLOCK);
    pattern(20, 9).copy(expected, 10);
    assert.deepEqual(await reopened.read(big + 64 * 1024, BLOCK), expected);
  } finally {
    await reopened.close();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('DIRECT_WRITE: many concurrent own and remote writes, large and small, overlapping: the image equals arrival order, live and after replay', async () => {
  const dir = tempDir();
  const copy = tempDir();
  const origins = ['self', 'a', 'b'];
  const random = prng(11);
  const next: Record<string, number> = { a: 1, b: 1, self: 1 };
  const ops: Op[] = [];
  for (let i = 0; i < 300; i++) {
    const origin = origins[random(origins.length)]!;
    const roll = random(10);
    let op: Op;
    if (roll < 4) {
      // Large and aligned: direct. Inside 1 MiB so that nearly everything overlaps.
      const lengthBytes = (16 + random(48)) * BLOCK;
      const offset = random((1024 * 1024 - lengthBytes) / BLOCK) * BLOCK;
      op = { origin, sequence: next[origin]!++, type: ENTRY_TYPE.WRITE, offset, lengthBytes, payload: pattern(lengthBytes, i) };
    } else if (roll < 9) {
      const lengthBytes = 1 + random(9000);
      const offset = random(1024 * 1024 - lengthBytes);
      op = { origin, sequence: next[origin]!++, type: ENTRY_TYPE.WRITE, offset, lengthBytes, payload: pattern(lengthBytes, i) };
    } else {
      const lengthBytes = 1 + random(200 * 1024);
      const offset = random(1024 * 1024 - lengthBytes);
      op = { origin, sequence: next[origin]!++, type: random(2) === 0 ? ENTRY_TYPE.ZERO : ENTRY_TYPE.TRIM, offset, lengthBytes, payload: undefined };
    }
    ops.push(op);
  }
  const model = applyToModel(Buffer.alloc(DIRECT_SIZE_BYTES), ops);
  const store = await openDirectStore(dir, { partitionEntriesMax: 7 });
  try {
    await store.addSource('a');
    await store.addSource('b');
    // Submitted without waiting in between: own entries queue behind direct writes still on
    // their way to the image, partitions spill while their direct writes are in flight.
    const flushes: Promise<void>[] = [];
    await submit(store, ops, () => {
      if (random(20) === 0) flushes.push(store.flushLocal());
    });
    await Promise.all(flushes);
    assert.ok(store.stats().directWrites > 50, `${store.stats().directWrites} direct writes`);
    assert.deepEqual(await store.read(0, DIRECT_SIZE_BYTES), model);
    await store.spill('a', { sync: true });
    await store.spill('b', { sync: true });
    await store.flushLocal();
    fs.cpSync(dir, copy, { recursive: true });
  } finally {
    await store.close({ checkpoint: false });
  }
  garbleLoggedBlocks(copy, ops, DIRECT_SIZE_BYTES);
  const reopened = await openDirectStore(copy);
  try {
    assert.equal(reopened.recovery.replayedEntries, ops.length);
    assert.equal(reopened.recovery.ownSequence, next.self! - 1);
    assert.deepEqual(await reopened.read(0, DIRECT_SIZE_BYTES), model);
  } finally {
    await reopened.close();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(copy, { recursive: true, force: true });
  }
});

test('DIRECT_WRITE across a checkpoint: replay starts above it and still honours direct writes on both sides', async () => {
  const dir = tempDir();
  const store = await openDirectStore(dir, { partitionEntriesMax: 3 });
  const model = Buffer.alloc(DIRECT_SIZE_BYTES);
  const ops: Op[] = [];
  const next: Record<string, number> = { a: 1, self: 1 };
  const add = (origin: string, offset: number, lengthBytes: number, seed: number): Op => {
    const op: Op = { origin, sequence: next[origin]!++, type: ENTRY_TYPE.WRITE, offset, lengthBytes, payload: pattern(lengthBytes, seed) };
    ops.push(op);
    return op;
  };
  try {
    await store.addSource('a');
    const first = [add('a', 0, 128 * 1024, 1), add('self', 64 * 1024, 8192, 2), add('a', 256 * 1024, 8192, 3), add('self', 256 * 1024, 128 * 1024, 4)];
    const firstDone = submit(store, first);
    const checkpoint = store.checkpoint();
    const second = [add('self', 0, 4096, 5), add('a', 0, 64 * 1024, 6), add('self', 300 * 1024, 100, 7), add('a', 512 * 1024, 64 * 1024, 8)];
    const secondDone = submit(store, second);
    const result = await checkpoint;
    await Promise.all([firstDone, secondDone]);
    assert.equal(result.stamp, first.length);
    applyToModel(model, ops);
    await store.spill('a', { sync: true });
    await store.flushLocal();
  } finally {
    await store.close({ checkpoint: false });
  }
  garbleLoggedBlocks(dir, ops.slice(4), DIRECT_SIZE_BYTES);
  // The checkpointed state is durable in the image: put back what the garbling destroyed of it.
  const checkpointed = applyToModel(Buffer.alloc(DIRECT_SIZE_BYTES), ops.slice(0, 4));
  const fd = fs.openSync(path.join(dir, 'volume.img'), 'r+');
  for (let block = 0; block < DIRECT_SIZE_BYTES / BLOCK; block++) {
    const touched = (op: Op): boolean => op.offset < (block + 1) * BLOCK && block * BLOCK < op.offset + op.lengthBytes;
    const inDirect = ops.slice(4).some((op) => op.lengthBytes >= 64 * 1024 && touched(op));
    if (!inDirect && ops.slice(4).some(touched)) fs.writeSync(fd, checkpointed, block * BLOCK, BLOCK, block * BLOCK);
  }
  fs.closeSync(fd);
  const reopened = await openDirectStore(dir);
  try {
    assert.equal(reopened.recovery.replayedEntries, 4);
    assert.deepEqual(await reopened.read(0, DIRECT_SIZE_BYTES), model);
  } finally {
    await reopened.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('DIRECT_WRITE refusals: a misaligned DIRECT_WRITE entry in a log refuses the open', async () => {
  const dir = tempDir();
  const store = await openDirectStore(dir);
  try {
    await store.addSource('a');
    await store.applyRemote('a', { sequence: 1, type: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 64 * 1024 }, pattern(64 * 1024, 1));
    await store.spill('a', { sync: true });
  } finally {
    await store.close({ checkpoint: false });
  }
  // Rewrite the container's only entry as a DIRECT_WRITE at an unaligned offset (CRCs redone).
  const file = path.join(dir, 'containers', 'a', segmentFileName(1));
  const bytes = fs.readFileSync(file);
  const at = SEGMENT_HEADER_BYTES;
  assert.equal(bytes[at + 5], ENTRY_TYPE.DIRECT_WRITE, 'the spilled entry is a DIRECT_WRITE');
  const generation = bytes.readUInt32LE(at + 40);
  const decoded = decodeEntryAt(bytes, at, generation);
  assert.ok(decoded.status === 'entry');
  encodeHeader({ ...decoded.entry, offset: 512 }, undefined, generation).copy(bytes, at);
  fs.writeFileSync(file, bytes);
  try {
    await assert.rejects(openDirectStore(dir), (error: unknown) => isMirrorsanError(error, 'JOURNAL_CORRUPT'));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('DIRECT_WRITE ordering: an entry whose image write failed never reaches its log, own or container', async () => {
  const dir = tempDir();
  let failNext = false;
  const faults = { failImageWrites: () => failNext && !(failNext = false) };
  const store = await openDirectStore(dir, { faults });
  try {
    await store.addSource('a');
    // A good start: one logged and one direct entry in each log, durable.
    await store.writeLocal(ENTRY_TYPE.WRITE, 0, 100, pattern(100, 1));
    await store.writeLocal(ENTRY_TYPE.WRITE, 64 * 1024, 64 * 1024, pattern(64 * 1024, 2));
    await store.applyRemote('a', { sequence: 1, type: ENTRY_TYPE.WRITE, offset: 8192, lengthBytes: 100 }, pattern(100, 3));
    await store.applyRemote('a', { sequence: 2, type: ENTRY_TYPE.WRITE, offset: 256 * 1024, lengthBytes: 64 * 1024 }, pattern(64 * 1024, 4));
    await store.flushLocal();
    assert.equal(await store.spill('a', { sync: true }), 2);
    // The remote direct write's image write fails: the spill that holds it fails too, and
    // its entry is not appended. Then the own one: it is not appended either.
    failNext = true;
    const remote = store.applyRemote('a', { sequence: 3, type: ENTRY_TYPE.WRITE, offset: 512 * 1024, lengthBytes: 64 * 1024 }, pattern(64 * 1024, 5));
    const spilled = store.spill('a', { sync: true });
    await assert.rejects(remote, (error: unknown) => isMirrorsanError(error, 'STORE_IO'));
    await assert.rejects(spilled, (error: unknown) => isMirrorsanError(error, 'STORE_IO'));
    await assert.rejects(store.writeLocal(ENTRY_TYPE.WRITE, 0, 10, pattern(10, 6)), (error: unknown) => isMirrorsanError(error, 'STORE_IO'), 'a failed store takes nothing more');
  } finally {
    await store.close({ checkpoint: false });
  }
  const own = tempDir();
  fs.cpSync(dir, own, { recursive: true });
  const reopened = await openDirectStore(dir);
  try {
    assert.equal(reopened.recovery.sources.get('a')!.durableSequence, 2, 'the failed direct entry is not in the container');
    assert.equal(reopened.recovery.ownSequence, 2);
  } finally {
    await reopened.close();
  }
  // The same for an own direct write whose image write fails, with a small write queued behind it.
  let failOwn = false;
  const ownStore = await openDirectStore(own, { faults: { failImageWrites: () => failOwn && !(failOwn = false) } });
  try {
    failOwn = true;
    const direct = ownStore.writeLocal(ENTRY_TYPE.WRITE, 128 * 1024, 64 * 1024, pattern(64 * 1024, 7));
    const behind = ownStore.writeLocal(ENTRY_TYPE.WRITE, 4096, 10, pattern(10, 8));
    await assert.rejects(direct, (error: unknown) => isMirrorsanError(error, 'STORE_IO'));
    await assert.rejects(behind, (error: unknown) => isMirrorsanError(error, 'STORE_IO'), 'an entry queued behind the failed direct write is not logged out of order');
    await assert.rejects(ownStore.flushLocal(), (error: unknown) => isMirrorsanError(error, 'STORE_IO'));
  } finally {
    await ownStore.close({ checkpoint: false });
  }
  const final = await openDirectStore(own);
  try {
    assert.equal(final.recovery.ownSequence, 2, 'neither the failed direct entry nor the one behind it is in the own WAL');
    assert.deepEqual(await final.read(0, 100), pattern(100, 1));
  } finally {
    await final.close();
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(own, { recursive: true, force: true });
  }
});
