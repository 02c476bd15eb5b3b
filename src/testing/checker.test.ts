// Proves the checkers on hand-made histories, passing and failing, and the linearizability
// checker against a brute-force search over every order on thousands of random small histories.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  BlockHistory,
  assertCheck,
  checkBlockLinearizable,
  checkDurability,
  checkReplicasConverged,
  firstDifference,
  type ReadRecord,
  type WriteRecord,
} from './checker.js';
import { Scheduler } from './scheduler.js';
import { InvariantViolation } from './trace.js';

const w = (value: number, invokeMs: number, ackMs?: number, block = 0): WriteRecord => ({ block, value, invokeMs, ackMs });
const r = (value: number, invokeMs: number, responseMs: number, block = 0): ReadRecord => ({ block, value, invokeMs, responseMs });

function verdict(writes: WriteRecord[], reads: ReadRecord[]): string {
  const result = checkBlockLinearizable({ writes, reads, initialValue: 0 });
  return result.ok ? 'ok' : result.message;
}

test('sequential and concurrent histories that an atomic register could produce pass', () => {
  assert.equal(verdict([], []), 'ok');
  assert.equal(verdict([w(1, 0, 5), w(2, 10, 15)], [r(0, -5, -1), r(1, 6, 8), r(2, 16, 18)]), 'ok');
  // A read concurrent with a write may see either value, and two concurrent reads may disagree.
  assert.equal(verdict([w(1, 0, 5), w(2, 10, 20)], [r(1, 12, 14), r(2, 13, 15)]), 'ok');
  // Touching times are concurrent: a read invoked in the millisecond a write was acknowledged may miss it.
  assert.equal(verdict([w(1, 0, 5), w(2, 5, 9)], [r(1, 9, 12)]), 'ok');
  // A write never acknowledged may take effect, late, or never.
  assert.equal(verdict([w(1, 0, 5), w(2, 6)], [r(2, 100, 101), r(2, 200, 201)]), 'ok');
  assert.equal(verdict([w(1, 0, 5), w(2, 6)], [r(1, 100, 101)]), 'ok');
  // Blocks are independent registers.
  assert.equal(verdict([w(1, 0, 5, 0), w(2, 0, 5, 1)], [r(1, 10, 11, 0), r(2, 10, 11, 1), r(0, -3, -2, 1)]), 'ok');
});

test('a stale read is caught and explained', () => {
  const message = verdict([w(1, 0, 5), w(2, 10, 15)], [r(1, 20, 21)]);
  assert.match(message, /stale: write 1 .* replaced by write 2 \(invoked at 10, acknowledged at 15\)/);
  // Reading the initial value after an acknowledged write: the write was lost (I1).
  assert.match(verdict([w(1, 0, 5)], [r(0, 10, 11)]), /stale: the initial value 0/);
});

test('a read of a value from the future, or of a value nobody wrote, is caught', () => {
  assert.match(verdict([w(1, 10, 15)], [r(1, 2, 5)]), /began only after the read returned/);
  assert.match(verdict([w(1, 0, 5)], [r(99, 10, 11)]), /no write produced that value/);
});

test('reads that go back in time are caught even when each read alone looks fine', () => {
  // Writes 1 and 2 overlap, so either order is possible, but not both: reads saw 2, then 1, then 2 again.
  assert.equal(verdict([w(1, 0, 50), w(2, 0, 50)], [r(2, 10, 11), r(1, 20, 21)]), 'ok', 'order 2, 1 explains two reads');
  const message = verdict([w(1, 0, 50), w(2, 0, 50)], [r(2, 10, 11), r(1, 20, 21), r(2, 30, 31)]);
  assert.match(message, /no single order of writes explains the reads|went back in time/);
  // An unacknowledged write observed, then the older value observed again: the write vanished.
  assert.match(verdict([w(1, 0, 5), w(2, 6)], [r(2, 10, 11), r(1, 20, 21)]), /went back in time|no single order/);
});

test('duplicate written values are a usage error, not a verdict', () => {
  assert.throws(() => verdict([w(1, 0, 5), w(1, 6, 7)], []), /unique/);
  assert.throws(() => verdict([w(0, 0, 5)], []), /unique/);
});

