// Proves LocalVolume as a BlockDevice on real files: read-after-write, holes, zero/trim
// semantics with partial blocks, exact block status, the image file always equal to the
// volume's content, overlapping writes ordered as in the log, FUA/FLUSH group commit,
// checkpoints and reopen, fault injection, and crash recovery of a SIGKILLed writer process.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMirrorsanError } from '../errors.js';
import { createMemoryLogger } from '../util/log.js';
import { CRASH_BLOCK_BYTES, crashPattern } from './local-volume.crash-child.js';
import { LocalVolume, type LocalVolumeOptions } from './local-volume.js';
import type { Extent } from './device.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const NO_FUA = { fua: false };

/** Volumes opened by a test, by directory: closed before their directory is removed. */
const openedVolumes = new Map<string, LocalVolume[]>();

async function tempDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'mirrorsan-vol-'));
  // after() hooks run in registration order, so this one may run before a test's own
  // volume.close(): close (idempotent) first, so no background log job writes into a
  // directory being removed.
  t.after(async () => {
    for (const volume of openedVolumes.get(dir) ?? []) await volume.close().catch(() => undefined);
    openedVolumes.delete(dir);
    await fs.promises.rm(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 50 });
  });
  return dir;
}

async function openVolume(dir: string, options: Partial<LocalVolumeOptions> = {}): Promise<LocalVolume> {
  const volume = await LocalVolume.open({ dir, name: 'v', sizeBytes: SIZE, logger: createMemoryLogger(), checkpointIntervalMs: 0, ...options });
  openedVolumes.set(dir, [...(openedVolumes.get(dir) ?? []), volume]);
  return volume;
}

/** Reads through the device, checking that the pieces tile the range in order. */
async function readBytes(volume: LocalVolume, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  let at = offset;
  for (const piece of await volume.read(offset, length)) {
    assert.equal(piece.offset, at, 'pieces are contiguous and ascending');
    if (piece.kind === 'data') {
      piece.data.copy(out, at - offset);
      at += piece.data.length;
    } else {
      at += piece.length;
    }
  }
  assert.equal(at, offset + length, 'pieces cover the whole range');
  return out;
}

/** Invariant: the image file's bytes equal what the device reads, everywhere. */
async function assertImageEqualsContent(dir: string, volume: LocalVolume, length = SIZE): Promise<void> {
  const image = Buffer.alloc(length);
  const handle = await fs.promises.open(path.join(dir, 'volume.img'), 'r');
  await handle.read(image, 0, length, 0);
  await handle.close();
  for (let at = 0; at < length; at += 16 * MiB) {
    const step = Math.min(16 * MiB, length - at);
    assert.ok(image.subarray(at, at + step).equals(await readBytes(volume, at, step)), `image differs from content in [${at}, ${at + step})`);
  }
}

function ext(offset: number, length: number, allocated: boolean): Extent {
  return { offset, length, hole: !allocated, zero: !allocated };
}

function filled(length: number, value: number): Buffer {
  return Buffer.alloc(length, value);
}

