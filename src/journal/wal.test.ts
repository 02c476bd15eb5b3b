// Proves the write-ahead log on real files: append/replay round trips, group commit (one
// writev per batch split at IOV_MAX, fewer fdatasyncs than syncs, order kept), bounded
// queue, rotate/drop, replay from a checkpoint; preallocated segments (files keep their
// capacity, syncs never grow them in steady state, dropped segments are reused as spares, a
// full segment continues in a spare, and without a spare the log grows instead); recovery in
// preallocated and reused segments (zero tails and stale entries of an earlier life end the
// log cleanly and are never applied, even one carrying the next expected sequence; a torn
// tail is cut at every byte of the last entry, zeroed not truncated, and the next append
// lands where it was; a rotation whose header never reached the disk); and corruption (a bad
// middle entry, a bad older segment, a gap) refused loudly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isMirrorsanError } from '../errors.js';
import { createMemoryLogger } from '../util/log.js';
import { ENTRY_HEADER_BYTES, ENTRY_TYPE, decodeEntryAt, decodeLog, encodeHeader, isZeroRange, type LogEntry } from './entry.js';
import { SEGMENT_HEADER_BYTES, decodeSegmentHeader, encodeSegmentHeader, type SegmentHeader } from './segment.js';
import { WriteAheadLog, segmentFileName, type ReplayResult, type WalOptions } from './wal.js';

const KiB = 1024;
/** Small segments keep every open (which zero-fills a spare) cheap. */
const CAPACITY = 256 * KiB;

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'mirrorsan-wal-'));
  t.after(() => fs.promises.rm(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 50 }));
  return dir;
}

function writeEntry(sequence: number, payloadBytes = 64, fill = sequence & 0xff): { entry: LogEntry; payload: Buffer } {
  const payload = Buffer.alloc(payloadBytes, fill);
  payload.writeUInt32LE(sequence, 0);
  return { entry: { type: ENTRY_TYPE.WRITE, flags: 0, sourceId: 3, sequence, offset: sequence * 512, lengthBytes: payloadBytes }, payload };
}

interface Replayed {
  entries: { entry: LogEntry; payload: Buffer }[];
  result: ReplayResult;
  wal: WriteAheadLog;
  logger: ReturnType<typeof createMemoryLogger>;
}

async function openAndReplay(dir: string, from = 0, options: Partial<WalOptions> = {}): Promise<Replayed> {
  const logger = createMemoryLogger();
  const wal = await WriteAheadLog.open({ dir, logger, segmentCapacityBytes: CAPACITY, ...options });
  const entries: Replayed['entries'] = [];
  const result = await wal.replay(from, (entry, payload) => {
    entries.push({ entry, payload: Buffer.from(payload) });
  });
  return { entries, result, wal, logger };
}

async function appendRange(wal: WriteAheadLog, first: number, last: number, payloadBytes = 64): Promise<void> {
  const pending: Promise<void>[] = [];
  for (let s = first; s <= last; s++) {
    const { entry, payload } = writeEntry(s, payloadBytes);
    pending.push(wal.append(entry, payload));
  }
  await Promise.all(pending);
}

const sequencesOf = (replayed: { entries: { entry: LogEntry }[] }): number[] => replayed.entries.map((e) => e.entry.sequence);
const range = (first: number, last: number): number[] => Array.from({ length: last - first + 1 }, (_, i) => first + i);

function segmentsOf(dir: string): string[] {
  return fs.readdirSync(dir).filter((name) => name.endsWith('.log')).sort();
}

function sparesOf(dir: string): string[] {
  return fs.readdirSync(dir).filter((name) => name.startsWith('spare-')).sort();
}

/** A segment file decoded with the pure codecs: its header, entries and how they end. */
function readSegmentFile(file: string): { header: SegmentHeader; entries: ReturnType<typeof decodeLog>['entries']; end: ReturnType<typeof decodeLog>['end']; buf: Buffer } {
  const buf = fs.readFileSync(file);
  const check = decodeSegmentHeader(buf);
  assert.ok(check.ok, `${file}: ${check.ok ? '' : check.reason}`);
  const { entries, end } = decodeLog(buf.subarray(SEGMENT_HEADER_BYTES), { generation: check.header.generation, staleTail: !check.header.zeroTail });
  return { header: check.header, entries, end, buf };
}