/** Exhaustive search for a legal order: the specification the zone checker must match. */
function bruteForce(writes: WriteRecord[], reads: ReadRecord[]): boolean {
  type Op = { kind: 'w' | 'r'; value: number; invokeMs: number; responseMs: number; optional: boolean };
  const ops: Op[] = [
    ...writes.map((write) => ({ kind: 'w' as const, value: Number(write.value), invokeMs: write.invokeMs, responseMs: write.ackMs ?? Infinity, optional: write.ackMs === undefined })),
    ...reads.map((read) => ({ kind: 'r' as const, value: Number(read.value), invokeMs: read.invokeMs, responseMs: read.responseMs, optional: false })),
  ];
  const placed = new Array<boolean>(ops.length).fill(false);
  const search = (current: number, remaining: number): boolean => {
    if (ops.every((op, index) => placed[index] || op.optional)) return true;
    if (remaining === 0) return false;
    for (let index = 0; index < ops.length; index++) {
      if (placed[index]) continue;
      const op = ops[index]!;
      // Only an operation that no unplaced operation precedes may go next.
      if (ops.some((other, otherIndex) => !placed[otherIndex] && otherIndex !== index && other.responseMs < op.invokeMs)) continue;
      if (op.kind === 'r' && op.value !== current) continue;
      placed[index] = true;
      const found = search(op.kind === 'w' ? op.value : current, remaining - 1);
      placed[index] = false;
      if (found) return true;
    }
    return false;
  };
  return search(0, ops.length);
}

test('the zone checker agrees with brute force on random small histories', () => {
  const operation = fc.record({
    isWrite: fc.boolean(),
    invokeMs: fc.integer({ min: 0, max: 20 }),
    durationMs: fc.integer({ min: 0, max: 8 }),
    acknowledged: fc.integer({ min: 0, max: 4 }).map((value) => value > 0),
    readChoice: fc.nat(),
  });
  let linearizable = 0;
  let notLinearizable = 0;
  fc.assert(
    fc.property(fc.array(operation, { minLength: 1, maxLength: 7 }), (generated) => {
      const writes: WriteRecord[] = [];
      const reads: ReadRecord[] = [];
      for (const op of generated) {
        if (op.isWrite) writes.push(w(writes.length + 1, op.invokeMs, op.acknowledged ? op.invokeMs + op.durationMs : undefined));
      }
      for (const op of generated) {
        if (!op.isWrite) reads.push(r(op.readChoice % (writes.length + 1), op.invokeMs, op.invokeMs + op.durationMs));
      }
      const expected = bruteForce(writes, reads);
      const actual = checkBlockLinearizable({ writes, reads, initialValue: 0 }).ok;
      if (expected) linearizable++;
      else notLinearizable++;
      assert.equal(actual, expected, `writes ${JSON.stringify(writes)} reads ${JSON.stringify(reads)}`);
    }),
    { seed: 20240611, numRuns: 4000 },
  );
  assert.ok(linearizable > 500 && notLinearizable > 500, `${linearizable} linearizable, ${notLinearizable} not: both verdicts exercised`);
});

test('replica convergence reports the first differing offset, or a length difference', () => {
  const a = Buffer.alloc(10_000, 1);
  assert.deepEqual(checkReplicasConverged([{ name: 'n1', bytes: a }, { name: 'n2', bytes: Buffer.from(a) }]), { ok: true });
  assert.deepEqual(checkReplicasConverged([{ name: 'n1', bytes: a }]), { ok: true });
  assert.deepEqual(checkReplicasConverged([]), { ok: true });
  const b = Buffer.from(a);
  b[5000] = 2;
  const differing = checkReplicasConverged([{ name: 'n1', bytes: a }, { name: 'n2', bytes: Buffer.from(a) }, { name: 'n3', bytes: b }]);
  assert.equal(differing.ok, false);
  assert.match(!differing.ok ? differing.message : '', /n1 and n3 differ at offset 5000/);
  assert.equal(!differing.ok && differing.invariant, 'I4');
  assert.equal(firstDifference(a, a.subarray(0, 9000)), 9000);
  assert.equal(firstDifference(a, b), 5000);
  assert.equal(firstDifference(new Uint8Array([1, 2]), new Uint8Array([1, 3])), 1);
  assert.equal(firstDifference(new Uint8Array(0), new Uint8Array(0)), undefined);
  assert.throws(() => assertCheck(differing), (error: unknown) => error instanceof InvariantViolation && error.invariant === 'I4');
});

