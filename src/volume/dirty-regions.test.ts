// Proves the dirty-region tracker: marks while a replica is out, departure seeds and writers,
// when a node may vouch for its marks, catch-up plans (and their fallback), persistence.
import assert from 'node:assert/strict';
import test from 'node:test';
import fc from 'fast-check';
import { ChunkSet, DIRTY_CHUNKS_MAX, DirtyRegionTracker, decodeDirtyAnswer, dirtyChunkBytes, encodeDirtyAnswer, type DirtyAnswer } from './dirty-regions.js';

const CHUNK = 65536;
const SIZE = 64 * CHUNK;
const ALL = ['a', 'b', 'r'];

function tracker(self: string, newStore = true): DirtyRegionTracker {
  return DirtyRegionTracker.fresh({ self, sizeBytes: SIZE, chunkBytes: CHUNK, newStore });
}

function chunksOf(answer: DirtyAnswer): number[] {
  return [...answer.chunks];
}

test('dirtyChunkBytes keeps the compare chunk unless the volume would have too many', () => {
  assert.equal(dirtyChunkBytes(SIZE, CHUNK), CHUNK);
  const huge = DIRTY_CHUNKS_MAX * CHUNK * 4;
  assert.equal(dirtyChunkBytes(huge, CHUNK), CHUNK * 4);
  assert.throws(() => dirtyChunkBytes(SIZE, 3000));
});

test('ChunkSet adds, deletes, unions, counts and iterates in order', () => {
  const set = new ChunkSet(20);
  for (const chunk of [19, 3, 8]) set.add(chunk);
  set.delete(8);
  const other = new ChunkSet(20);
  other.add(0);
  set.addAll(other);
  assert.deepEqual([...set], [0, 3, 19]);
  assert.equal(set.size, 3);
  assert.equal(ChunkSet.all(20).size, 20);
});

test('a departure seeds the map with the resend window, records its writers, and every later write is marked', () => {
  const a = tracker('a');
  a.adopt(1, ALL, [], ALL, [], 0);
  a.noteWrite(0, 4096, true); // r still a member: nothing to track
  assert.deepEqual(a.trackedReplicas, []);
  a.adopt(2, ['a', 'b'], [], ALL, [{ offset: 5 * CHUNK, lengthBytes: 2 * CHUNK }], 0);
  a.noteWrite(10 * CHUNK + 100, 10, false);
  a.noteWrite(63 * CHUNK, CHUNK, true);
  const answer = a.answer('r', 0);
  assert.equal(answer.complete, true, answer.reason);
  assert.deepEqual(chunksOf(answer), [5, 6, 10, 63]);
  assert.deepEqual(answer.writers, ['a', 'b']);
  // Catching up: it receives writes itself, so they are not marked; the map stays until it is in sync.
  a.adopt(3, ['a', 'b'], ['r'], ALL, [], 0);
  a.noteWrite(20 * CHUNK, 4096, true);
  assert.deepEqual(chunksOf(a.answer('r', 0)), [5, 6, 10, 63]);
  a.adopt(4, ALL, [], ALL, [], 0);
  assert.deepEqual(a.trackedReplicas, []);
});

test('only a node that was a member when the replica left, without a break since, vouches for its marks', () => {
  const late = tracker('b');
  late.adopt(1, ['a', 'r'], [], ALL, [], 0); // b itself out of the stream
  late.adopt(2, ['a'], [], ALL, [], 0); // r leaves while b is out too
  late.adopt(3, ['a'], ['b'], ALL, [], 0);
  late.adopt(4, ['a', 'b'], [], ALL, [], 0);
  const answer = late.answer('r', 0);
  assert.equal(answer.complete, false);
  assert.match(answer.reason, /not a member when r left/);

  const skipper = tracker('a');
  skipper.adopt(1, ALL, [], ALL, [], 0);
  skipper.adopt(2, ['a', 'b'], [], ALL, [], 0);
  skipper.adopt(5, ['a', 'b'], ['r'], ALL, [], 0); // epochs 3 and 4 never seen
  assert.match(skipper.answer('r', 0).reason, /member since epoch 5/);
  assert.equal(skipper.answer('r', 5).complete, true, 'marks since the skip are complete');
  assert.equal(skipper.answer('r', 4).complete, false);

  const lost = tracker('a', false); // the tracker file was lost: seeds unknown
  lost.adopt(7, ['a', 'b'], [], ALL, [], 0);
  assert.match(lost.answer('r', 0).reason, /lost its record/);
});