test('appended entries replay in order with their payloads after reopen', async (t) => {
  const dir = await tempDir(t);
  const first = await openAndReplay(dir);
  assert.deepEqual(first.result, { replayedEntries: 0, replayedBytes: 0, cutTail: false, lastSequence: 0 });
  await first.wal.append({ type: ENTRY_TYPE.ZERO, flags: 0, sourceId: 3, sequence: 1, offset: 0, lengthBytes: 4096 });
  await first.wal.append({ type: ENTRY_TYPE.TRIM, flags: 0, sourceId: 3, sequence: 2, offset: 4096, lengthBytes: 8192 });
  await appendRange(first.wal, 3, 50, 1000);
  assert.equal(first.wal.bytes, 2 * ENTRY_HEADER_BYTES + 48 * (ENTRY_HEADER_BYTES + 1000), 'bytes counts entries, not preallocated space');
  await first.wal.close();
  assert.throws(() => first.wal.append(writeEntry(51).entry, writeEntry(51).payload), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CLOSED'));

  const again = await openAndReplay(dir);
  assert.equal(again.result.replayedEntries, 50);
  assert.equal(again.result.replayedBytes, 2 * ENTRY_HEADER_BYTES + 48 * (ENTRY_HEADER_BYTES + 1000));
  assert.equal(again.result.lastSequence, 50);
  assert.equal(again.result.cutTail, false);
  assert.deepEqual(sequencesOf(again), range(1, 50));
  assert.equal(again.entries[1]!.entry.type, ENTRY_TYPE.TRIM);
  for (const { entry, payload } of again.entries.slice(2)) assert.deepEqual(payload, writeEntry(entry.sequence, 1000).payload);
  // The log continues where it ended.
  await appendRange(again.wal, 51, 51);
  await again.wal.close();
  assert.equal((await openAndReplay(dir)).result.lastSequence, 51);
});

test('group commit: concurrent appends share writevs, concurrent syncs share fdatasyncs', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  const done: number[] = [];
  const syncs: Promise<void>[] = [];
  for (let s = 1; s <= 400; s++) {
    const { entry, payload } = writeEntry(s, 4096);
    void wal.append(entry, payload).then(() => done.push(s));
    // Every tenth request carries a FUA/FLUSH: spread over several event-loop turns.
    if (s % 10 === 0) syncs.push(wal.sync());
    if (s % 50 === 0) await new Promise((resolve) => setImmediate(resolve));
  }
  await Promise.all(syncs);
  const stats = wal.stats();
  assert.equal(stats.durableSequence, 400);
  assert.deepEqual(done, range(1, 400), 'appends complete in sequence order');
  assert.ok(stats.syncs < syncs.length, `${stats.syncs} fdatasyncs for ${syncs.length} syncs`);
  assert.ok(stats.groupCommitBatches < 400 / 4, `${stats.groupCommitBatches} batches for 400 appends`);
  // A sync with nothing new to make durable costs nothing.
  await wal.sync();
  assert.equal(wal.stats().syncs, stats.syncs);
  await wal.close();
  const replayed = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(replayed), range(1, 400));
  await replayed.wal.close();
});

test('one batch larger than IOV_MAX goes out in one cycle of several writev calls', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  await appendRange(wal, 1, 1500, 16); // 3000 iovecs, all queued in one synchronous run
  const stats = wal.stats();
  assert.equal(stats.groupCommitBatches, 1);
  assert.equal(stats.writevCalls, 3);
  await wal.close();
  const replayed = await openAndReplay(dir);
  assert.equal(replayed.result.replayedEntries, 1500);
  await replayed.wal.close();
});

test('the queue is bounded in bytes: appends beyond it wait their turn, in order', async (t) => {
  const dir = await tempDir(t);
  const maxQueuedBytes = 64 * KiB;
  const { wal } = await openAndReplay(dir, 0, { maxQueuedBytes });
  const order: number[] = [];
  const pending: Promise<void>[] = [];
  let maxSeen = 0;
  for (let s = 1; s <= 100; s++) {
    const { entry, payload } = writeEntry(s, 16 * KiB);
    pending.push(wal.append(entry, payload).then(() => void order.push(s)));
    maxSeen = Math.max(maxSeen, wal.stats().queuedBytes);
  }
  assert.ok(maxSeen <= maxQueuedBytes, `queued ${maxSeen} bytes`);
  await Promise.all(pending);
  assert.deepEqual(order, range(1, 100));
  assert.ok(wal.stats().groupCommitBatches >= 100 / 3, 'the bound forced several batches');
  await wal.close();
});

