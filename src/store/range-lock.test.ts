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

test('overlapping() waits for the overlapping holders registered before it, registers nothing', async () => {
  const lock = new RangeLock();
  assert.equal(lock.overlapping(0, 10), undefined);
  const a = lock.acquire(0, 100);
  const b = lock.acquire(200, 300);
  const wait = lock.overlapping(50, 250)!;
  assert.equal(lock.overlapping(100, 200), undefined, 'touching ranges do not overlap');
  assert.equal(lock.size, 2, 'a waiter is not a holder');
  const later = lock.acquire(60, 70); // registered after the wait: not waited for
  let settled = false;
  void wait.then(() => (settled = true));
  a.release();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(settled, false, 'still waits for b');
  b.release();
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(settled, true, 'does not wait for the later holder');
  later.release();
});
