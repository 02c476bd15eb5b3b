// Proves the simulated disk's semantics: cache versus durable part, what fdatasync covers,
// what a crash keeps (nothing unsynced, or a prefix with a torn sector-aligned last write),
// and each injected fault: lost writes, latent corruption, EIO (including fsyncgate), ENOSPC.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DISK_PROFILES, HONEST_DISK_PROFILES, SimDisk, randomDiskProfile, type DiskProfile, type SimFile } from './disk.js';
import { Prng } from './prng.js';
import { Scheduler } from './scheduler.js';

const PERFECT = DISK_PROFILES[0]!;

function setup(profile: Partial<DiskProfile> = {}, seed = 1, options: { sectorBytes?: number; capacityBytes?: number; dirtyOperationsMax?: number } = {}) {
  const scheduler = new Scheduler({ seed });
  const disk = new SimDisk({ name: 'd', scheduler, prng: new Prng(seed), profile: { ...PERFECT, ...profile }, ...options });
  /** Runs the simulation until `promise` settles, so disk calls can be awaited in tests. */
  const settle = async <T>(promise: Promise<T>): Promise<T> => {
    let outcome: { ok: true; value: T } | { ok: false; error: unknown } | undefined;
    promise.then(
      (value) => (outcome = { ok: true, value }),
      (error: unknown) => (outcome = { ok: false, error }),
    );
    await new Promise((resolve) => setImmediate(resolve)); // an already settled promise needs no events
    await scheduler.runUntil(() => outcome !== undefined, { stepsMax: 10_000 });
    if (!outcome!.ok) throw outcome!.error;
    return outcome!.value;
  };
  return { scheduler, disk, settle };
}

async function readAll(settle: <T>(p: Promise<T>) => Promise<T>, file: SimFile, length: number): Promise<Buffer> {
  const target = Buffer.alloc(length);
  await settle(file.read(target, 0));
  return target;
}

test('reads see completed writes at once; only synced data survives a crash', async () => {
  const { disk, settle } = setup();
  const file = await settle(disk.open('log', { create: true }));
  await settle(file.write(Buffer.from('durable!'), 0));
  await settle(file.datasync());
  await settle(file.write(Buffer.from('volatile'), 8));
  assert.equal((await readAll(settle, file, 16)).toString(), 'durable!volatile');
  assert.equal(await settle(file.size()), 16);
  disk.crash();
  const reopened = await settle(disk.open('log'));
  assert.equal(await settle(reopened.size()), 8);
  assert.equal((await readAll(settle, reopened, 8)).toString(), 'durable!');
  assert.equal(disk.stats.lostAtCrash, 1);
});

test('a write past the end leaves a hole of zeros; reads past the end return zeros', async () => {
  const { disk, settle } = setup();
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.writev([Buffer.from('ab'), Buffer.from('cd')], 4));
  assert.deepEqual(await readAll(settle, file, 10), Buffer.from([0, 0, 0, 0, 0x61, 0x62, 0x63, 0x64, 0, 0]));
});

test('fdatasync covers only writes that completed before it was called', async () => {
  const { disk, settle } = setup({ writeMsMin: 5, writeMsMax: 5, syncMsMin: 10, syncMsMax: 10 });
  const file = await settle(disk.open('f', { create: true }));
  const write = file.write(Buffer.from('late'), 0);
  // Called while the write is in flight; the write completes before the sync does.
  await settle(file.datasync());
  await settle(write);
  disk.crash();
  assert.equal(disk.durableContent('f')!.length, 0, 'the sync did not cover the in-flight write');
  const again = await settle(disk.open('f'));
  await settle(again.write(Buffer.from('done'), 0));
  await settle(again.datasync());
  disk.crash();
  assert.equal(disk.durableContent('f')!.toString(), 'done', 'a sync called after the write completed covers it');
});

test('a crash leaves unsettled promises unsettled and makes old handles fail with EBADF', async () => {
  const { disk, settle, scheduler } = setup({ writeMsMin: 5, writeMsMax: 5 });
  const file = await settle(disk.open('f', { create: true }));
  let settled = false;
  void file.write(Buffer.from('x'), 0).finally(() => (settled = true));
  assert.equal(disk.pendingOperations, 1);
  disk.crash();
  assert.equal(disk.pendingOperations, 0);
  await scheduler.runUntil(100);
  assert.equal(settled, false);
  await assert.rejects(file.read(Buffer.alloc(1), 0), { code: 'EBADF' });
  await assert.rejects(settle(disk.open('missing')), { code: 'ENOENT' });
  await assert.rejects(settle(disk.open('f', { create: true, exclusive: true })), { code: 'EEXIST' });
  const closed = await settle(disk.open('f'));
  await closed.close();
  await assert.rejects(closed.datasync(), { code: 'EBADF' });
});