test('rotate starts segments, dropSegmentsUpTo drops covered ones, replay skips below the checkpoint', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  await appendRange(wal, 1, 10);
  assert.equal(await wal.rotate(), 10);
  assert.equal(await wal.rotate(), 10, 'rotating an empty segment is a no-op');
  await appendRange(wal, 11, 20);
  const rotated = wal.rotate(); // queued behind nothing; later appends go to the new segment
  await appendRange(wal, 21, 25);
  assert.equal(await rotated, 20);
  assert.deepEqual(segmentsOf(dir), [segmentFileName(1), segmentFileName(11), segmentFileName(21)]);
  assert.equal(wal.stats().syncs, 0, 'rotation forces nothing to disk');
  await wal.sync();
  assert.equal(wal.stats().durableSequence, 25);
  assert.equal(wal.stats().syncs, 1, 'one sync round covers the old segments and the active one');
  assert.equal(await wal.dropSegmentsUpTo(15), 1);
  assert.deepEqual(segmentsOf(dir), [segmentFileName(11), segmentFileName(21)]);
  assert.equal(wal.stats().recycledSegments, 1, 'the dropped segment became a spare');
  await wal.close();

  const fromCheckpoint = await openAndReplay(dir, 15);
  assert.deepEqual(sequencesOf(fromCheckpoint), range(16, 25));
  assert.equal(await fromCheckpoint.wal.dropSegmentsUpTo(25), 1, 'the active segment is never dropped');
  await fromCheckpoint.wal.close();

  // A checkpoint beyond the whole log: nothing to replay, the log continues after it.
  const beyond = await openAndReplay(dir, 30);
  assert.equal(beyond.result.replayedEntries, 0);
  assert.equal(beyond.result.lastSequence, 30);
  await appendRange(beyond.wal, 31, 32);
  await beyond.wal.close();
  const after = await openAndReplay(dir, 30);
  assert.deepEqual(sequencesOf(after), [31, 32]);
  await after.wal.close();
});

test('preallocated segments keep their capacity; replay ends cleanly at the zero tail', async (t) => {
  const dir = await tempDir(t);
  const first = await openAndReplay(dir);
  // A log that is only opened has one preallocated segment and prepares no spare...
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.deepEqual([first.wal.stats().preparedSegments, first.wal.stats().spareSegments], [1, 0]);
  await appendRange(first.wal, 1, 20, 100);
  await first.wal.sync();
  // ...until it is used: then a spare is made ready in the background.
  for (const deadline = Date.now() + 5000; first.wal.stats().spareSegments === 0 && Date.now() < deadline; ) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  assert.deepEqual([first.wal.stats().preparedSegments, first.wal.stats().spareSegments], [2, 1]);
  const file = path.join(dir, segmentFileName(1));
  assert.equal(fs.statSync(file).size, CAPACITY);
  await first.wal.close();
  const { header, entries, end } = readSegmentFile(file);
  assert.equal(header.zeroTail, true);
  assert.equal(header.capacityBytes, CAPACITY);
  assert.equal(entries.length, 20);
  assert.deepEqual(end, { kind: 'clean', at: 20 * (ENTRY_HEADER_BYTES + 100), reason: 'unwritten space (zeros)' });

  const again = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(again), range(1, 20));
  assert.equal(again.result.cutTail, false);
  assert.ok(!again.logger.lines.some((line) => line.includes('torn') || line.includes('corrupt')), again.logger.lines.join('\n'));
  assert.equal(fs.statSync(file).size, CAPACITY, 'nothing was truncated');
  await appendRange(again.wal, 21, 21, 100);
  await again.wal.close();
  assert.deepEqual(sequencesOf(await openAndReplay(dir)), range(1, 21));
});

test('steady state: syncs never grow a segment file, across rotations and checkpoints', async (t) => {
  const dir = await tempDir(t);
  const capacity = 64 * KiB;
  const { wal } = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity, spareSegmentsMax: 2 });
  for (let s = 1; s <= 400; s++) {
    // A spare is ready before every append, as the background job keeps one in practice.
    await wal.ensureSpare();
    const { entry, payload } = writeEntry(s, 4096);
    await wal.append(entry, payload);
    await wal.sync(s); // a FUA write
    for (const name of segmentsOf(dir)) assert.equal(fs.statSync(path.join(dir, name)).size, capacity, `after ${s}: ${name}`);
    if (s % 100 === 0 && s < 400) {
      // A checkpoint: rotate, then drop what it covers.
      assert.equal(await wal.rotate(), s);
      await wal.dropSegmentsUpTo(s);
    }
  }
  const stats = wal.stats();
  assert.equal(stats.growthBatches, 0);
  assert.ok(stats.rotations >= 400 / 15, `${stats.rotations} rotations`);
  assert.ok(stats.recycledSegments >= 2, `${stats.recycledSegments} segments reused`);
  for (const name of sparesOf(dir)) assert.equal(fs.statSync(path.join(dir, name)).size, capacity, name);
  await wal.close();
  const replayed = await openAndReplay(dir, 300, { segmentCapacityBytes: capacity });
  assert.deepEqual(sequencesOf(replayed), range(301, 400));
  await replayed.wal.close();
});