test('a plan unions the self marks and complete answers; a writer that cannot vouch forces a full comparison', () => {
  const r = tracker('r');
  r.adopt(1, ALL, [], ALL, [], 0);
  r.adopt(2, ['a', 'b'], [], ALL, [{ offset: 0, lengthBytes: 4096 }], 0); // r's own window when it left
  const from = (complete: boolean, writers: string[], chunks: number[]): DirtyAnswer => {
    const set = new ChunkSet(64);
    for (const chunk of chunks) set.add(chunk);
    return { complete, reason: complete ? '' : 'cannot tell', writers, chunks: set };
  };
  const ok = r.makePlan(3, new Map([['a', from(true, ['a', 'b'], [4])], ['b', from(true, ['a', 'b'], [9])]]));
  assert.equal(ok.full, false);
  assert.deepEqual([...ok.plan.remaining], [0, 4, 9]);
  // Resuming: what was left is kept, peers add what they marked since.
  r.verified(0);
  r.verified(4);
  const resumed = r.makePlan(6, new Map([['a', from(true, [], [30])]]));
  assert.deepEqual([...resumed.plan.remaining], [0, 9, 30], 'self marks stay until in sync');
  assert.equal(resumed.plan.epoch, 6);
  // b could not vouch, and a says b was writing when r left: everything is compared.
  const missing = r.makePlan(7, new Map([['a', from(true, ['a', 'b'], [4])], ['b', from(false, [], [])]]));
  assert.equal(missing.full, true);
  assert.match(missing.reason, /b wrote while this replica was away/);
  assert.equal(missing.plan.remaining.size, 64);
  assert.equal(r.makePlan(8, new Map([['a', from(false, [], [])]])).full, true);
  // In sync again: the plan is gone.
  r.adopt(9, ALL, [], ALL, [], 0);
  assert.equal(r.plan, undefined);
  // A new store joining a volume with history (a replaced disk) lacks everything.
  const replaced = tracker('r');
  replaced.adopt(6, ['a', 'b'], [], ALL, [], 0);
  assert.match(replaced.makePlan(6, new Map([['a', from(true, [], [])]])).reason, /own unacknowledged writes/);
  // A node that lost its tracker cannot know its own unacknowledged writes.
  assert.match(tracker('r', false).makePlan(1, new Map([['a', from(true, [], [])]])).reason, /own unacknowledged writes/);
});

test('leaving in sync to catch up plans the self marks from the last in-sync epoch', () => {
  const r = tracker('r');
  r.adopt(3, ALL, [], ALL, [], 0);
  r.noteReplayed(2 * CHUNK, 10, true, 5);
  r.planFromSelf(3);
  assert.deepEqual([...r.plan!.remaining], [2]);
  assert.equal(r.plan!.epoch, 3);
  r.dropPlan();
  assert.equal(r.plan, undefined);
});

test('replayed entries re-mark every map and the self marks; refreshSelf shrinks the self marks to the window only when peers hold the rest', () => {
  const a = tracker('a');
  a.adopt(1, ALL, [], ALL, [], 0);
  a.adopt(2, ['a', 'b'], [], ALL, [], 0);
  a.noteReplayed(7 * CHUNK, CHUNK + 1, false, 1);
  assert.deepEqual(chunksOf(a.answer('r', 0)), [7, 8]);
  assert.equal(a.selfMarkedChunks, 0, 'a remote entry is not ours');
  a.noteReplayed(1 * CHUNK, 1, true, 2);
  a.refreshSelf([{ offset: 40 * CHUNK, lengthBytes: 1 }], false);
  assert.equal(a.selfMarkedChunks, 2);
  a.refreshSelf([{ offset: 40 * CHUNK, lengthBytes: 1 }], true);
  assert.equal(a.selfMarkedChunks, 1);
});

