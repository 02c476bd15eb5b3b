// Proves the replicated volume's shell over real stores: three replicas joined by an in-memory transport; a write through any node is readable through every other once acknowledged, the single-region grant moves between writers (each release after a durability sync), writers on disjoint regions never exchange grants, requests spanning many regions are split and stay consistent, FLUSH/FUA/ZERO/TRIM travel, a write waits while a member is unreachable and completes after the link comes back or after an epoch change removes the member (which then refuses I/O), in async mode a write completes without the members but its grant moves only once every member has it, a member that missed writes catches up (live writes keep flowing while it copies only what differs) and rejoins byte-identical, and after close the three stores reopen with identical contents.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ENTRY_TYPE } from '../journal/entry.js';
import { createLogger } from '../util/log.js';
import type { PeerMessage } from '../replication/peer-link.js';
import { decodeDirtyAnswer } from './dirty-regions.js';
import { LOOP_NODES, Loop, openLoopCluster, readBytes, withTimeout } from './replica-loop.js';
import { ReplicatedVolume, type ReplicaMembership, type ReplicaTransport, type ReplicatedVolumeOptions } from './replicated-volume.js';

const SIZE_BYTES = 4 * 1024 * 1024;
const NODES = LOOP_NODES;

function openCluster(root: string, regionSizeBytes?: number, mode: 'sync' | 'async' = 'sync', catchUp?: (self: string, loop: Loop) => ReplicatedVolumeOptions['catchUp'], sourceLimits: ReplicatedVolumeOptions['sourceLimits'] = {}): Promise<Loop> {
  return openLoopCluster(root, SIZE_BYTES, (self, loop) => ({
    sourceLimits: { checkpointIntervalMs: 200, ...sourceLimits },
    ...(regionSizeBytes ? { regionSizeBytes } : {}),
    mode,
    ...(catchUp ? { catchUp: catchUp(self, loop) } : {}),
  }));
}

interface PolicingStatus {
  policing: { mode: string; regionsHeldHere: number; arbiter: { regionsHeld: Record<string, number>; awaitingDrained: string[] } | null };
  counters: { releaseSyncs: number; grantsReceived: number };
  fence: string | null;
}

test('a write through any replica is read back through every other; the grant moves between writers', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  let reference: Buffer = Buffer.alloc(0);
  try {
    const a = Buffer.alloc(65536, 0xa1);
    await withTimeout(v('n1').write(0, a, { fua: false }), 5000, 'write through n1');
    assert.deepEqual(await readBytes(v('n2'), 0, a.length), a);
    assert.deepEqual(await readBytes(v('n3'), 0, a.length), a);

    // n2 writes an overlapping range: the grant moves from n1 to n2 through the arbiter.
    const b = Buffer.alloc(4096, 0xb2);
    await withTimeout(v('n2').write(4096, b, { fua: true }), 5000, 'FUA write through n2');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 3 * 4096);
      assert.equal(bytes[0], 0xa1, `${id} keeps n1's first block`);
      assert.equal(bytes[4096], 0xb2, `${id} sees n2's block`);
      assert.equal(bytes[8191], 0xb2);
      assert.equal(bytes[8192], 0xa1);
    }
    const n2 = v('n2').status() as PolicingStatus;
    assert.equal(n2.policing.mode, 'single-writer');
    assert.equal(n2.policing.regionsHeldHere, 1, 'n2 holds the grant after its write');
    const n1 = v('n1').status() as PolicingStatus;
    assert.ok(n1.counters.releaseSyncs >= 1, 'n1 synced its writes before releasing the grant');
    assert.deepEqual(n1.policing.arbiter?.regionsHeld, { n2: 1 });

    // Back to n1, with ZERO and TRIM, then a FLUSH on n3 (which wrote nothing) and on n1.
    await withTimeout(v('n1').writeZeroes(0, 4096, { fua: false, mayTrim: false, fastZero: false }), 5000, 'zero through n1');
    await withTimeout(v('n3').trim(8192, 4096, { fua: false }), 5000, 'trim through n3');
    await withTimeout(v('n3').flush(), 5000, 'flush on n3');
    await withTimeout(v('n1').flush(), 5000, 'flush on n1');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 4 * 4096);
      assert.equal(bytes.subarray(0, 4096).every((x) => x === 0), true, `${id}: zeroed block`);
      assert.equal(bytes[4096], 0xb2);
      assert.equal(bytes.subarray(8192, 12288).every((x) => x === 0), true, `${id}: trimmed block`);
      assert.equal(bytes[12288], 0xa1);
    }

    // Block status: the same allocation on every replica (data where written, holes elsewhere).
    for (const id of NODES) {
      const extents = v(id).blockStatus(0, 1024 * 1024);
      assert.deepEqual(extents, [
        { offset: 0, length: 8192, hole: false, zero: false }, // zeroed without trim, and n2's block
        { offset: 8192, length: 4096, hole: true, zero: true }, // trimmed
        { offset: 12288, length: 65536 - 12288, hole: false, zero: false }, // the rest of n1's 64 KiB
        { offset: 65536, length: 1024 * 1024 - 65536, hole: true, zero: true }, // never written
      ], `${id}'s allocation`);
    }

    // Many concurrent writes from two nodes: every replica ends with the same bytes.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) {
      const writer = i % 2 === 0 ? 'n1' : 'n3';
      writes.push(v(writer).write((i % 16) * 4096, Buffer.alloc(4096, i + 1), { fua: false }));
    }
    await withTimeout(Promise.all(writes), 10_000, 'concurrent writes');
    reference = await readBytes(v('n1'), 0, 16 * 4096);
    assert.deepEqual(await readBytes(v('n2'), 0, reference.length), reference);
    assert.deepEqual(await readBytes(v('n3'), 0, reference.length), reference);
  } finally {
    await loop.close();
  }

  // Reopened (replay of what the close checkpointed): the three replicas agree.
  const reopened = await openCluster(root);
  try {
    const first = await readBytes(reopened.volumes.get('n1')!, 0, SIZE_BYTES);
    for (const id of ['n2', 'n3']) assert.deepEqual(await readBytes(reopened.volumes.get(id)!, 0, SIZE_BYTES), first, `${id} equals n1 after reopening`);
    assert.deepEqual(first.subarray(0, reference.length), reference, 'the last writes survived the reopen');
  } finally {
    await reopened.close();
  }
});