test('dropped segments are reused: a rotation takes the same file (inode) again, and spares are bounded', async (t) => {
  const dir = await tempDir(t);
  const capacity = 16 * KiB;
  const { wal } = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity, spareSegmentsMax: 2 });
  await wal.ensureSpare();
  const inodes = new Set<number>();
  let sequence = 0;
  for (let cycle = 0; cycle < 20; cycle++) {
    await appendRange(wal, sequence + 1, sequence + 10, 200);
    sequence += 10;
    inodes.add(fs.statSync(path.join(dir, segmentsOf(dir).at(-1)!)).ino);
    await wal.rotate();
    await wal.dropSegmentsUpTo(sequence);
    assert.ok(segmentsOf(dir).length === 1 && sparesOf(dir).length <= 3, `cycle ${cycle}: ${fs.readdirSync(dir).join(' ')}`);
  }
  const stats = wal.stats();
  assert.ok(stats.preparedSegments <= 3, `${stats.preparedSegments} spares zero-filled for 20 rotations`);
  assert.ok(stats.recycledSegments >= 17, `${stats.recycledSegments} reused`);
  assert.ok(inodes.size <= 4, `${inodes.size} distinct files served as segments`);
  await wal.close();
});

test('a full segment continues in a spare; with none ready the segment grows past its capacity instead', async (t) => {
  const dir = await tempDir(t);
  const capacity = 64 * KiB;
  const { wal } = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
  await wal.ensureSpare();
  // 1 MiB in one synchronous run: the first segment fills, the writer switches to the only
  // spare and fills it before a new spare can be zero-filled, then grows it.
  await appendRange(wal, 1, 256, 4096);
  const stats = wal.stats();
  assert.ok(stats.growthBatches >= 1, `${stats.growthBatches} growth batches`);
  const names = segmentsOf(dir);
  assert.equal(names.length, 2);
  assert.equal(fs.statSync(path.join(dir, names[0]!)).size, capacity, 'the first segment kept its capacity');
  assert.ok(fs.statSync(path.join(dir, names[1]!)).size > capacity, 'the second one grew');
  // Once a spare is ready, the next batch leaves the grown segment.
  await wal.ensureSpare();
  await appendRange(wal, 257, 260, 4096);
  assert.equal(segmentsOf(dir).length, 3);
  assert.equal(fs.statSync(path.join(dir, segmentsOf(dir)[2]!)).size, capacity);
  await wal.close();
  const replayed = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
  assert.deepEqual(sequencesOf(replayed), range(1, 260));
  for (const { entry, payload } of replayed.entries) assert.deepEqual(payload, writeEntry(entry.sequence, 4096).payload);
  await replayed.wal.close();
});