test('the tracker survives encode/decode whole; corruption and another volume\'s file are refused', () => {
  const a = tracker('a');
  a.adopt(1, ALL, [], ALL, [], 0);
  a.adopt(2, ['a', 'b'], [], ALL, [{ offset: 3 * CHUNK, lengthBytes: 1 }], 0);
  a.noteWrite(50 * CHUNK, 1, true);
  const r = tracker('r');
  r.adopt(2, ['a', 'b'], [], ALL, [], 0);
  r.adopt(3, ['a', 'b'], ['r'], ALL, [], 0);
  r.makePlan(3, new Map());
  for (const original of [a, r]) {
    const copy = DirtyRegionTracker.decode(original.encode(), { self: original.self, sizeBytes: SIZE, chunkBytes: CHUNK });
    assert.deepEqual(copy.encode(), original.encode());
  }
  const decoded = DirtyRegionTracker.decode(a.encode(), { self: 'a', sizeBytes: SIZE, chunkBytes: CHUNK });
  assert.deepEqual(chunksOf(decoded.answer('r', 0)), [3, 50]);
  assert.equal(decoded.memberSince, 1);
  const bytes = a.encode();
  bytes[bytes.length - 10]! ^= 1;
  assert.throws(() => DirtyRegionTracker.decode(bytes, { self: 'a', sizeBytes: SIZE, chunkBytes: CHUNK }), /checksum/);
  assert.throws(() => DirtyRegionTracker.decode(a.encode(), { self: 'a', sizeBytes: SIZE * 2, chunkBytes: CHUNK }), /not this volume's/);
  assert.throws(() => DirtyRegionTracker.decode(Buffer.from('xy'), { self: 'a', sizeBytes: SIZE, chunkBytes: CHUNK }), /too short/);
});

test('answers cross the wire unchanged; a wrong chunk count or trailing bytes are refused', () => {
  const set = new ChunkSet(64);
  set.add(63);
  const answer: DirtyAnswer = { complete: false, reason: 'because', writers: ['a', 'b'], chunks: set };
  const decoded = decodeDirtyAnswer(encodeDirtyAnswer(answer), 64);
  assert.deepEqual({ ...decoded, chunks: [...decoded.chunks] }, { ...answer, chunks: [63] });
  assert.throws(() => decodeDirtyAnswer(encodeDirtyAnswer(answer), 65), /covers 64 chunks/);
  assert.throws(() => decodeDirtyAnswer(Buffer.concat([encodeDirtyAnswer(answer), Buffer.of(0)]), 64), /trailing/);
  assert.throws(() => decodeDirtyAnswer(Buffer.of(1), 64), /truncated/);
});

test('property: every chunk written while a replica is out is in a vouching member\'s answer', () => {
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.nat(SIZE - 1), fc.integer({ min: 1, max: 3 * CHUNK }), fc.boolean()), { maxLength: 40 }), (writes) => {
      const a = tracker('a');
      a.adopt(1, ALL, [], ALL, [], 0);
      a.adopt(2, ['a', 'b'], [], ALL, [], 0);
      const expected = new Set<number>();
      for (const [offset, length, own] of writes) {
        const lengthBytes = Math.min(length, SIZE - offset);
        a.noteWrite(offset, lengthBytes, own);
        for (let chunk = Math.floor(offset / CHUNK); chunk <= Math.floor((offset + lengthBytes - 1) / CHUNK); chunk++) expected.add(chunk);
      }
      const decoded = DirtyRegionTracker.decode(a.encode(), { self: 'a', sizeBytes: SIZE, chunkBytes: CHUNK });
      assert.deepEqual(chunksOf(decoded.answer('r', 0)), [...expected].sort((x, y) => x - y));
    }),
  );
});
