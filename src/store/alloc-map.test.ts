// Proves the allocation map against a naive boolean-array model (fast-check): set/clear
// ranges, counts, runs merging and exact coverage, and serialization with its CRC.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isMirrorsanError } from '../errors.js';
import { AllocationMap, type BlockRun } from './alloc-map.js';

function modelRuns(model: readonly boolean[], first: number, count: number): BlockRun[] {
  const runs: BlockRun[] = [];
  for (let block = first; block < first + count; block++) {
    const last = runs[runs.length - 1];
    if (last && last.allocated === model[block]) last.blockCount++;
    else runs.push({ firstBlock: block, blockCount: 1, allocated: model[block]! });
  }
  return runs;
}

test('set and clear ranges across byte boundaries, with counts', () => {
  const map = new AllocationMap(100, 4096);
  assert.equal(map.setRange(3, 20), 20);
  assert.equal(map.setRange(0, 10), 3);
  assert.equal(map.allocatedBlocks, 23);
  assert.equal(map.clearRange(5, 2), 2);
  assert.deepEqual(map.runs(0, 30), [
    { firstBlock: 0, blockCount: 5, allocated: true },
    { firstBlock: 5, blockCount: 2, allocated: false },
    { firstBlock: 7, blockCount: 16, allocated: true },
    { firstBlock: 23, blockCount: 7, allocated: false },
  ]);
  assert.equal(map.allAllocated(7, 16), true);
  assert.equal(map.allAllocated(6, 2), false);
  assert.equal(map.noneAllocated(23, 77), true);
  assert.deepEqual(map.runs(0, 30, 2).length, 2);
});

test('fast-check: the map behaves like an array of booleans', () => {
  const blockCount = 301;
  const op = fc.record({
    set: fc.boolean(),
    first: fc.integer({ min: 0, max: blockCount - 1 }),
    count: fc.integer({ min: 0, max: 120 }),
  });
  fc.assert(
    fc.property(fc.array(op, { maxLength: 40 }), fc.integer({ min: 0, max: blockCount - 1 }), fc.integer({ min: 0, max: blockCount }), (ops, qFirst, qCount) => {
      const map = new AllocationMap(blockCount, 512);
      const model: boolean[] = new Array<boolean>(blockCount).fill(false);
      for (const { set, first, count } of ops) {
        const n = Math.min(count, blockCount - first);
        const before = model.slice(first, first + n).filter((b) => b === set).length;
        const changed = set ? map.setRange(first, n) : map.clearRange(first, n);
        assert.equal(changed, n - before);
        for (let i = first; i < first + n; i++) model[i] = set;
        assert.equal(map.allocatedBlocks, model.filter(Boolean).length);
      }
      const count = Math.min(qCount, blockCount - qFirst);
      assert.deepEqual(map.runs(qFirst, count), modelRuns(model, qFirst, count));
      const slice = model.slice(qFirst, qFirst + count);
      assert.equal(map.allAllocated(qFirst, count), slice.every(Boolean));
      assert.equal(map.noneAllocated(qFirst, count), !slice.some(Boolean));
      for (let i = 0; i < blockCount; i++) assert.equal(map.isAllocated(i), model[i]);
      const { map: copy, sequence } = AllocationMap.deserialize(map.serialize(77));
      assert.equal(sequence, 77);
      assert.deepEqual(copy.runs(0, blockCount), modelRuns(model, 0, blockCount));
      assert.equal(copy.allocatedBlocks, map.allocatedBlocks);
    }),
    { numRuns: 400 },
  );
});

test('a damaged serialized map is refused with STORE_IO', () => {
  const map = new AllocationMap(1000, 4096);
  map.setRange(10, 500);
  const good = map.serialize(5);
  for (const at of [0, 8, 20, 30, 40, good.length - 1]) {
    const bad = Buffer.from(good);
    bad[at] = bad[at]! ^ 0x10;
    assert.throws(() => AllocationMap.deserialize(bad), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
  }
  assert.throws(() => AllocationMap.deserialize(good.subarray(0, 39)), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
  assert.throws(() => AllocationMap.deserialize(good.subarray(0, good.length - 1)), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
});

test('runs over a large sparse map stay cheap', () => {
  const blocks = 64 * 1024 * 1024; // 256 GiB at 4 KiB: an 8 MiB bitmap
  const map = new AllocationMap(blocks, 4096);
  map.setRange(blocks - 5, 5);
  const started = performance.now();
  const runs = map.runs(0, blocks);
  assert.deepEqual(runs, [
    { firstBlock: 0, blockCount: blocks - 5, allocated: false },
    { firstBlock: blocks - 5, blockCount: 5, allocated: true },
  ]);
  assert.ok(performance.now() - started < 1000, 'a whole-map scan should take well under a second');
});