test('a reused segment: stale entries after the live ones are never applied, even one with the next sequence', async (t) => {
  const dir = await tempDir(t);
  const capacity = 64 * KiB;
  const options = { segmentCapacityBytes: capacity, spareSegmentsMax: 2 };
  const { wal } = await openAndReplay(dir, 0, options);
  await wal.ensureSpare();
  // Fill segment 1 almost completely with entries 1..250 (252 bytes each).
  await appendRange(wal, 1, 250, 200);
  const oldFile = path.join(dir, segmentFileName(1));
  const oldInode = fs.statSync(oldFile).ino;
  const oldGeneration = readSegmentFile(oldFile).header.generation;
  await wal.rotate();
  await wal.ensureSpare(); // the zero-filled spare that replaces the one just used
  await wal.dropSegmentsUpTo(250); // segment 1 becomes the second spare
  assert.equal(wal.stats().recycledSegments, 1);
  await appendRange(wal, 251, 260, 200);
  await wal.rotate(); // segment 261 takes the zero-filled spare
  await appendRange(wal, 261, 262, 200);
  await wal.rotate(); // segment 263 is the old segment 1 again
  const reused = path.join(dir, segmentFileName(263));
  assert.equal(fs.statSync(reused).ino, oldInode);
  await appendRange(wal, 263, 267, 200);
  await wal.close();
  const { header, entries, end } = readSegmentFile(reused);
  assert.equal(header.zeroTail, false);
  assert.notEqual(header.generation, oldGeneration);
  assert.deepEqual(entries.map((e) => e.entry.sequence), range(263, 267));
  assert.equal(end.kind, 'clean');
  assert.equal(fs.statSync(reused).size, capacity);

  // Right after entry 267, plant an entry of the old life that carries sequence 268: the
  // one the log expects next.
  const endOffset = SEGMENT_HEADER_BYTES + 5 * (ENTRY_HEADER_BYTES + 200);
  const planted = writeEntry(268, 200, 0xee);
  const image = fs.readFileSync(reused);
  Buffer.concat([encodeHeader(planted.entry, planted.payload, oldGeneration), planted.payload]).copy(image, endOffset);
  fs.writeFileSync(reused, image);

  const scanned: number[] = [];
  const scanning = await WriteAheadLog.open({ dir, logger: createMemoryLogger(), ...options });
  await scanning.scan(250, (entry) => void scanned.push(entry.sequence));
  assert.deepEqual(scanned, range(251, 267), 'scan stops before stale entries too');
  await scanning.replay(250, () => undefined);
  await scanning.close();

  const reopened = await openAndReplay(dir, 250, options);
  assert.deepEqual(sequencesOf(reopened), range(251, 267));
  assert.equal(reopened.result.cutTail, false);
  assert.ok(!reopened.logger.lines.some((line) => line.includes('corrupt') || line.includes('torn')), reopened.logger.lines.join('\n'));
  // The real entry 268 goes where the stale one sits, and is the one that survives.
  const real = writeEntry(268, 30);
  await reopened.wal.append(real.entry, real.payload);
  await reopened.wal.close();
  const after = fs.readFileSync(reused);
  const step = decodeEntryAt(after, endOffset, header.generation);
  assert.equal(step.status, 'entry');
  assert.deepEqual(step.status === 'entry' && step.payload, real.payload);
  const last = await openAndReplay(dir, 250, options);
  assert.deepEqual(sequencesOf(last), range(251, 268));
  assert.deepEqual(last.entries.at(-1)!.payload, real.payload);
  await last.wal.close();
});

/** Entries 1..4 (100-byte payloads) and 5 (300 bytes) in one segment of `capacity` bytes. */
async function fiveEntrySegment(t: { after: (fn: () => Promise<void>) => void }, capacity: number): Promise<{ whole: Buffer; lastStart: number; lastEnd: number }> {
  const source = await tempDir(t);
  const { wal } = await openAndReplay(source, 0, { segmentCapacityBytes: capacity });
  await appendRange(wal, 1, 4, 100);
  await appendRange(wal, 5, 5, 300);
  await wal.close();
  const whole = fs.readFileSync(path.join(source, segmentFileName(1)));
  const lastStart = SEGMENT_HEADER_BYTES + 4 * (ENTRY_HEADER_BYTES + 100);
  return { whole, lastStart, lastEnd: lastStart + ENTRY_HEADER_BYTES + 300 };
}

test('a torn tail in a preallocated segment is cut at every byte of the last entry: zeroed, not truncated', async (t) => {
  const capacity = 16 * KiB;
  const { whole, lastStart, lastEnd } = await fiveEntrySegment(t, capacity);
  assert.equal(whole.length, capacity);
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (let cut = lastStart; cut < lastEnd; cut++) {
    // The last append reached the disk only up to byte `cut`; the rest is still zeros.
    const image = Buffer.from(whole);
    image.fill(0, cut, lastEnd);
    fs.writeFileSync(target, image);
    const replayed = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
    assert.deepEqual(sequencesOf(replayed), [1, 2, 3, 4], `cut ${cut}`);
    assert.equal(replayed.result.cutTail, cut !== lastStart, `cut ${cut}`);
    const onDisk = fs.readFileSync(target);
    assert.equal(onDisk.length, capacity, `cut ${cut}: the file keeps its size`);
    assert.ok(isZeroRange(onDisk, lastStart, onDisk.length), `cut ${cut}: the torn bytes are zeroed`);
    if (cut !== lastStart) {
      const line = replayed.logger.lines.find((l) => l.includes('wal: cut torn tail'));
      assert.ok(line?.includes(`offsetBytes=${lastStart}`) && line.includes('segment=') && line.includes('reason='), line);
    }
    if (cut % 37 === 0) {
      // After the cut the log takes sequence 5 again, at the place of the torn one, and keeps it.
      await appendRange(replayed.wal, 5, 5, 10);
      await replayed.wal.close();
      const step = decodeEntryAt(fs.readFileSync(target), lastStart, readSegmentFile(target).header.generation);
      assert.ok(step.status === 'entry' && step.entry.sequence === 5 && step.payload.length === 10, `cut ${cut}`);
      const again = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
      assert.deepEqual(sequencesOf(again), [1, 2, 3, 4, 5]);
      assert.equal(again.result.cutTail, false);
      assert.equal(fs.statSync(target).size, capacity);
      await again.wal.close();
    } else {
      await replayed.wal.close();
    }
  }
});