test('geometry, read-after-write, holes and exact block status', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  assert.deepEqual(volume.geometry(), {
    sizeBytes: SIZE,
    blockSizeMin: 512,
    blockSizePreferred: 4096,
    payloadMaxBytes: 32 * MiB,
    readOnly: false,
    multiConn: true,
  });
  assert.deepEqual(await volume.read(0, MiB), [{ offset: 0, kind: 'zero', length: MiB }]);
  assert.deepEqual(volume.blockStatus(0, SIZE), [ext(0, SIZE, false)]);

  await volume.write(8192, filled(4096, 0xab), NO_FUA);
  const pieces = await volume.read(0, 16384);
  assert.deepEqual(
    pieces.map((p) => [p.offset, p.kind]),
    [[0, 'zero'], [8192, 'data'], [12288, 'zero']],
  );
  assert.deepEqual(await readBytes(volume, 8000, 4500), Buffer.concat([filled(192, 0), filled(4096, 0xab), filled(212, 0)]));
  assert.deepEqual(volume.blockStatus(0, 16384), [ext(0, 8192, false), ext(8192, 4096, true), ext(12288, 4096, false)]);
  // Clipped to the request, at most `length` bytes.
  assert.deepEqual(volume.blockStatus(9000, 100), [ext(9000, 100, true)]);
  assert.deepEqual(volume.blockStatus(12000, 1000), [ext(12000, 288, true), ext(12288, 712, false)]);

  // A 512-byte write in the middle of an unallocated block allocates the block with zeros.
  await volume.write(20480 + 1000, filled(512, 0xcd), NO_FUA);
  assert.deepEqual(await readBytes(volume, 20480, 4096), Buffer.concat([filled(1000, 0), filled(512, 0xcd), filled(2584, 0)]));
  assert.deepEqual(volume.blockStatus(20480, 4096), [ext(20480, 4096, true)]);
  assert.equal(volume.stats().allocatedBytes, 8192);
  // A fragmented read (many runs) reads its span in one go and still reports the gaps.
  for (let block = 0; block < 40; block += 2) await volume.write(MiB + block * 4096, filled(4096, block + 1), NO_FUA);
  const fragmented = await volume.read(MiB, 40 * 4096);
  assert.equal(fragmented.length, 40);
  assert.deepEqual(await readBytes(volume, MiB + 4096, 8192), Buffer.concat([filled(4096, 0), filled(4096, 3)]));
  await assertImageEqualsContent(dir, volume, 2 * MiB);
});

test('write zeroes: NO_HOLE keeps blocks allocated, may-trim frees whole blocks and zeroes partial ones', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  const zeroOpts = { fua: false, mayTrim: false, fastZero: false };
  // On unallocated blocks nothing happens at all.
  await volume.writeZeroes(0, 65536, zeroOpts);
  assert.deepEqual(volume.blockStatus(0, 65536), [ext(0, 65536, false)]);

  await volume.write(4096, filled(12288, 0x11), NO_FUA);
  await volume.writeZeroes(5000, 2000, zeroOpts);
  assert.deepEqual(volume.blockStatus(0, 16384), [ext(0, 4096, false), ext(4096, 12288, true)]);
  assert.deepEqual(await readBytes(volume, 4096, 12288), Buffer.concat([filled(904, 0x11), filled(2000, 0), filled(9384, 0x11)]));

  // may-trim over [5000, 15000): block 1 and 3 partial (zeroed, kept), block 2 freed.
  await volume.writeZeroes(5000, 10000, { ...zeroOpts, mayTrim: true });
  assert.deepEqual(volume.blockStatus(0, 20480), [ext(0, 4096, false), ext(4096, 4096, true), ext(8192, 4096, false), ext(12288, 4096, true), ext(16384, 4096, false)]);
  assert.deepEqual(await readBytes(volume, 4096, 12288), Buffer.concat([filled(904, 0x11), filled(10000, 0), filled(1384, 0x11)]));

  // trim is may-trim write zeroes; a partial block keeps its other bytes.
  await volume.trim(4096, 1000, NO_FUA);
  assert.deepEqual(await readBytes(volume, 4096, 1000), filled(1000, 0));
  assert.deepEqual(volume.blockStatus(4096, 4096), [ext(4096, 4096, true)]);
  await volume.trim(0, 65536, NO_FUA);
  assert.deepEqual(volume.blockStatus(0, SIZE), [ext(0, SIZE, false)]);
  assert.equal(volume.stats().allocatedBytes, 0);
  await assertImageEqualsContent(dir, volume, MiB);
});

test('trim of a large aligned range punches a hole in the image file', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  const image = path.join(dir, 'volume.img');
  await volume.write(8 * MiB, filled(8 * MiB, 0x5a), NO_FUA);
  await volume.flush();
  await volume.checkpoint(); // fdatasync: the file system has allocated the blocks
  const before = fs.statSync(image).blocks * 512;
  assert.ok(before >= 8 * MiB, `image occupies ${before} bytes`);
  await volume.trim(8 * MiB + 4096, 4 * MiB, NO_FUA); // aligned, >= 1 MiB: punched
  const after = fs.statSync(image).blocks * 512;
  assert.ok(before - after >= 4 * MiB - 4096, `punching freed ${before - after} bytes`);
  assert.deepEqual(await readBytes(volume, 8 * MiB, 8192), Buffer.concat([filled(4096, 0x5a), filled(4096, 0)]));
  await assertImageEqualsContent(dir, volume, 24 * MiB);
});