test('durability: acknowledged FUA writes and writes covered by a completed flush must read back', () => {
  const crashMs = 100;
  const check = (writes: WriteRecord[], flushes: { invokeMs: number; ackMs?: number }[], readBack: Array<[number, number]>) => {
    const result = checkDurability({ writes, flushes, crashMs, readBack: new Map(readBack) });
    return result.ok ? 'ok' : result.message;
  };
  const fua = (value: number, invokeMs: number, ackMs?: number): WriteRecord => ({ ...w(value, invokeMs, ackMs), fua: true });
  assert.equal(check([fua(1, 0, 5), fua(2, 10, 15)], [], [[0, 2]]), 'ok');
  assert.match(check([fua(1, 0, 5), fua(2, 10, 15)], [], [[0, 1]]), /durable write 2 .* is newer: an acknowledged write was lost/);
  // A plain write needs a flush invoked after its acknowledgement and acknowledged before the crash.
  assert.equal(check([w(1, 0, 5), w(2, 10, 15)], [], [[0, 0]]), 'ok');
  assert.match(check([w(1, 0, 5), w(2, 10, 15)], [{ invokeMs: 20, ackMs: 30 }], [[0, 1]]), /lost/);
  assert.equal(check([w(1, 0, 5), w(2, 10, 15)], [{ invokeMs: 12, ackMs: 30 }], [[0, 1]]), 'ok', 'write 2 finished after the flush began');
  assert.equal(check([w(1, 0, 5), w(2, 10, 15)], [{ invokeMs: 20 }], [[0, 1]]), 'ok', 'an unacknowledged flush promises nothing');
  assert.equal(check([w(1, 0, 5), w(2, 10, 15)], [{ invokeMs: 20, ackMs: 120 }], [[0, 1]]), 'ok', 'acknowledged only after the crash');
  // Unsynced writes may survive too, as may writes whose outcome is unknown.
  assert.equal(check([fua(1, 0, 5), w(2, 10, 15), fua(3, 20)], [], [[0, 3]]), 'ok');
  assert.match(check([fua(1, 0, 5), fua(3, 150)], [], [[0, 3]]), /invoked after the crash/);
  assert.match(check([fua(1, 0, 5)], [], [[0, 7]]), /no write produced/);
  assert.match(check([fua(1, 0, 5)], [], []), /was not read back/);
  assert.match(check([fua(1, 0, 5)], [], [[0, 0]]), /lost/);
});

test('BlockHistory records with the simulated clock and feeds both checkers', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const history = new BlockHistory(scheduler);
  const first = history.writeInvoked(0, 11, { fua: true });
  const refused = history.writeInvoked(0, 99);
  scheduler.runUntilSync(5);
  history.writeAcknowledged(first);
  history.writeFailed(refused);
  const read = history.readInvoked(0);
  scheduler.runUntilSync(7);
  history.readReturned(read, 11);
  const flush = history.flushInvoked();
  history.flushAcknowledged(flush);
  assert.deepEqual(history.writes, [{ block: 0, value: 11, invokeMs: 0, ackMs: 5, fua: true }]);
  assert.deepEqual(history.reads, [{ block: 0, value: 11, invokeMs: 5, responseMs: 7 }]);
  assert.deepEqual(history.checkLinearizable(), { ok: true });
  assert.deepEqual(history.checkDurableAfterCrash(10, new Map([[0, 11]])), { ok: true });
  assert.equal(history.checkDurableAfterCrash(10, new Map([[0, 0]])).ok, false);
  assert.throws(() => history.writeAcknowledged(first), /not pending/);
  const stale = history.readInvoked(0);
  scheduler.runUntilSync(9);
  history.readReturned(stale, 0);
  assert.equal(history.checkLinearizable().ok, false);
});