test('a torn tail in a reused segment: a whole header of this life proves it torn; stale bytes around it are not', async (t) => {
  const capacity = 16 * KiB;
  const { whole, lastStart, lastEnd } = await fiveEntrySegment(t, capacity);
  const { header } = readSegmentFile(await writeTemp(t, whole));
  // The same file as if reused: its header says so, and an earlier life's entries (other
  // payload bytes, another generation) fill everything this life did not write.
  const stale = Buffer.alloc(capacity);
  const oldLife = Buffer.concat(range(1, 60).flatMap((s) => {
    const { entry, payload } = writeEntry(s, 200, 0xee);
    return [encodeHeader(entry, payload, (header.generation ^ 0x5a5a) >>> 0), payload];
  }));
  oldLife.copy(stale, SEGMENT_HEADER_BYTES);
  const reusedHeader = encodeSegmentHeader({ ...header, zeroTail: false });
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (let cut = lastStart; cut < lastEnd; cut++) {
    const image = Buffer.from(stale);
    reusedHeader.copy(image, 0);
    whole.copy(image, SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES, cut);
    fs.writeFileSync(target, image);
    const replayed = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
    assert.deepEqual(sequencesOf(replayed), [1, 2, 3, 4], `cut ${cut}`);
    const headerWhole = cut >= lastStart + ENTRY_HEADER_BYTES;
    assert.equal(replayed.result.cutTail, headerWhole, `cut ${cut}`);
    const onDisk = fs.readFileSync(target);
    assert.equal(onDisk.length, capacity);
    if (headerWhole) assert.ok(isZeroRange(onDisk, lastStart, lastEnd), `cut ${cut}: the torn entry is zeroed`);
    else assert.deepEqual(onDisk, image, `cut ${cut}: a clean end changes nothing`);
    if (cut % 37 === 0) {
      await appendRange(replayed.wal, 5, 5, 10);
      await replayed.wal.close();
      const again = await openAndReplay(dir, 0, { segmentCapacityBytes: capacity });
      assert.deepEqual(sequencesOf(again), [1, 2, 3, 4, 5], `cut ${cut}`);
      assert.deepEqual(again.entries[4]!.payload, writeEntry(5, 10).payload);
      assert.equal(again.result.cutTail, false);
      await again.wal.close();
    } else {
      await replayed.wal.close();
    }
  }
});

async function writeTemp(t: { after: (fn: () => Promise<void>) => void }, data: Buffer): Promise<string> {
  const file = path.join(await tempDir(t), 'segment');
  fs.writeFileSync(file, data);
  return file;
}

test('a flipped bit in a middle entry is JOURNAL_CORRUPT naming file and offset; in the last entry it is cut', async (t) => {
  const source = await tempDir(t);
  const { wal } = await openAndReplay(source);
  await appendRange(wal, 1, 6, 200);
  await wal.close();
  const whole = fs.readFileSync(path.join(source, segmentFileName(1)));
  const entryBytes = ENTRY_HEADER_BYTES + 200;
  const third = SEGMENT_HEADER_BYTES + 2 * entryBytes;
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (const at of [third + 3, third + 20, third + 40, third + ENTRY_HEADER_BYTES + 150]) {
    const damaged = Buffer.from(whole);
    damaged[at] = damaged[at]! ^ 0x04;
    fs.writeFileSync(target, damaged);
    await assert.rejects(openAndReplay(dir), (error: unknown) => {
      assert.ok(isMirrorsanError(error, 'JOURNAL_CORRUPT'), String(error));
      assert.match(error.message, new RegExp(`${segmentFileName(1)} is corrupt at offset ${third}\\b`));
      return true;
    });
    assert.deepEqual(fs.readFileSync(target), damaged, 'a corrupt log is never changed');
  }
  const last = SEGMENT_HEADER_BYTES + 5 * entryBytes;
  const damaged = Buffer.from(whole);
  damaged[last + 60] = damaged[last + 60]! ^ 0x01;
  fs.writeFileSync(target, damaged);
  const replayed = await openAndReplay(dir);
  assert.equal(replayed.entries.length, 5);
  assert.equal(replayed.result.cutTail, true);
  await replayed.wal.close();
});