test('with writeback, a crash keeps a prefix of the unsynced writes in completion order', async () => {
  let partial = 0;
  for (let seed = 1; seed <= 60; seed++) {
    const { disk, settle } = setup({ crashWritebackProbability: 1, tornWriteProbability: 0 }, seed);
    const file = await settle(disk.open('f', { create: true }));
    for (let index = 0; index < 6; index++) await settle(file.write(Buffer.from([index + 1]), index));
    disk.crash();
    const survived = [...disk.durableContent('f')!];
    // Never a later write without every earlier one.
    assert.deepEqual(survived, [1, 2, 3, 4, 5, 6].slice(0, survived.length), `seed ${seed}: ${survived.join(',')}`);
    if (survived.length > 0 && survived.length < 6) partial++;
  }
  assert.ok(partial > 20, `only ${partial} partial writebacks`);
});

test('a torn write keeps a sector-aligned prefix of the new data and the old data after it', async () => {
  const sectorBytes = 512;
  let torn = 0;
  for (let seed = 1; seed <= 40; seed++) {
    const { disk, settle } = setup({ crashWritebackProbability: 1, tornWriteProbability: 1 }, seed, { sectorBytes });
    const file = await settle(disk.open('f', { create: true }));
    await settle(file.write(Buffer.alloc(4096, 0xaa), 0));
    await settle(file.datasync());
    await settle(file.write(Buffer.alloc(3000, 0xbb), 100)); // unsynced, spans sectors, unaligned start
    disk.crash();
    const content = disk.durableContent('f')!;
    assert.equal(content.length, 4096);
    let newBytes = 0;
    while (100 + newBytes < content.length && content[100 + newBytes] === 0xbb) newBytes++;
    assert.ok(content.subarray(0, 100).every((byte) => byte === 0xaa));
    assert.ok(content.subarray(100 + newBytes).every((byte) => byte === 0xaa), `seed ${seed}: only old data after the cut`);
    if (newBytes === 3000 || newBytes === 0) continue;
    torn++;
    assert.equal((100 + newBytes) % sectorBytes, 0, `seed ${seed}: the cut at ${100 + newBytes} is on a sector boundary`);
    const faults = disk.faultsOverlapping('f', 100 + newBytes, 1, ['torn-write']);
    assert.equal(faults.length, 1);
    assert.deepEqual({ offset: faults[0]!.offset, lengthBytes: faults[0]!.lengthBytes, reported: faults[0]!.reported }, { offset: 100, lengthBytes: 3000, reported: false });
  }
  assert.ok(torn > 10, `only ${torn} torn writes`);
});

test('a lost write is acknowledged and readable but gone after a crash, and recorded', async () => {
  const { disk, settle } = setup({ lostWriteProbability: 1 });
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.from('phantom'), 0));
  await settle(file.datasync());
  assert.equal((await readAll(settle, file, 7)).toString(), 'phantom');
  disk.crash();
  assert.equal(disk.durableContent('f')!.length, 0);
  assert.deepEqual(disk.faults().map((fault) => [fault.kind, fault.offset, fault.lengthBytes, fault.reported]), [['lost-write', 0, 7, false]]);
});

test('corruption flips one bit of the durable part; reads see it after a crash; it is recorded', async () => {
  const { disk, settle } = setup({}, 1, { sectorBytes: 512 });
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.alloc(2048, 0), 0));
  await settle(file.datasync());
  disk.corrupt('f', 1000);
  assert.ok((await readAll(settle, file, 2048)).every((byte) => byte === 0), 'the page cache still holds the good copy');
  disk.crash();
  const reopened = await settle(disk.open('f'));
  const content = await readAll(settle, reopened, 2048);
  const flipped = [...content.keys()].filter((offset) => content[offset] !== 0);
  assert.deepEqual(flipped, [1000]);
  assert.equal(content[1000]!.toString(2).replace(/0/g, '').length, 1, 'exactly one bit');
  assert.deepEqual(disk.faultsOverlapping('f', 1000, 1).map((fault) => [fault.kind, fault.offset, fault.lengthBytes]), [['corruption', 512, 512]]);
  assert.deepEqual(disk.faultsOverlapping('f', 0, 512), [], 'a clean range has no fault');
});

test('a crash may flip a bit by the profile (latent sector errors)', async () => {
  const { disk, settle } = setup({ corruptionProbabilityPerCrash: 1 });
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.alloc(100, 7), 0));
  await settle(file.datasync());
  disk.crash();
  assert.equal(disk.faults().filter((fault) => fault.kind === 'corruption').length, 1);
  assert.notDeepEqual(disk.durableContent('f'), Buffer.alloc(100, 7));
  assert.deepEqual(disk.cachedContent('f'), disk.durableContent('f'));
});

