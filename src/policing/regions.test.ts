// Proves the region math: region sizes are validated (power of two, at least 4 KiB), a byte range maps to exactly the ascending regions it touches, and one region covers the volume in single-writer mode.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isMirrorsanError } from '../errors.js';
import { REGION_SIZE_MIN_BYTES, isAscendingRegions, regionCount, regionsOf, validateRegionSize } from './regions.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('region sizes: powers of two from 4 KiB are accepted, anything else is CONFIG_INVALID', () => {
  for (const size of [REGION_SIZE_MIN_BYTES, 8 * KiB, MiB, 4 * 1024 * MiB, 2 ** 40]) validateRegionSize(size);
  for (const size of [0, -4096, 2048, 4097, 6144, 3 * MiB, 4096.5, Number.NaN, 2 ** 60]) {
    assert.throws(() => validateRegionSize(size), (error: unknown) => isMirrorsanError(error, 'CONFIG_INVALID'), `size ${size}`);
  }
});

test('regionsOf: a range maps to the ascending regions it touches, boundaries exact', () => {
  const size = 4 * KiB;
  assert.deepEqual(regionsOf(0, 1, size), [0]);
  assert.deepEqual(regionsOf(0, size, size), [0]);
  assert.deepEqual(regionsOf(0, size + 1, size), [0, 1]);
  assert.deepEqual(regionsOf(size - 1, 2, size), [0, 1]);
  assert.deepEqual(regionsOf(size, size, size), [1]);
  assert.deepEqual(regionsOf(3 * size + 5, 2 * size, size), [3, 4, 5]);
  assert.throws(() => regionsOf(0, 0, size), /length/);
  assert.throws(() => regionsOf(-1, 1, size), /offset/);
  assert.throws(() => regionsOf(0, 10 * size, size, 4), /more than 4/);
});

test('regionsOf agrees with a byte-by-byte model on random ranges', () => {
  fc.assert(
    fc.property(fc.integer({ min: 12, max: 20 }), fc.integer({ min: 0, max: 1 << 22 }), fc.integer({ min: 1, max: 1 << 21 }), (shift, offset, length) => {
      const size = 2 ** shift;
      const regions = regionsOf(offset, length, size, 1 << 12);
      assert.ok(isAscendingRegions(regions));
      assert.equal(regions[0], Math.floor(offset / size));
      assert.equal(regions[regions.length - 1], Math.floor((offset + length - 1) / size));
      regions.forEach((region, index) => assert.equal(region, regions[0]! + index));
    }),
  );
});

test('regionCount rounds up, and single-writer mode is one region for the whole volume', () => {
  assert.equal(regionCount(10 * MiB, MiB), 10);
  assert.equal(regionCount(10 * MiB + 1, MiB), 11);
  assert.equal(regionCount(10 * MiB, 16 * MiB), 1);
  assert.deepEqual(regionsOf(0, 10 * MiB, 16 * MiB), [0]);
  assert.deepEqual(regionsOf(10 * MiB - 1, 1, 16 * MiB), [0]);
});

test('isAscendingRegions wants strictly ascending non-negative integers, at least one', () => {
  assert.ok(isAscendingRegions([0]));
  assert.ok(isAscendingRegions([1, 2, 7]));
  assert.ok(!isAscendingRegions([]));
  assert.ok(!isAscendingRegions([2, 1]));
  assert.ok(!isAscendingRegions([1, 1]));
  assert.ok(!isAscendingRegions([-1]));
  assert.ok(!isAscendingRegions([0.5]));
});