test('a bad entry in a segment that is not the last, or a missing segment, is corruption', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  await appendRange(wal, 1, 5);
  await wal.rotate();
  await appendRange(wal, 6, 10);
  await wal.rotate();
  await appendRange(wal, 11, 12);
  await wal.close();
  const firstSegment = path.join(dir, segmentFileName(1));
  const saved = fs.readFileSync(firstSegment);
  const fifth = SEGMENT_HEADER_BYTES + 4 * (ENTRY_HEADER_BYTES + 64);
  // Entry 5 never reached the disk although segment 6 did.
  const lost = Buffer.from(saved);
  lost.fill(0, fifth, fifth + ENTRY_HEADER_BYTES + 64);
  fs.writeFileSync(firstSegment, lost);
  await assert.rejects(openAndReplay(dir), (e: unknown) => {
    assert.ok(isMirrorsanError(e, 'JOURNAL_CORRUPT'), String(e));
    assert.match(e.message, new RegExp(`${segmentFileName(1)} is corrupt at offset ${fifth}: .*after sequence 4, but the next segment starts at sequence 6`));
    return true;
  });
  // A flipped bit in the middle of an older segment.
  const flipped = Buffer.from(saved);
  flipped[SEGMENT_HEADER_BYTES + 70] = flipped[SEGMENT_HEADER_BYTES + 70]! ^ 0x02;
  fs.writeFileSync(firstSegment, flipped);
  await assert.rejects(openAndReplay(dir), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /offset 32: .*next segment starts at sequence 6/.test(e.message));
  fs.writeFileSync(firstSegment, saved);
  fs.rmSync(path.join(dir, segmentFileName(6)));
  await assert.rejects(openAndReplay(dir), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /after sequence 5, but the next segment starts at sequence 11/.test(e.message));
  // A checkpoint at 5 with the log starting at 11: entries 6..10 are missing.
  fs.rmSync(firstSegment);
  await assert.rejects(openAndReplay(dir, 5), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /checkpoint/.test(e.message));
  // Covered by a checkpoint at 10, the same log is fine.
  const ok = await openAndReplay(dir, 10);
  assert.deepEqual(sequencesOf(ok), [11, 12]);
  await ok.wal.close();
});

test('a rotation whose header never reached the disk: the last segment starts again, stale entries unused', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  await appendRange(wal, 1, 5);
  await wal.rotate();
  await wal.close();
  const second = path.join(dir, segmentFileName(6));
  // The renamed spare as the crash left it: no header, and (as if reused) entries 6..8 of the
  // first segment's life right where this life's would go.
  const first = readSegmentFile(path.join(dir, segmentFileName(1)));
  const image = fs.readFileSync(second);
  image.fill(0, 0, SEGMENT_HEADER_BYTES);
  Buffer.concat(range(6, 8).flatMap((s) => {
    const { entry, payload } = writeEntry(s);
    return [encodeHeader(entry, payload, first.header.generation), payload];
  })).copy(image, SEGMENT_HEADER_BYTES);
  fs.writeFileSync(second, image);

  const reopened = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(reopened), range(1, 5));
  assert.equal(reopened.result.lastSequence, 5);
  assert.ok(reopened.logger.lines.some((line) => line.includes('never started')));
  await appendRange(reopened.wal, 6, 7, 10);
  await reopened.wal.rotate();
  await appendRange(reopened.wal, 8, 8, 10);
  await reopened.wal.close();
  const again = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(again), range(1, 8));
  for (const { entry, payload } of again.entries.slice(5)) assert.deepEqual(payload, writeEntry(entry.sequence, 10).payload);
  await again.wal.close();
  // The same loss in a segment that is not the last is corruption.
  const restarted = fs.readFileSync(second);
  restarted.fill(0, 0, SEGMENT_HEADER_BYTES);
  fs.writeFileSync(second, restarted);
  await assert.rejects(openAndReplay(dir), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /not the last/.test(e.message));
});

