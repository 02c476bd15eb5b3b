// Proves that the supersede index reports exactly the blocks no newer direct write covers, against a naive per-block model.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { SupersedeIndex } from './supersede-index.js';

test('an empty index leaves every block live', () => {
  assert.deepEqual(new SupersedeIndex().liveRuns(1, 10, 20), [{ firstBlock: 10, blockCount: 10 }]);
});

test('a newer direct write hides older entries, an older one does not', () => {
  const index = new SupersedeIndex();
  index.add(5, 300, 10); // spans chunk boundary 256? no: 300..310
  index.add(7, 250, 10); // crosses the chunk boundary at 256
  assert.deepEqual(index.liveRuns(4, 245, 315), [
    { firstBlock: 245, blockCount: 5 },
    { firstBlock: 260, blockCount: 40 },
    { firstBlock: 310, blockCount: 5 },
  ]);
  assert.deepEqual(index.liveRuns(6, 295, 312), [{ firstBlock: 295, blockCount: 17 }]);
  assert.equal(index.newestDirect(255), 7);
  assert.equal(index.newestDirect(1000), 0);
});

test('matches a per-block model', () => {
  fc.assert(
    fc.property(
      fc.array(fc.record({ seq: fc.integer({ min: 1, max: 50 }), first: fc.integer({ min: 0, max: 600 }), count: fc.integer({ min: 1, max: 40 })}), { maxLength: 20 }),
      fc.integer({ min: 0, max: 50 }),
      fc.integer({ min: 0, max: 600 }),
      fc.integer({ min: 1, max: 100 }),
      (adds, seq, first, count) => {
        const index = new SupersedeIndex();
        const model = new Map<number, number>();
        for (const add of adds) {
          index.add(add.seq, add.first, add.count);
          for (let b = add.first; b < add.first + add.count; b++) model.set(b, Math.max(model.get(b) ?? 0, add.seq));
        }
        const live: number[] = [];
        for (const run of index.liveRuns(seq, first, first + count)) {
          for (let b = run.firstBlock; b < run.firstBlock + run.blockCount; b++) live.push(b);
        }
        const expected: number[] = [];
        for (let b = first; b < first + count; b++) if ((model.get(b) ?? 0) <= seq) expected.push(b);
        assert.deepEqual(live, expected);
      },
    ),
  );
});