test('[I1] a write waits while a member is unreachable and completes once the link is back', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    let done = false;
    const pending = v('n1').write(4096, Buffer.alloc(4096, 2), { fua: false }).then(() => (done = true));
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(done, false, 'not acknowledged without n3');
    loop.heal('n1', 'n3');
    await withTimeout(pending, 5000, 'write after heal');
    const bytes = await readBytes(v('n3'), 4096, 4096);
    assert.equal(bytes[0], 2);
  } finally {
    await loop.close();
  }
});

test('[I2] a write that completes after its node lost its lease is not acknowledged (EIO), though every member has it', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  let leaseLost: string | undefined;
  const loop = await openLoopCluster(root, SIZE_BYTES, (self) => (self === 'n1' ? { servingCheck: () => leaseLost } : {}));
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    const pending = v('n1').write(4096, Buffer.alloc(4096, 2), { fua: false });
    await new Promise((resolve) => setTimeout(resolve, 100));
    leaseLost = 'the coordinator lease ran out';
    loop.heal('n1', 'n3');
    await assert.rejects(withTimeout(pending, 5000, 'write after heal'), /not serving on this node: the coordinator lease ran out \(the write reached every member/);
    for (const id of ['n2', 'n3']) assert.equal((await readBytes(v(id), 4096, 1))[0], 2, `${id} has the write all the same`);
    await assert.rejects(v('n1').read(4096, 1), /not serving on this node/, 'and n1 serves no reads either');
  } finally {
    leaseLost = undefined;
    await loop.close();
  }
});

test('writers on disjoint regions never exchange grants; overlapping ones do, and every replica agrees', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const regionBytes = 64 * 1024;
  const loop = await openCluster(root, regionBytes);
  const v = (id: string) => loop.volumes.get(id)!;
  const status = (id: string) => v(id).status() as PolicingStatus;
  try {
    // n1 writes regions 0..7, n2 regions 8..15, n3 regions 16..23, all at once.
    const writes: Promise<void>[] = [];
    for (const [index, id] of NODES.entries()) {
      for (let i = 0; i < 32; i++) {
        const region = index * 8 + (i % 8);
        writes.push(v(id).write(region * regionBytes + (i % 4) * 4096, Buffer.alloc(4096, index * 32 + i + 1), { fua: false }));
      }
    }
    await withTimeout(Promise.all(writes), 10_000, 'disjoint writes');
    for (const id of NODES) {
      assert.equal(status(id).counters.releaseSyncs, 0, `${id} never gave a grant back`);
      assert.equal(status(id).policing.regionsHeldHere, 8, `${id} holds its 8 regions`);
    }
    assert.deepEqual(status('n1').policing.arbiter?.regionsHeld, { n1: 8, n2: 8, n3: 8 });
    assert.equal(status('n2').policing.arbiter, null, 'only the arbiter has the table');

    // Everyone writes the same region 3 (held by n1): grants move, each after a sync.
    const contended: Promise<void>[] = [];
    for (let i = 0; i < 30; i++) contended.push(v(NODES[i % 3]!).write(3 * regionBytes + (i % 2) * 4096, Buffer.alloc(8192, 200 + i), { fua: false }));
    await withTimeout(Promise.all(contended), 10_000, 'contended writes');
    const releases = NODES.reduce((sum, id) => sum + status(id).counters.releaseSyncs, 0);
    assert.ok(releases >= 1, 'the contended region changed hands');

    // A zero spanning every region of the volume (64 regions, under the split limit) and a
    // 1 MiB write straddling region boundaries at an odd offset.
    await withTimeout(v('n3').writeZeroes(0, SIZE_BYTES, { fua: false, mayTrim: false, fastZero: false }), 10_000, 'zero of the whole volume');
    const straddling = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < straddling.length; i += 512) straddling.fill(i / 512, i, i + 512);
    await withTimeout(v('n2').write(regionBytes - 512, straddling, { fua: true }), 10_000, 'straddling write');
    const reference = await readBytes(v('n1'), 0, SIZE_BYTES);
    assert.deepEqual(reference.subarray(regionBytes - 512, regionBytes - 512 + straddling.length), straddling);
    for (const id of ['n2', 'n3']) assert.deepEqual(await readBytes(v(id), 0, SIZE_BYTES), reference, `${id} equals n1`);
  } finally {
    await loop.close();
  }
});