test('spare files found at open: leftovers deleted, misfits deleted, a stale header zeroed before use', async (t) => {
  const dir = await tempDir(t);
  const { wal } = await openAndReplay(dir);
  await appendRange(wal, 1, 5);
  await wal.close();
  for (const name of sparesOf(dir)) fs.rmSync(path.join(dir, name));
  const segment = fs.readFileSync(path.join(dir, segmentFileName(1)));
  // A recycling interrupted before the header was zeroed, a zero-fill interrupted, and a
  // spare of another capacity.
  fs.writeFileSync(path.join(dir, 'spare-7.recycled'), segment);
  fs.writeFileSync(path.join(dir, 'spare-8.tmp'), Buffer.alloc(1000));
  fs.writeFileSync(path.join(dir, 'spare-9.zeroed'), Buffer.alloc(CAPACITY / 2));
  const reopened = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(reopened), range(1, 5));
  assert.ok(sparesOf(dir).includes('spare-7.recycled'));
  assert.ok(!sparesOf(dir).includes('spare-8.tmp') && !sparesOf(dir).includes('spare-9.zeroed'), sparesOf(dir).join(' '));
  assert.ok(isZeroRange(fs.readFileSync(path.join(dir, 'spare-7.recycled')), 0, SEGMENT_HEADER_BYTES), 'no valid header in a spare');
  // The next rotation uses it; its old entries (sequences 1..5) never show up again.
  assert.equal(await reopened.wal.rotate(), 5, 'rotating the empty active segment is a no-op');
  await appendRange(reopened.wal, 6, 6);
  await reopened.wal.rotate();
  await appendRange(reopened.wal, 7, 7);
  await reopened.wal.close();
  assert.ok(!sparesOf(dir).includes('spare-7.recycled'), 'the spare became segment 7');
  const again = await openAndReplay(dir);
  assert.deepEqual(sequencesOf(again), range(1, 7));
  await again.wal.close();
});

test('without preallocation (capacity 0) segments grow with their entries and a torn tail is truncated', async (t) => {
  const source = await tempDir(t);
  const { wal } = await openAndReplay(source, 0, { segmentCapacityBytes: 0 });
  await appendRange(wal, 1, 4, 100);
  await appendRange(wal, 5, 5, 300);
  await wal.close();
  assert.deepEqual(sparesOf(source), []);
  const file = path.join(source, segmentFileName(1));
  const whole = fs.readFileSync(file);
  const lastStart = SEGMENT_HEADER_BYTES + 4 * (ENTRY_HEADER_BYTES + 100);
  assert.equal(whole.length, lastStart + ENTRY_HEADER_BYTES + 300);
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (let cut = lastStart; cut < whole.length; cut++) {
    fs.writeFileSync(target, whole.subarray(0, cut));
    const replayed = await openAndReplay(dir, 0, { segmentCapacityBytes: 0 });
    assert.deepEqual(sequencesOf(replayed), [1, 2, 3, 4], `cut ${cut}`);
    assert.equal(replayed.result.cutTail, cut !== lastStart, `cut ${cut}`);
    assert.equal(fs.statSync(target).size, lastStart, `cut ${cut}: file truncated at the last good entry`);
    if (cut % 29 === 0) {
      await appendRange(replayed.wal, 5, 5, 10);
      await replayed.wal.close();
      const again = await openAndReplay(dir, 0, { segmentCapacityBytes: 0 });
      assert.deepEqual(sequencesOf(again), [1, 2, 3, 4, 5]);
      assert.equal(again.result.cutTail, false);
      await again.wal.close();
    } else {
      await replayed.wal.close();
    }
  }
});

test('invalid preallocation options are refused', async (t) => {
  const dir = await tempDir(t);
  for (const segmentCapacityBytes of [1000, -4096, 4096.5]) {
    await assert.rejects(WriteAheadLog.open({ dir, logger: createMemoryLogger(), segmentCapacityBytes }), (e: unknown) => isMirrorsanError(e, 'CONFIG_INVALID'));
  }
  await assert.rejects(WriteAheadLog.open({ dir, logger: createMemoryLogger(), spareSegmentsMax: -1 }), (e: unknown) => isMirrorsanError(e, 'CONFIG_INVALID'));
});