test('fast zero fails with NBD_ENOTSUP only when it would write more than 1 MiB of zeros', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  const fast = { fua: false, mayTrim: false, fastZero: true };
  await volume.writeZeroes(0, 16 * MiB, fast); // unallocated: nothing to write
  await volume.write(0, filled(4 * MiB, 1), NO_FUA);
  await assert.rejects(volume.writeZeroes(0, 4 * MiB, fast), (e: unknown) => isMirrorsanError(e, 'NBD_ENOTSUP'));
  assert.deepEqual(await readBytes(volume, 0, 16), filled(16, 1), 'a refused fast zero changes nothing');
  await volume.writeZeroes(0, 512 * 1024, fast); // small enough to write
  await volume.writeZeroes(MiB, 3 * MiB, { ...fast, mayTrim: true }); // aligned: punched, fast
  assert.deepEqual(volume.blockStatus(0, 4 * MiB), [ext(0, MiB, true), ext(MiB, 3 * MiB, false)]);
  assert.deepEqual(await readBytes(volume, 0, 4 * MiB), filled(4 * MiB, 0).fill(1, 512 * 1024, MiB));
});

test('overlapping concurrent writes land in call order, the same order replay uses', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  const model = Buffer.alloc(256 * 1024);
  const pending: Promise<void>[] = [];
  let seed = 12345;
  const random = (n: number): number => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  for (let i = 0; i < 300; i++) {
    const offset = random(model.length / 512 - 8) * 512;
    const length = (1 + random(8)) * 512;
    const kind = random(10);
    if (kind < 7) {
      const data = filled(length, (i % 250) + 1);
      data.copy(model, offset);
      pending.push(volume.write(offset, data, NO_FUA));
    } else if (kind < 9) {
      model.fill(0, offset, offset + length);
      pending.push(volume.writeZeroes(offset, length, { fua: false, mayTrim: kind === 8, fastZero: false }));
    } else {
      model.fill(0, offset, offset + length);
      pending.push(volume.trim(offset, length, NO_FUA));
    }
  }
  await Promise.all(pending);
  assert.ok((await readBytes(volume, 0, model.length)).equals(model), 'content follows call order');
  await volume.flush();
  // What a crash would leave (page cache of every file), with the image wiped: replaying the
  // log alone must rebuild the same content, so image order and log order agree.
  const copy = await tempDir(t);
  fs.cpSync(dir, copy, { recursive: true });
  fs.truncateSync(path.join(copy, 'volume.img'), 0);
  fs.truncateSync(path.join(copy, 'volume.img'), SIZE);
  const replayed = await openVolume(copy);
  assert.equal(replayed.recovery.replayedEntries, 300);
  assert.ok((await readBytes(replayed, 0, model.length)).equals(model), 'replayed content follows log order');
  assert.deepEqual(replayed.blockStatus(0, SIZE), volume.blockStatus(0, SIZE));
  await assertImageEqualsContent(copy, replayed, MiB);
  await replayed.close();
});

test('FUA and FLUSH are group-committed and counted', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir);
  t.after(() => volume.close());
  for (let i = 0; i < 10; i++) await volume.write(i * 4096, filled(4096, i), NO_FUA);
  assert.equal(volume.stats().syncs, 0, 'plain writes never fdatasync');
  await volume.flush();
  assert.equal(volume.stats().syncs, 1);
  await volume.flush();
  assert.equal(volume.stats().syncs, 1, 'a flush with nothing new costs nothing');
  const fua: Promise<void>[] = [];
  for (let i = 0; i < 32; i++) fua.push(volume.write(MiB + i * 4096, filled(4096, i), { fua: true }));
  const flushes = [volume.flush(), volume.flush(), volume.flush()];
  await Promise.all([...fua, ...flushes]);
  const { syncs, groupCommitBatches, lastSequence } = volume.stats();
  assert.equal(lastSequence, 42);
  assert.ok(syncs >= 2 && syncs < 1 + 32, `${syncs} fdatasyncs for 32 FUA writes and 3 flushes`);
  assert.ok(groupCommitBatches < 42, `${groupCommitBatches} log writes for 42 entries`);
});

