// Proves the PRNG is xoshiro128** (reference vector), reproducible from a seed, unbiased enough
// for fault injection, and that fork() streams are independent of the parent's position.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng } from './prng.js';

function draws(prng: Prng, count: number): number[] {
  return Array.from({ length: count }, () => prng.uint32());
}

test('the generator matches the xoshiro128** reference output for state {1, 2, 3, 4}', () => {
  // From the reference C implementation (prng.di.unimi.it/xoshiro128starstar.c).
  assert.deepEqual(draws(Prng.fromState([1, 2, 3, 4]), 6), [11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
});

test('a seed always gives the same stream (pinned, so a change to seeding breaks every recorded seed loudly)', () => {
  assert.deepEqual(draws(new Prng(1), 4), [2809901157, 529440302, 3676262363, 311134450]);
  assert.deepEqual(draws(new Prng(12345), 100), draws(new Prng(12345), 100));
  assert.notDeepEqual(draws(new Prng(1), 8), draws(new Prng(2), 8));
  // Both 32-bit halves of a seed count.
  assert.notDeepEqual(draws(new Prng(5), 8), draws(new Prng(2 ** 32 + 5), 8));
  assert.equal(new Prng(2 ** 40 + 5).uint32(), 4054409722);
});

test('invalid seeds and the all-zero state are refused', () => {
  assert.throws(() => new Prng(-1), /seed/);
  assert.throws(() => new Prng(1.5), /seed/);
  assert.throws(() => new Prng(2 ** 53), /seed/);
  assert.throws(() => Prng.fromState([0, 0, 0, 0]), /all-zero/);
});

test('int(min, max) covers both bounds, stays in range and is roughly uniform', () => {
  const prng = new Prng(7);
  const counts = new Array<number>(10).fill(0);
  const samples = 100_000;
  for (let index = 0; index < samples; index++) {
    const value = prng.int(0, 9);
    assert.ok(Number.isInteger(value) && value >= 0 && value <= 9);
    counts[value]!++;
  }
  // Chi-square with 9 degrees of freedom: 27.9 is the 0.1% critical value.
  const expected = samples / 10;
  const chiSquare = counts.reduce((sum, count) => sum + (count - expected) ** 2 / expected, 0);
  assert.ok(chiSquare < 27.9, `chi-square ${chiSquare} for ${counts.join(',')}`);
  assert.equal(prng.int(5, 5), 5);
  for (let index = 0; index < 1000; index++) {
    const value = prng.int(-3, 3);
    assert.ok(value >= -3 && value <= 3);
  }
});

test('int() handles ranges wider than 32 bits and refuses bad bounds', () => {
  const prng = new Prng(3);
  let sawHigh = false;
  for (let index = 0; index < 1000; index++) {
    const value = prng.int(0, 2 ** 40);
    assert.ok(Number.isSafeInteger(value) && value >= 0 && value <= 2 ** 40);
    if (value > 2 ** 32) sawHigh = true;
  }
  assert.ok(sawHigh, 'values above 2^32 occur');
  assert.equal(prng.int(0, 2 ** 32 - 1) >= 0, true);
  assert.throws(() => prng.int(2, 1), /min must not exceed max/);
  assert.throws(() => prng.int(0, 1.5), /safe integers/);
});

test('float() is in [0, 1) and chance() honours 0 and 1 exactly', () => {
  const prng = new Prng(11);
  let sum = 0;
  for (let index = 0; index < 10_000; index++) {
    const value = prng.float();
    assert.ok(value >= 0 && value < 1);
    sum += value;
  }
  assert.ok(Math.abs(sum / 10_000 - 0.5) < 0.02);
  for (let index = 0; index < 1000; index++) {
    assert.equal(prng.chance(0), false);
    assert.equal(prng.chance(1), true);
  }
  let hits = 0;
  for (let index = 0; index < 10_000; index++) if (prng.chance(0.25)) hits++;
  assert.ok(hits > 2300 && hits < 2700, `${hits} hits for p=0.25`);
  assert.throws(() => prng.chance(1.5), /probability/);
});

test('pick() and shuffle() are deterministic; shuffle is a permutation', () => {
  const items = Array.from({ length: 50 }, (_, index) => index);
  const shuffled = new Prng(9).shuffle([...items]);
  assert.deepEqual(shuffled, new Prng(9).shuffle([...items]));
  assert.notDeepEqual(shuffled, items);
  assert.deepEqual([...shuffled].sort((a, b) => a - b), items);
  const prng = new Prng(9);
  const picked = new Set(Array.from({ length: 200 }, () => prng.pick(['a', 'b', 'c'])));
  assert.deepEqual([...picked].sort(), ['a', 'b', 'c']);
  assert.throws(() => prng.pick([]), /empty/);
});

test('fork(label) gives a stream that depends on the seed and label, not on draws made before', () => {
  const parent = new Prng(42);
  const early = draws(parent.fork('network'), 10);
  draws(parent, 1000);
  assert.deepEqual(draws(parent.fork('network'), 10), early, 'drawing from the parent does not shift its forks');
  assert.notDeepEqual(draws(parent.fork('disk'), 10), early);
  assert.notDeepEqual(draws(new Prng(43).fork('network'), 10), early);
  assert.notDeepEqual(draws(parent, 10), early, 'a fork is not the parent stream');
  const nested = parent.fork('disk').fork('n1');
  assert.equal(nested.label, 'disk/n1');
  assert.equal(nested.seed, 42);
  assert.notDeepEqual(draws(nested, 10), draws(parent.fork('disk').fork('n2'), 10));
  assert.throws(() => parent.fork(''), /empty/);
});

test('fill() writes deterministic bytes of every value', () => {
  const a = new Prng(5).fill(Buffer.alloc(4099));
  const b = new Prng(5).fill(Buffer.alloc(4099));
  assert.deepEqual(a, b);
  assert.ok(new Set(a).size > 250);
});
