// Proves the range lock: a request waits exactly for the earlier in-flight requests that
// overlap it (half-open ranges), in arrival order, and never for disjoint ones.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RangeLock } from './range-lock.js';

test('disjoint and touching ranges do not wait; overlapping ones wait for every earlier holder', async () => {
  const lock = new RangeLock();
  const a = lock.acquire(0, 100);
  const b = lock.acquire(100, 200); // touches a, does not overlap
  assert.equal(a.ready, undefined);
  assert.equal(b.ready, undefined);
  const c = lock.acquire(50, 150); // overlaps both
  const d = lock.acquire(140, 160); // overlaps b and c
  const order: string[] = [];
  void c.ready!.then(() => order.push('c'));
  void d.ready!.then(() => order.push('d'));
  a.release();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(order, [], 'c still waits for b');
  b.release();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(order, ['c']);
  c.release();
  c.release(); // idempotent
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(order, ['c', 'd']);
  d.release();
  assert.equal(lock.size, 0);
});