test('checkpoint, close and reopen keep data and allocation; the log is dropped', async (t) => {
  const dir = await tempDir(t);
  let volume = await openVolume(dir);
  await volume.write(0, filled(MiB, 7), NO_FUA);
  await volume.trim(4096, 4096, NO_FUA);
  await volume.checkpoint();
  let stats = volume.stats();
  assert.equal(stats.checkpointSequence, 2);
  assert.equal(stats.walSegments, 1);
  assert.equal(stats.walBytes, 0);
  assert.equal(JSON.parse(fs.readFileSync(path.join(dir, 'checkpoint.json'), 'utf8')).seq, 2);
  await volume.write(2 * MiB, filled(4096, 8), NO_FUA);
  await volume.close();
  await assert.rejects(volume.read(0, 1), (e: unknown) => isMirrorsanError(e, 'NBD_SHUTDOWN'));

  volume = await openVolume(dir);
  t.after(() => volume.close());
  assert.equal(volume.recovery.replayedEntries, 0);
  assert.equal(volume.recovery.cutTail, false);
  stats = volume.stats();
  assert.equal(stats.lastSequence, 3);
  assert.equal(stats.checkpointSequence, 3);
  assert.deepEqual(volume.blockStatus(0, 3 * MiB), [ext(0, 4096, true), ext(4096, 4096, false), ext(8192, MiB - 8192, true), ext(MiB, MiB, false), ext(2 * MiB, 4096, true), ext(2 * MiB + 4096, MiB - 4096, false)]);
  assert.deepEqual(await readBytes(volume, 2 * MiB, 4), filled(4, 8));
  await volume.write(3 * MiB, filled(4096, 9), NO_FUA);
  assert.equal(volume.stats().lastSequence, 4, 'sequences continue after reopen');
  await assert.rejects(openVolume(dir, { sizeBytes: SIZE * 2 }), (e: unknown) => isMirrorsanError(e, 'CONFIG_INVALID'));
});

test('checkpoints taken under concurrent writes lose nothing; the log size triggers them', async (t) => {
  const dir = await tempDir(t);
  // 64 KiB writes must go through the log's payload here (not direct) to fill it.
  const volume = await openVolume(dir, { checkpointLogBytes: 256 * 1024, directWriteMinBytes: 0 });
  t.after(() => volume.close());
  const model = Buffer.alloc(10 * MiB);
  const pending: Promise<void>[] = [];
  for (let i = 0; i < 400; i++) {
    const offset = ((i * 7919) % 2000) * 4096;
    const data = filled(4096, (i % 255) + 1);
    data.copy(model, offset);
    pending.push(volume.write(offset, data, NO_FUA));
    if (i % 100 === 50) pending.push(volume.checkpoint());
    if (i % 20 === 0) await new Promise((resolve) => setImmediate(resolve));
  }
  await Promise.all(pending);
  await volume.checkpoint();
  const stats = volume.stats();
  assert.ok(stats.checkpoints >= 2, `${stats.checkpoints} checkpoints`);
  assert.equal(stats.checkpointSequence, 400);
  assert.equal(stats.walBytes, 0);
  const fdsBefore = fs.readdirSync('/proc/self/fd').length;
  // Each time the log passes 256 KiB a checkpoint starts by itself and empties it.
  for (let round = 0; round < 4; round++) {
    const before = volume.stats().checkpoints;
    for (let i = round * 8; i < round * 8 + 8; i++) await volume.write(8 * MiB + i * 65536, filled(65536, i + 1), NO_FUA);
    const deadline = Date.now() + 10_000;
    while (volume.stats().checkpoints === before && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 2));
    assert.ok(volume.stats().checkpoints > before, `round ${round}: the log size triggered a checkpoint`);
  }
  await volume.checkpoint(); // joins a running one, if any
  await volume.checkpoint();
  assert.ok(fs.readdirSync('/proc/self/fd').length <= fdsBefore, 'dropped segments leave no open descriptors');
  for (let i = 0; i < 32; i++) model.fill(i + 1, 8 * MiB + i * 65536, 8 * MiB + (i + 1) * 65536);
  assert.ok((await readBytes(volume, 0, model.length)).equals(model));
  await volume.flush();
  const copy = await tempDir(t);
  fs.cpSync(dir, copy, { recursive: true });
  const reopened = await openVolume(copy);
  assert.ok((await readBytes(reopened, 0, model.length)).equals(model));
  await reopened.close();
});

