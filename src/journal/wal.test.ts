// Proves the write-ahead log on real files: append/replay round trips, group commit (one
// writev per batch split at IOV_MAX, fewer fdatasyncs than syncs, order kept), bounded
// queue, rotate/drop, replay from a checkpoint, a torn tail cut at every byte of the last
// entry, and corruption (a bad middle entry, a bad older segment, a gap) refused loudly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isMirrorsanError } from '../errors.js';
import { createMemoryLogger } from '../util/log.js';
import { ENTRY_HEADER_BYTES, ENTRY_TYPE, type LogEntry } from './entry.js';
import { WriteAheadLog, segmentFileName, type ReplayResult, type WalOptions } from './wal.js';

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'mirrorsan-wal-'));
  t.after(() => fs.promises.rm(dir, { recursive: true, force: true }));
  return dir;
}

function writeEntry(sequence: number, payloadBytes = 64): { entry: LogEntry; payload: Buffer } {
  const payload = Buffer.alloc(payloadBytes, sequence & 0xff);
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
  const wal = await WriteAheadLog.open({ dir, logger, ...options });
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

function segmentsOf(dir: string): string[] {
  return fs.readdirSync(dir).filter((name) => name.endsWith('.log')).sort();
}

test('appended entries replay in order with their payloads after reopen', async (t) => {
  const dir = await tempDir(t);
  const first = await openAndReplay(dir);
  assert.deepEqual(first.result, { replayedEntries: 0, replayedBytes: 0, cutTail: false, lastSequence: 0 });
  await first.wal.append({ type: ENTRY_TYPE.ZERO, flags: 0, sourceId: 3, sequence: 1, offset: 0, lengthBytes: 4096 });
  await first.wal.append({ type: ENTRY_TYPE.TRIM, flags: 0, sourceId: 3, sequence: 2, offset: 4096, lengthBytes: 8192 });
  await appendRange(first.wal, 3, 50, 1000);
  await first.wal.close();
  assert.throws(() => first.wal.append(writeEntry(51).entry, writeEntry(51).payload), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CLOSED'));

  const again = await openAndReplay(dir);
  assert.equal(again.result.replayedEntries, 50);
  assert.equal(again.result.replayedBytes, 2 * ENTRY_HEADER_BYTES + 48 * (ENTRY_HEADER_BYTES + 1000));
  assert.equal(again.result.lastSequence, 50);
  assert.deepEqual(again.entries.map((e) => e.entry.sequence), Array.from({ length: 50 }, (_, i) => i + 1));
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
  assert.deepEqual(done, Array.from({ length: 400 }, (_, i) => i + 1), 'appends complete in sequence order');
  assert.ok(stats.syncs < syncs.length, `${stats.syncs} fdatasyncs for ${syncs.length} syncs`);
  assert.ok(stats.groupCommitBatches < 400 / 4, `${stats.groupCommitBatches} batches for 400 appends`);
  // A sync with nothing new to make durable costs nothing.
  await wal.sync();
  assert.equal(wal.stats().syncs, stats.syncs);
  await wal.close();
  const replayed = await openAndReplay(dir);
  assert.deepEqual(replayed.entries.map((e) => e.entry.sequence), Array.from({ length: 400 }, (_, i) => i + 1));
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
  const maxQueuedBytes = 64 * 1024;
  const { wal } = await openAndReplay(dir, 0, { maxQueuedBytes });
  const order: number[] = [];
  const pending: Promise<void>[] = [];
  let maxSeen = 0;
  for (let s = 1; s <= 100; s++) {
    const { entry, payload } = writeEntry(s, 16 * 1024);
    pending.push(wal.append(entry, payload).then(() => void order.push(s)));
    maxSeen = Math.max(maxSeen, wal.stats().queuedBytes);
  }
  assert.ok(maxSeen <= maxQueuedBytes, `queued ${maxSeen} bytes`);
  await Promise.all(pending);
  assert.deepEqual(order, Array.from({ length: 100 }, (_, i) => i + 1));
  assert.ok(wal.stats().groupCommitBatches >= 100 / 3, 'the bound forced several batches');
  await wal.close();
});

test('rotate starts segments, dropSegmentsUpTo deletes covered ones, replay skips below the checkpoint', async (t) => {
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
  await wal.close();

  const fromCheckpoint = await openAndReplay(dir, 15);
  assert.deepEqual(fromCheckpoint.entries.map((e) => e.entry.sequence), [16, 17, 18, 19, 20, 21, 22, 23, 24, 25]);
  assert.equal(await fromCheckpoint.wal.dropSegmentsUpTo(25), 1, 'the active segment is never dropped');
  await fromCheckpoint.wal.close();

  // A checkpoint beyond the whole log: nothing to replay, the log continues after it.
  const beyond = await openAndReplay(dir, 30);
  assert.equal(beyond.result.replayedEntries, 0);
  assert.equal(beyond.result.lastSequence, 30);
  await appendRange(beyond.wal, 31, 32);
  await beyond.wal.close();
  const after = await openAndReplay(dir, 30);
  assert.deepEqual(after.entries.map((e) => e.entry.sequence), [31, 32]);
  await after.wal.close();
});

test('a torn tail is cut at every byte position of the last entry', async (t) => {
  const source = await tempDir(t);
  const { wal } = await openAndReplay(source);
  await appendRange(wal, 1, 4, 100);
  await appendRange(wal, 5, 5, 300);
  await wal.close();
  const file = path.join(source, segmentFileName(1));
  const whole = fs.readFileSync(file);
  const lastStart = 4 * (ENTRY_HEADER_BYTES + 100);
  assert.equal(whole.length, lastStart + ENTRY_HEADER_BYTES + 300);
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (let cut = lastStart; cut < whole.length; cut++) {
    fs.writeFileSync(target, whole.subarray(0, cut));
    const replayed = await openAndReplay(dir);
    assert.deepEqual(replayed.entries.map((e) => e.entry.sequence), [1, 2, 3, 4], `cut ${cut}`);
    assert.equal(replayed.result.cutTail, cut !== lastStart, `cut ${cut}`);
    assert.equal(fs.statSync(target).size, lastStart, `cut ${cut}: file truncated at the last good entry`);
    if (cut !== lastStart) {
      const line = replayed.logger.lines.find((l) => l.includes('wal: cut torn tail'));
      assert.ok(line?.includes(`offsetBytes=${lastStart}`) && line.includes('segment=') && line.includes('reason='), line);
    }
    if (cut % 97 === 0) {
      // After the cut the log takes sequence 5 again and keeps it.
      await appendRange(replayed.wal, 5, 5, 10);
      await replayed.wal.close();
      const again = await openAndReplay(dir);
      assert.deepEqual(again.entries.map((e) => e.entry.sequence), [1, 2, 3, 4, 5]);
      assert.equal(again.result.cutTail, false);
      await again.wal.close();
    } else {
      await replayed.wal.close();
    }
  }
});

test('a flipped bit in a middle entry is JOURNAL_CORRUPT naming file and offset; in the last entry it is cut', async (t) => {
  const source = await tempDir(t);
  const { wal } = await openAndReplay(source);
  await appendRange(wal, 1, 6, 200);
  await wal.close();
  const whole = fs.readFileSync(path.join(source, segmentFileName(1)));
  const entryBytes = ENTRY_HEADER_BYTES + 200;
  const dir = await tempDir(t);
  const target = path.join(dir, segmentFileName(1));
  for (const at of [2 * entryBytes + 3, 2 * entryBytes + 20, 2 * entryBytes + ENTRY_HEADER_BYTES + 150]) {
    const damaged = Buffer.from(whole);
    damaged[at] = damaged[at]! ^ 0x04;
    fs.writeFileSync(target, damaged);
    await assert.rejects(openAndReplay(dir), (error: unknown) => {
      assert.ok(isMirrorsanError(error, 'JOURNAL_CORRUPT'), String(error));
      assert.match(error.message, new RegExp(`${segmentFileName(1)} is corrupt at offset ${2 * entryBytes}\\b`));
      return true;
    });
    assert.equal(fs.statSync(target).size, whole.length, 'a corrupt log is never truncated');
  }
  const damaged = Buffer.from(whole);
  damaged[5 * entryBytes + 60] = damaged[5 * entryBytes + 60]! ^ 0x01;
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
  fs.truncateSync(firstSegment, saved.length - 10);
  await assert.rejects(openAndReplay(dir), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /not the last/.test(e.message));
  fs.writeFileSync(firstSegment, saved);
  fs.rmSync(path.join(dir, segmentFileName(6)));
  await assert.rejects(openAndReplay(dir), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /starts at sequence 11, 6 was expected/.test(e.message));
  // A checkpoint at 5 with the log starting at 11: entries 6..10 are missing.
  fs.rmSync(firstSegment);
  await assert.rejects(openAndReplay(dir, 5), (e: unknown) => isMirrorsanError(e, 'JOURNAL_CORRUPT') && /checkpoint/.test(e.message));
  // Covered by a checkpoint at 10, the same log is fine.
  const ok = await openAndReplay(dir, 10);
  assert.deepEqual(ok.entries.map((e) => e.entry.sequence), [11, 12]);
  await ok.wal.close();
});