test('a request spanning more regions than one piece may take is split, and lands whole everywhere', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  // 4 KiB regions: the 4 MiB volume has 1024 of them, four times WRITE_REGIONS_MAX.
  const loop = await openCluster(root, 4096);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    const data = Buffer.alloc(3 * 1024 * 1024 + 4096);
    for (let i = 0; i < data.length; i += 4096) data.fill((i / 4096) % 251, i, i + 4096);
    await withTimeout(v('n1').write(4096, data, { fua: false }), 10_000, '3 MiB write over 769 regions');
    await withTimeout(v('n2').trim(512 * 1024, 2 * 1024 * 1024, { fua: true }), 10_000, 'trim over 512 regions');
    const reference = await readBytes(v('n3'), 0, SIZE_BYTES);
    const expected = Buffer.alloc(SIZE_BYTES);
    data.copy(expected, 4096);
    expected.fill(0, 512 * 1024, 512 * 1024 + 2 * 1024 * 1024);
    assert.deepEqual(reference, expected);
    for (const id of ['n1', 'n2']) assert.deepEqual(await readBytes(v(id), 0, SIZE_BYTES), reference, `${id} equals n3`);
  } finally {
    await loop.close();
  }
});

test('[I1, I2] an epoch change that removes an unreachable member completes the writes that waited for it; the removed member refuses I/O', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root, 64 * 1024);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    await withTimeout(v('n2').write(1024 * 1024, Buffer.alloc(4096, 7), { fua: false }), 5000, 'n2 takes another region');
    loop.sever('n1', 'n3');
    loop.sever('n2', 'n3');
    let done = false;
    const pending = v('n1').write(4096, Buffer.alloc(4096, 2), { fua: true }).then(() => (done = true));
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(done, false, 'not acknowledged without n3');

    // n3 is removed at epoch 2; n2 becomes the arbiter.
    const next = { epoch: 2, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n2' };
    for (const id of NODES) v(id).changeMembership(next);
    await withTimeout(pending, 5000, 'the waiting write after the epoch change');
    assert.equal(v('n1').epoch, 2);
    await assert.rejects(v('n3').read(0, 4096), /not in the in-sync set/);
    assert.throws(() => v('n3').write(0, Buffer.alloc(4096), { fua: false }), /not in the in-sync set/);

    // The new arbiter (n2) is fenced until n1 and n2 drained, then grants: both write again,
    // the same region, and agree.
    await withTimeout(Promise.all([v('n1').write(0, Buffer.alloc(4096, 3), { fua: false }), v('n2').write(8192, Buffer.alloc(4096, 4), { fua: true })]), 5000, 'writes in epoch 2');
    await withTimeout(v('n2').write(0, Buffer.alloc(4096, 5), { fua: false }), 5000, 'n2 takes region 0 from n1');
    const n2 = v('n2').status() as PolicingStatus;
    assert.deepEqual(n2.policing.arbiter?.awaitingDrained, []);
    for (const id of ['n1', 'n2']) {
      const bytes = await readBytes(v(id), 0, 3 * 4096);
      assert.deepEqual([bytes[0], bytes[4096], bytes[8192]], [5, 2, 4], `${id} holds the epoch-2 writes`);
    }
  } finally {
    await loop.close();
  }
});

test('[async, I4] a write completes from the local log alone, but its region changes hands only once every member has it', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root, 64 * 1024, 'async');
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    await withTimeout(v('n1').write(4096, Buffer.alloc(4096, 2), { fua: false }), 5000, 'async write while n3 is cut off');
    // n2 wants the same region: the grant stays with n1 until n3 has n1's write.
    let done = false;
    const contended = v('n2').write(4096, Buffer.alloc(4096, 3), { fua: false }).then(() => (done = true));
    await new Promise((resolve) => setTimeout(resolve, 150));
    assert.equal(done, false, 'the grant did not move while a member lacks the holder\'s write');
    loop.heal('n1', 'n3');
    await withTimeout(contended, 5000, 'contended write after heal');
    await withTimeout(v('n2').flush(), 5000, 'flush');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 8192);
      assert.deepEqual([bytes[0], bytes[4096]], [1, 3], `${id} applied n1's write, then n2's`);
    }
  } finally {
    await loop.close();
  }
});