test('read-only volumes refuse writes; out-of-range requests are refused', async (t) => {
  const dir = await tempDir(t);
  await (await openVolume(dir)).close();
  const volume = await openVolume(dir, { readOnly: true });
  t.after(() => volume.close());
  assert.equal(volume.geometry().readOnly, true);
  await assert.rejects(volume.write(0, filled(512, 1), NO_FUA), (e: unknown) => isMirrorsanError(e, 'NBD_EPERM'));
  await assert.rejects(volume.trim(0, 512, NO_FUA), (e: unknown) => isMirrorsanError(e, 'NBD_EPERM'));
  await assert.rejects(volume.read(SIZE - 512, 1024), (e: unknown) => isMirrorsanError(e, 'STORE_RANGE'));
  await assert.rejects(
    LocalVolume.open({ dir, name: 'bad', sizeBytes: 1000, logger: createMemoryLogger() }),
    (e: unknown) => isMirrorsanError(e, 'CONFIG_INVALID'),
  );
});

test('an injected image write failure fails the write and stops the volume taking writes; the log survives', async (t) => {
  const dir = await tempDir(t);
  let failNext = false;
  const volume = await openVolume(dir, { faults: { failImageWrites: () => failNext } });
  await volume.write(0, filled(4096, 1), NO_FUA);
  failNext = true;
  await assert.rejects(volume.write(4096, filled(4096, 2), NO_FUA), (e: unknown) => isMirrorsanError(e, 'STORE_IO') && /EIO/.test(e.message));
  failNext = false;
  await assert.rejects(volume.write(8192, filled(4096, 3), NO_FUA), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
  await volume.flush(); // the log is still fine
  await assert.rejects(volume.checkpoint(), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
  assert.deepEqual(await readBytes(volume, 0, 4), filled(4, 1));
  await volume.close();
  const reopened = await openVolume(dir);
  t.after(() => reopened.close());
  assert.equal(reopened.recovery.replayedEntries, 2, 'the failed write was logged and is replayed');
  assert.deepEqual(await readBytes(reopened, 4096, 4), filled(4, 2));
});

test('crash recovery: a SIGKILLed writer loses nothing acknowledged before its last flush', async (t) => {
  const dir = await tempDir(t);
  const child = fileURLToPath(new URL('./local-volume.crash-child.js', import.meta.url));
  const proc = spawn(process.execPath, [child, dir, String(SIZE)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const flushed = await new Promise<number>((resolve, reject) => {
    let buffered = '';
    let last = 0;
    let killed = false;
    proc.stdout.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        const match = /^flushed (\d+)$/.exec(line);
        if (match) last = Number(match[1]);
        // Kill mid-stream: writes after this flush are still in flight.
        if (!killed && last >= 1200) {
          killed = true;
          proc.kill('SIGKILL');
        }
      }
    });
    proc.on('exit', (code, signal) => (signal === 'SIGKILL' ? resolve(last) : reject(new Error(`child exited ${code}: ${stderr}`))));
  });
  assert.ok(flushed >= 1200);

  const volume = await openVolume(dir);
  t.after(() => volume.close());
  assert.ok(volume.recovery.replayedEntries >= flushed, `replayed ${volume.recovery.replayedEntries} entries`);
  assert.equal(volume.recovery.checkpointSequence, 0);
  for (let i = 0; i < flushed; i++) {
    const got = await readBytes(volume, i * CRASH_BLOCK_BYTES, CRASH_BLOCK_BYTES);
    assert.ok(got.equals(crashPattern(i)), `write ${i} (acknowledged before the last flush) is intact`);
  }
  // Writes after the flush are either whole or absent, never torn or garbage.
  const blocks = SIZE / CRASH_BLOCK_BYTES;
  for (let i = flushed; i < Math.min(blocks, flushed + 200); i++) {
    const got = await readBytes(volume, i * CRASH_BLOCK_BYTES, CRASH_BLOCK_BYTES);
    assert.ok(got.equals(crashPattern(i)) || got.equals(Buffer.alloc(CRASH_BLOCK_BYTES)), `write ${i} is whole or absent`);
  }
  await assertImageEqualsContent(dir, volume);
});

test('large aligned writes go to the image only; FLUSH and FUA sync the image; replay never overwrites them with older entries', async (t) => {
  const dir = await tempDir(t);
  const volume = await openVolume(dir, { directWriteMinBytes: 64 * 1024 });
  const big = 256 * 1024;
  const model = Buffer.alloc(4 * MiB);
  const apply = (offset: number, data: Buffer): void => void data.copy(model, offset);
  // Older logged entries, then a newer direct write over the same blocks: replay must keep
  // the direct bytes. Then newer logged entries over part of it: replay must apply them.
  await volume.write(0, filled(8192, 1), NO_FUA); // logged (small)
  apply(0, filled(8192, 1));
  await volume.trim(big, big, NO_FUA);
  await volume.write(4096 + 512, filled(1024, 2), NO_FUA); // logged, partial block
  apply(4096 + 512, filled(1024, 2));
  const direct = Buffer.alloc(big);
  for (let i = 0; i < big; i++) direct[i] = (i * 31 + 7) & 0xff;
  const walBefore = volume.stats().walBytes;
  await volume.write(0, direct, NO_FUA); // direct
  apply(0, direct);
  assert.ok(volume.stats().walBytes - walBefore < 1024, 'the direct write logged no payload');
  await volume.write(8192, filled(4096, 3), NO_FUA); // newer logged write inside the direct range
  apply(8192, filled(4096, 3));
  await volume.write(big, direct, { fua: true }); // direct over the trimmed range, with FUA
  apply(big, direct);
  const imageSyncsAfterFua = volume.stats().imageSyncs;
  assert.ok(imageSyncsAfterFua >= 1, 'FUA on a direct write synced the image');
  await volume.trim(big + 65536, 65536, NO_FUA); // newer trim inside the second direct range
  model.fill(0, big + 65536, big + 2 * 65536);
  await volume.write(3 * MiB, direct, NO_FUA);
  apply(3 * MiB, direct);
  await volume.flush();
  assert.ok(volume.stats().imageSyncs > imageSyncsAfterFua, 'FLUSH after a direct write synced the image');
  assert.ok((await readBytes(volume, 0, model.length)).equals(model));
  // A crash now: copy the files as they are (everything was flushed), without a checkpoint.
  const copy = await tempDir(t);
  fs.cpSync(dir, copy, { recursive: true });
  await volume.close();
  const reopened = await openVolume(copy);
  t.after(() => reopened.close());
  assert.ok(reopened.recovery.replayedEntries >= 8, `replayed ${reopened.recovery.replayedEntries}`);
  assert.ok((await readBytes(reopened, 0, model.length)).equals(model), 'replay kept every direct write and applied newer entries');
  const status = reopened.blockStatus(big + 65536, 65536);
  assert.deepEqual(status.map((extent) => extent.hole), [true], 'the newer trim is a hole again after replay');
  assert.ok(fs.readFileSync(path.join(copy, 'volume.img')).subarray(0, model.length).equals(model), 'image file equals content');
});