test('EIO on write changes nothing; EIO on read is reported', async () => {
  const failing = setup({ writeErrorProbability: 1 });
  const file = await failing.settle(failing.disk.open('f', { create: true }));
  await assert.rejects(failing.settle(file.write(Buffer.from('x'), 0)), { code: 'EIO', syscall: 'write' });
  assert.equal(failing.disk.cachedContent('f')!.length, 0);
  const reads = setup({ readErrorProbability: 1 });
  const created = await reads.settle(reads.disk.open('g', { create: true }));
  await assert.rejects(reads.settle(created.read(Buffer.alloc(1), 0)), { code: 'EIO', syscall: 'read' });
  assert.equal(reads.disk.faults()[0]?.reported, true);
});

test('a failed fdatasync loses the writes it covered while the cache still shows them (fsyncgate)', async () => {
  const { disk, settle } = setup({ syncErrorProbability: 1 });
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.from('data'), 0));
  await assert.rejects(settle(file.datasync()), { code: 'EIO', syscall: 'fdatasync' });
  assert.equal((await readAll(settle, file, 4)).toString(), 'data');
  disk.crash();
  assert.equal(disk.durableContent('f')!.length, 0);
  assert.deepEqual(disk.faults().map((fault) => [fault.kind, fault.reported]), [['sync-eio', true]]);
});

test('a write that would exceed the capacity fails with ENOSPC and writes nothing', async () => {
  const { disk, settle } = setup({}, 1, { capacityBytes: 100 });
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.alloc(60), 0));
  await assert.rejects(settle(file.write(Buffer.alloc(50), 60)), { code: 'ENOSPC' });
  await settle(file.write(Buffer.alloc(50), 10)); // overwriting in place needs no space
  assert.equal(disk.usedBytes, 60);
});

test('truncate is durable only once synced', async () => {
  const { disk, settle } = setup();
  const file = await settle(disk.open('f', { create: true }));
  await settle(file.write(Buffer.from('0123456789'), 0));
  await settle(file.datasync());
  await settle(file.truncate(4));
  assert.equal(await settle(file.size()), 4);
  disk.crash();
  assert.equal(disk.durableContent('f')!.toString(), '0123456789');
  const reopened = await settle(disk.open('f'));
  await settle(reopened.truncate(4));
  await settle(reopened.datasync());
  await settle(reopened.write(Buffer.from('X'), 6));
  disk.crash();
  assert.deepEqual(disk.durableContent('f'), Buffer.from('0123'), 'truncated bytes do not come back');
});

test('wipe replaces the disk with an empty one; unlink and list work', async () => {
  const { disk, settle } = setup();
  await settle(disk.open('b', { create: true }));
  await settle(disk.open('a', { create: true }));
  assert.deepEqual(disk.list(), ['a', 'b']);
  await settle(disk.unlink('b'));
  assert.equal(disk.exists('b'), false);
  await assert.rejects(settle(disk.unlink('b')), { code: 'ENOENT' });
  disk.wipe();
  assert.deepEqual(disk.list(), []);
});

test('random profiles come from the seed; the honest ones inject nothing but crash losses', () => {
  assert.deepEqual(randomDiskProfile(new Prng(3)), randomDiskProfile(new Prng(3)));
  assert.ok(HONEST_DISK_PROFILES.length >= 2);
  for (const profile of HONEST_DISK_PROFILES) {
    assert.equal(profile.lostWriteProbability + profile.corruptionProbabilityPerCrash + profile.writeErrorProbability + profile.syncErrorProbability, 0);
  }
  const scheduler = new Scheduler({ seed: 1 });
  assert.throws(() => new SimDisk({ name: 'x', scheduler, prng: new Prng(1), profile: { ...PERFECT, lostWriteProbability: 2 } }), /lostWriteProbability/);
});

test('too many unsynced operations are written back in the background, oldest first', async () => {
  const { disk, settle } = setup({}, 1, { dirtyOperationsMax: 4 });
  const file = await settle(disk.open('f', { create: true }));
  for (let index = 0; index < 5; index++) await settle(file.write(Buffer.from([index + 1]), index));
  assert.equal(disk.stats.writtenBackInBackground, 2);
  assert.deepEqual(disk.durableContent('f'), Buffer.from([1, 2]), 'a prefix, never a later write alone');
  disk.crash();
  assert.deepEqual(disk.durableContent('f'), Buffer.from([1, 2]));
});