test('[catch-up] a member that missed writes joins as catching up, copies what differs while writes go on, and rejoins identical', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  let caughtUpAt: number | undefined;
  // Digests and bytes come from the peers over the (in-memory) replication links.
  const loop = await openCluster(root, 64 * 1024, 'sync', (self) => ({
    caughtUp: async (epoch: number) => {
      assert.equal(self, 'n3');
      caughtUpAt = epoch;
    },
  }));
  const v = (id: string) => loop.volumes.get(id)!;
  const everyone = (membership: ReplicaMembership) => {
    for (const id of NODES) v(id).changeMembership(membership);
  };
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(65536, 1), { fua: false }), 5000, 'first write');
    // n3 drops out (epoch 2) and misses writes from n1 and n2.
    loop.sever('n1', 'n3');
    loop.sever('n2', 'n3');
    everyone({ epoch: 2, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1' });
    assert.equal(v('n3').replicaState, 'out-of-sync');
    for (let i = 0; i < 20; i++) await withTimeout(v(i % 2 === 0 ? 'n1' : 'n2').write((i * 3 % 64) * 65536, Buffer.alloc(8192, 10 + i), { fua: false }), 5000, `missed write ${i}`);
    await withTimeout(v('n1').writeZeroes(0, 4096, { fua: false, mayTrim: false, fastZero: false }), 5000, 'missed zero');

    // Back: n3 catches up at epoch 3 while n1 keeps writing.
    loop.heal('n1', 'n3');
    loop.heal('n2', 'n3');
    everyone({ epoch: 3, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1', catchingUp: ['n3'] });
    assert.equal(v('n3').replicaState, 'catching-up');
    await assert.rejects(v('n3').read(0, 4096), /not in the in-sync set/, 'no reads while catching up');
    const live: Promise<void>[] = [];
    for (let i = 0; i < 30; i++) live.push(v(i % 2 === 0 ? 'n1' : 'n2').write(((i * 7) % 64) * 65536 + 4096, Buffer.alloc(4096, 100 + i), { fua: false }));
    await withTimeout(Promise.all(live), 10_000, 'writes during catch-up');
    const deadline = Date.now() + 10_000;
    while (caughtUpAt === undefined && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(caughtUpAt, 3, 'n3 reported caught up in epoch 3');
    const progress = (v('n3').status() as { catchUp: { state: string; mode: string; bytesPlanned: number; bytesCopied: number; bytesCompared: number; percent: number } }).catchUp;
    assert.equal(progress.state, 'done');
    assert.equal(progress.percent, 100);
    // Only the 20 regions written while n3 was away are compared (the peers' dirty-region maps).
    assert.equal(progress.mode, 'dirty-regions');
    assert.equal(progress.bytesPlanned, 20 * 65536);
    assert.equal(progress.bytesCompared, 20 * 65536);
    assert.ok(progress.bytesCopied > 0 && progress.bytesCopied < SIZE_BYTES / 2, `copied only what differed: ${progress.bytesCopied} bytes`);
    everyone({ epoch: 4, replicas: [...NODES], inSync: [...NODES], arbiter: 'n1' });
    assert.equal(v('n3').replicaState, 'in-sync');
    await withTimeout(v('n3').write(65536 * 5, Buffer.alloc(4096, 0xee), { fua: true }), 5000, 'n3 writes again');
    const reference = await readBytes(v('n1'), 0, SIZE_BYTES);
    for (const id of ['n2', 'n3']) assert.deepEqual(await readBytes(v(id), 0, SIZE_BYTES), reference, `${id} equals n1`);
  } finally {
    await loop.close();
  }
  // After a restart n3's store replays to the same bytes (its rebased containers included).
  const reopened = await openCluster(root, 64 * 1024);
  try {
    const first = await readBytes(reopened.volumes.get('n1')!, 0, SIZE_BYTES);
    assert.deepEqual(await readBytes(reopened.volumes.get('n3')!, 0, SIZE_BYTES), first, 'n3 equals n1 after reopening');
  } finally {
    await reopened.close();
  }
});

test('[catch-up, full] when the in-sync peers cannot tell what a returning member lacks, it compares the whole volume, says why, and rejoins identical', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  let caughtUpAt: number | undefined;
  const loop = await openCluster(root, 64 * 1024, 'sync', () => ({ caughtUp: async (epoch: number) => void (caughtUpAt = epoch) }));
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(65536, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    loop.sever('n2', 'n3');
    for (const id of NODES) v(id).changeMembership({ epoch: 2, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1' });
    for (let i = 0; i < 6; i++) await withTimeout(v('n2').write(i * 5 * 65536, Buffer.alloc(4096, 20 + i), { fua: false }), 5000, `missed write ${i}`);
    loop.heal('n1', 'n3');
    loop.heal('n2', 'n3');
    // n1 and n2 hear of epoch 4 without epoch 3 (a watch that skipped a revision): their
    // membership is broken as far as they can prove, so neither vouches for its marks.
    for (const id of NODES) v(id).changeMembership({ epoch: 4, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1', catchingUp: ['n3'] });
    const deadline = Date.now() + 10_000;
    while (caughtUpAt === undefined && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(caughtUpAt, 4);
    const progress = (v('n3').status() as { catchUp: { mode: string; fullReason: string; bytesCompared: number } }).catchUp;
    assert.equal(progress.mode, 'full');
    assert.match(progress.fullReason, /n1 was not a member when n3 left \(member since epoch 4/);
    assert.equal(progress.bytesCompared, SIZE_BYTES);
    for (const id of NODES) v(id).changeMembership({ epoch: 5, replicas: [...NODES], inSync: [...NODES], arbiter: 'n1' });
    const reference = await readBytes(v('n1'), 0, SIZE_BYTES);
    assert.deepEqual(await readBytes(v('n3'), 0, SIZE_BYTES), reference, 'n3 equals n1');
  } finally {
    await loop.close();
  }
});

test('[catch-up, resume] a catch-up interrupted by a restart resumes with what was left plus what was written meanwhile', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  let caughtUpAt: number | undefined;
  // n3 copies slowly (8 chunks a second), so the restart lands in the middle.
  const hooks = (): ReplicatedVolumeOptions['catchUp'] => ({ caughtUp: async (epoch: number) => void (caughtUpAt = epoch), rateBytesPerSec: 8 * 65536 });
  const loop = await openCluster(root, 64 * 1024, 'sync', () => hooks());
  const v = (id: string) => loop.volumes.get(id)!;
  const everyone = (membership: ReplicaMembership) => {
    for (const volume of loop.volumes.values()) volume.changeMembership(membership);
  };
  type Progress = { catchUp: { state: string; mode: string; bytesPlanned: number; bytesCopied: number } | null; dirtyRegions: { planRemainingChunks: number | null } };
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    loop.sever('n2', 'n3');
    everyone({ epoch: 2, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1' });
    for (let chunk = 0; chunk < 24; chunk++) await withTimeout(v('n1').write(chunk * 65536, Buffer.alloc(4096, 30 + chunk), { fua: false }), 5000, `missed write ${chunk}`);
    loop.heal('n1', 'n3');
    loop.heal('n2', 'n3');
    everyone({ epoch: 3, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1', catchingUp: ['n3'] });
    const deadline = Date.now() + 10_000;
    while (((v('n3').status() as Progress).catchUp?.bytesCopied ?? 0) < 6 * 65536) {
      assert.ok(Date.now() < deadline, 'n3 copied nothing');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.equal((v('n3').status() as Progress).catchUp?.bytesPlanned, 24 * 65536);
    // n3 restarts; meanwhile it is out again (epoch 4) and misses 2 more chunks, one of them already copied.
    const stopped = v('n3');
    const copiedBefore = (stopped.status() as Progress).catchUp!.bytesCopied;
    loop.volumes.delete('n3');
    await stopped.close();
    everyone({ epoch: 4, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1' });
    await withTimeout(v('n2').write(0, Buffer.alloc(4096, 0x77), { fua: false }), 5000, 'write while n3 restarts');
    await withTimeout(v('n2').write(40 * 65536, Buffer.alloc(4096, 0x78), { fua: false }), 5000, 'write while n3 restarts');
    const reopened = await ReplicatedVolume.open({
      name: 'vol', sizeBytes: SIZE_BYTES, dir: path.join(root, 'n3'), self: 'n3',
      membership: { epoch: 5, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1', catchingUp: ['n3'] },
      transport: loop.transport('n3'), logger: createLogger({ level: 'error' }), sourceLimits: { checkpointIntervalMs: 200 }, regionSizeBytes: 64 * 1024,
      catchUp: { caughtUp: async (epoch: number) => void (caughtUpAt = epoch) },
    });
    loop.volumes.set('n3', reopened);
    for (const id of ['n1', 'n2']) v(id).changeMembership({ epoch: 5, replicas: [...NODES], inSync: ['n1', 'n2'], arbiter: 'n1', catchingUp: ['n3'] });
    for (const peer of ['n1', 'n2']) {
      loop.up('n3', peer);
      loop.up(peer, 'n3');
    }
    while (caughtUpAt !== 5) {
      assert.ok(Date.now() < deadline + 10_000, 'n3 did not finish its resumed catch-up');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const resumed = (reopened.status() as Progress).catchUp!;
    assert.equal(resumed.mode, 'dirty-regions');
    // Compared and copied: only what was left of the 24 (copies in flight at the stop may be
    // compared again), plus chunks 0 and 40, written while it was away the second time.
    const left = 24 * 65536 - copiedBefore;
    assert.ok(resumed.bytesPlanned <= left + 6 * 65536 && resumed.bytesPlanned >= left, `resumed plan of ${resumed.bytesPlanned / 65536} chunks, ${left / 65536} left`);
    assert.ok(resumed.bytesCopied <= left + 2 * 65536 && resumed.bytesCopied >= 2 * 65536, `copied ${resumed.bytesCopied / 65536} chunks after copying ${copiedBefore / 65536} before the restart`);
    everyone({ epoch: 6, replicas: [...NODES], inSync: [...NODES], arbiter: 'n1' });
    assert.equal((reopened.status() as Progress).dirtyRegions.planRemainingChunks, null, 'the plan is gone once in sync');
    const reference = await readBytes(v('n1'), 0, SIZE_BYTES);
    assert.deepEqual(await readBytes(reopened, 0, SIZE_BYTES), reference, 'n3 equals n1');
  } finally {
    await loop.close();
  }
});

test('[seed 19] an epoch change heard after a peer\'s frame of a newer epoch reached a target goes through whole', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root, 64 * 1024);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n3').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    const epoch3 = { epoch: 3, replicas: [...NODES], inSync: [...NODES], arbiter: 'n3' };
    v('n3').changeMembership(epoch3);
    const flush = v('n3').flush(); // SYNC and CHECKPOINT at epoch 3 reach n2's target for n3
    await new Promise((resolve) => setTimeout(resolve, 50));
    v('n2').changeMembership({ epoch: 2, replicas: [...NODES], inSync: [...NODES], arbiter: 'n2' });
    assert.equal(v('n2').epoch, 2);
    for (const id of ['n1', 'n2']) v(id).changeMembership(epoch3);
    await withTimeout(flush, 5000, 'the flush at epoch 3');
    await withTimeout(v('n2').write(0, Buffer.alloc(4096, 2), { fua: true }), 5000, 'a write at epoch 3');
    for (const id of NODES) assert.equal((await readBytes(v(id), 0, 1))[0], 2);
  } finally {
    await loop.close();
  }
});

test('[seed 30] a grant released by a completion inside a source batch: its sync goes after the batch\'s writes and completes', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root, 4096, 'sync', undefined, { inFlightWritesMax: 1, checkpointIntervalMs: 0 });
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'n1 takes region 0');
    await withTimeout(v('n1').write(4096, Buffer.alloc(4096, 2), { fua: false }), 5000, 'n1 takes region 1');
    // w1 (region 0) in flight, w2 (region 1) waits in the source, and n2 asks for region 0: the
    // completion of w1 releases region 0 in the batch that admits w2.
    const writes = [
      v('n1').write(0, Buffer.alloc(4096, 3), { fua: false }),
      v('n1').write(4096, Buffer.alloc(4096, 4), { fua: false }),
      v('n2').write(0, Buffer.alloc(4096, 5), { fua: false }),
    ];
    await withTimeout(Promise.all(writes), 5000, 'all three writes');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 8192);
      assert.deepEqual([bytes[0], bytes[4096]], [5, 4], `${id}`);
    }
  } finally {
    await loop.close();
  }
});

/**
 * Three nodes over the loop, with the coordinator played in-process: n1 may leave the in-sync set
 * to catch up (the CAS its MembershipMonitor would make) and be reopened from its directory, as a
 * restarted process would.
 */
async function restartableCluster(root: string): Promise<{ loop: Loop; reopenN1: () => Promise<ReplicatedVolume>; caughtUp: (volume: ReplicatedVolume, deadlineMs: number) => Promise<void> }> {
  let membership: ReplicaMembership = { epoch: 1, replicas: [...NODES], inSync: [...NODES], arbiter: 'n2' };
  const everyone = (next: ReplicaMembership): void => {
    membership = next;
    for (const volume of loop.volumes.values()) volume.changeMembership(next);
  };
  const hooks = (): ReplicatedVolumeOptions['catchUp'] => ({
    leave: async () => {
      everyone({ ...membership, epoch: membership.epoch + 1, inSync: membership.inSync.filter((node) => node !== 'n1'), catchingUp: ['n1'] });
      return true;
    },
    caughtUp: async () => everyone({ epoch: membership.epoch + 1, replicas: [...NODES], inSync: [...NODES], arbiter: 'n2' }),
  });
  const loop = await openCluster(root, 64 * 1024, 'sync', () => hooks());
  const reopenN1 = async (): Promise<ReplicatedVolume> => {
    const volume = await ReplicatedVolume.open({
      name: 'vol', sizeBytes: SIZE_BYTES, dir: path.join(root, 'n1'), self: 'n1', membership, transport: loop.transport('n1'),
      logger: createLogger({ level: 'error' }), sourceLimits: { checkpointIntervalMs: 200 }, regionSizeBytes: 64 * 1024, catchUp: hooks(),
    });
    loop.volumes.set('n1', volume);
    return volume;
  };
  const caughtUp = async (volume: ReplicatedVolume, deadlineMs: number): Promise<void> => {
    while (volume.replicaState !== 'in-sync' || (volume.status() as { catchUp: { state: string } | null }).catchUp?.state !== 'done') {
      assert.ok(Date.now() < deadlineMs, `n1 did not catch up: ${volume.replicaState}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  return { loop, reopenN1, caughtUp };
}

test('[restart] a writer that restarts with a write nobody else received leaves the in-sync set, catches up, and that write is gone everywhere', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const { loop, reopenN1, caughtUp } = await restartableCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(65536, 1), { fua: true }), 5000, 'a write everyone has');
    // n1 writes while cut off (logged and applied on n1 only, never acknowledged), then "crashes".
    loop.sever('n1', 'n2');
    loop.sever('n1', 'n3');
    const lost = v('n1').write(0, Buffer.alloc(65536, 0xee), { fua: false });
    lost.catch(() => undefined);
    await new Promise((resolve) => setTimeout(resolve, 100));
    const crashed = v('n1');
    loop.volumes.delete('n1'); // nothing reaches it any more: as good as dead
    // It restarts from its directory (its WAL replays the unacknowledged write into its image).
    const restarted = await reopenN1();
    loop.heal('n1', 'n2');
    loop.heal('n1', 'n3');
    await caughtUp(restarted, Date.now() + 10_000);
    // Only its own unacknowledged writes (replayed from its log: region 0) were compared.
    const progress = (restarted.status() as { catchUp: { mode: string; bytesPlanned: number } }).catchUp;
    assert.equal(progress.mode, 'dirty-regions');
    assert.equal(progress.bytesPlanned, 65536);
    for (const id of NODES) assert.equal((await readBytes(v(id), 0, 65536)).every((byte) => byte === 1), true, `${id} has the acknowledged write, not the lost one`);
    await withTimeout(v('n1').write(4096, Buffer.alloc(4096, 7), { fua: true }), 5000, 'n1 writes again');
    for (const id of ['n2', 'n3']) assert.equal((await readBytes(v(id), 4096, 1))[0], 7);
    await crashed.close().catch(() => undefined);
  } finally {
    await loop.close();
  }
});

test('[restart, I3] after a crash an in-sync member serves nothing until it has left the in-sync set and caught up; after a clean stop it serves at once', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const { loop, reopenN1, caughtUp } = await restartableCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n2').write(0, Buffer.alloc(4096, 3), { fua: true }), 5000, 'a write everyone has');
    // Crash: the old instance is dropped without close (no clean-shutdown marker).
    const crashed = v('n1');
    loop.volumes.delete('n1');
    const restarted = await reopenN1();
    await assert.rejects(restarted.read(0, 4096), /restarted after a crash/);
    for (const peer of ['n2', 'n3']) {
      loop.up('n1', peer);
      loop.up(peer, 'n1');
    }
    await caughtUp(restarted, Date.now() + 10_000);
    assert.equal((await readBytes(restarted, 0, 1))[0], 3);
    void crashed; // a crashed process closes nothing (closing it would checkpoint over the new one's files)
    // A clean stop leaves the marker: the next open serves at once, still in sync.
    loop.volumes.delete('n1');
    await restarted.close();
    const reopened = await reopenN1();
    for (const peer of ['n2', 'n3']) {
      loop.up('n1', peer);
      loop.up(peer, 'n1');
    }
    assert.equal(reopened.replicaState, 'in-sync');
    assert.equal((await readBytes(reopened, 0, 1))[0], 3);
  } finally {
    await loop.close();
  }
});

test('[restart, lost entries] a writer whose log lost entries a peer holds voids their numbers, catches up against every peer, and the replicas converge', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const { loop, reopenN1, caughtUp } = await restartableCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(65536, 1), { fua: true }), 5000, 'a write everyone has');
    // n1 sent its next entry to n3 only, then crashed before logging it: n3 holds an entry of
    // n1's stream that n1's log never got (and n2, the peer n1 compares with first, never saw).
    const last = (v('n1').status() as { source: { lastSequence: number } }).source.lastSequence;
    v('n3').receive('n1', { type: 'WRITE', volume: 'vol', epoch: 1, source: 'n1', sequence: last + 1, entryType: ENTRY_TYPE.WRITE, offset: 10 * 65536, lengthBytes: 4096, payload: Buffer.alloc(4096, 0xab) });
    const deadline = Date.now() + 10_000;
    while ((await readBytes(v('n3'), 10 * 65536, 1))[0] !== 0xab) {
      assert.ok(Date.now() < deadline, 'n3 did not apply the orphan entry');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const crashed = v('n1');
    loop.volumes.delete('n1');
    await crashed.close();
    const restarted = await reopenN1();
    for (const peer of ['n2', 'n3']) {
      loop.up('n1', peer);
      loop.up(peer, 'n1');
    }
    await caughtUp(restarted, deadline + 10_000);
    const progress = (restarted.status() as { catchUp: { mode: string; fullReason: string; chunksPeersDisagreed: number } }).catchUp;
    assert.equal(progress.mode, 'full');
    assert.ok(progress.chunksPeersDisagreed >= 1, 'n2 and n3 disagreed on the orphan\'s chunk');
    const reference = await readBytes(v('n2'), 0, SIZE_BYTES);
    for (const id of ['n1', 'n3']) assert.deepEqual(await readBytes(v(id), 0, SIZE_BYTES), reference, `${id} equals n2`);
    // n1's new entries take numbers past the lost one, and reach everyone.
    await withTimeout(v('n1').write(20 * 65536, Buffer.alloc(4096, 0x5a), { fua: true }), 5000, 'n1 writes again');
    for (const id of ['n2', 'n3']) assert.equal((await readBytes(v(id), 20 * 65536, 1))[0], 0x5a, `${id} has n1's new write`);
    assert.ok((restarted.status() as { source: { lastSequence: number } }).source.lastSequence > last + 1);
  } finally {
    await loop.close();
  }
});

test('[I4, repair] a writer removed with a write that reached only some members: the new arbiter rewrites the regions it held, and the survivors converge', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root, 64 * 1024);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    // n2 arbitrates from epoch 2 on; n1 writes region 10 (and keeps its grant).
    for (const id of NODES) v(id).changeMembership({ epoch: 2, replicas: [...NODES], inSync: [...NODES], arbiter: 'n2' });
    await withTimeout(v('n1').write(10 * 65536, Buffer.alloc(4096, 1), { fua: true }), 5000, 'n1 writes region 10');
    // n1's next write reaches n3 only, then n1 dies (as good as: nothing reaches it any more).
    const last = (v('n1').status() as { source: { lastSequence: number } }).source.lastSequence;
    v('n3').receive('n1', { type: 'WRITE', volume: 'vol', epoch: 2, source: 'n1', sequence: last + 1, entryType: ENTRY_TYPE.WRITE, offset: 10 * 65536, lengthBytes: 4096, payload: Buffer.alloc(4096, 0xcd) });
    const deadline = Date.now() + 10_000;
    while ((await readBytes(v('n3'), 10 * 65536, 1))[0] !== 0xcd) {
      assert.ok(Date.now() < deadline, 'n3 did not apply the half-delivered write');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    loop.sever('n1', 'n2');
    loop.sever('n1', 'n3');
    for (const id of ['n2', 'n3']) v(id).changeMembership({ epoch: 3, replicas: [...NODES], inSync: ['n2', 'n3'], arbiter: 'n2' });
    while (!(await readBytes(v('n2'), 0, SIZE_BYTES)).equals(await readBytes(v('n3'), 0, SIZE_BYTES))) {
      assert.ok(Date.now() < deadline, 'n2 and n3 still differ');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.equal((v('n2').status() as { counters: { repairedChunks: number } }).counters.repairedChunks, 1);
    assert.equal((await readBytes(v('n3'), 10 * 65536, 1))[0], 1, 'the arbiter\'s bytes won');
  } finally {
    await loop.close();
  }
});

test('[bad input] a region request out of range, too long or too finely chunked gets a clear error reply; an out-of-sync replica refuses to answer; the volume keeps serving', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const answers: PeerMessage[] = [];
  const transport: ReplicaTransport = { sendToPeer: () => true, answerSource: (_peer, message) => answers.push(message) > 0, resetInbound: () => undefined };
  const volume = await ReplicatedVolume.open({
    name: 'vol', sizeBytes: SIZE_BYTES, dir: path.join(root, 'n1'), self: 'n1',
    membership: { epoch: 1, replicas: ['n1', 'n2'], inSync: ['n1', 'n2'] }, transport, logger: createLogger({ level: 'error' }),
  });
  try {
    const ask = async (request: { kind: 'digests' | 'read' | 'dirty'; offset: number; lengthBytes: number; chunkBytes: number }): Promise<{ ok: boolean; text: string; bytes: number; data: Buffer }> => {
      const before = answers.length;
      volume.receive('n2', { type: 'REGION_REQUEST', volume: 'vol', epoch: 1, requestId: before + 1, ...request });
      for (let i = 0; i < 100 && answers.length === before; i++) await new Promise((resolve) => setTimeout(resolve, 5));
      const reply = answers[before];
      assert.ok(reply?.type === 'REGION_REPLY' && reply.requestId === before + 1, 'one reply per request');
      return { ok: reply.ok, text: reply.data.toString('utf8'), bytes: reply.data.length, data: reply.data };
    };
    assert.match((await ask({ kind: 'read', offset: SIZE_BYTES - 4096, lengthBytes: 8192, chunkBytes: 0 })).text, /outside the volume/);
    assert.match((await ask({ kind: 'read', offset: 0, lengthBytes: 2 * 1024 * 1024, chunkBytes: 0 })).text, /longer than/);
    const fine = await ask({ kind: 'digests', offset: 0, lengthBytes: 1024 * 1024, chunkBytes: 512 });
    assert.equal(fine.ok, false);
    assert.match(fine.text, /chunk size 512 out of range/);
    assert.match((await ask({ kind: 'digests', offset: SIZE_BYTES, lengthBytes: 4096, chunkBytes: 4096 })).text, /outside the volume/);
    // A dirty-region question in another tracking granularity is refused, not answered wrongly.
    const granularity = await ask({ kind: 'dirty', offset: 0, lengthBytes: 0, chunkBytes: 65536 });
    assert.equal(granularity.ok, false);
    assert.match(granularity.text, /tracked in 1048576-byte chunks here, not 65536/);
    // A good request is answered, and client I/O goes on.
    const good = await ask({ kind: 'digests', offset: 0, lengthBytes: 1024 * 1024, chunkBytes: 65536 });
    assert.deepEqual([good.ok, good.bytes], [true, 16 * 16]);
    const dirty = await ask({ kind: 'dirty', offset: 0, lengthBytes: 0, chunkBytes: 1024 * 1024 });
    assert.equal(dirty.ok, true);
    const answer = decodeDirtyAnswer(dirty.data, 4);
    assert.deepEqual([answer.complete, answer.reason], [false, 'n1 has no record of n2 leaving'], 'n2 never left: nothing to vouch for');
    assert.equal((await readBytes(volume, 0, 4096)).length, 4096);
    // Out of the in-sync set: no answers that could be stale.
    volume.changeMembership({ epoch: 2, replicas: ['n1', 'n2'], inSync: ['n2'] });
    const stale = await ask({ kind: 'read', offset: 0, lengthBytes: 4096, chunkBytes: 0 });
    assert.equal(stale.ok, false);
    assert.match(stale.text, /not in the in-sync set/);
  } finally {
    await volume.close();
  }
});
