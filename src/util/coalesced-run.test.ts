// Proves that CoalescedRun serves every caller with a run that started after its call, and shares runs among callers that wait together.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CoalescedRun } from './coalesced-run.js';

test('callers during a run share exactly one following run', async () => {
  const started: number[] = [];
  let release!: () => void;
  let counter = 0;
  const runner = new CoalescedRun(async () => {
    started.push(++counter);
    await new Promise<void>((resolve) => (release = resolve));
  });
  const first = runner.run();
  const waiting = [runner.run(), runner.run(), runner.run()];
  assert.equal(runner.runCount, 1);
  release();
  await first;
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(runner.runCount, 2, 'the three waiting callers share one run');
  release();
  await Promise.all(waiting);
  assert.deepEqual(started, [1, 2]);
});

test('a failed run rejects its callers and the next run still happens', async () => {
  let fail = true;
  const runner = new CoalescedRun(async () => {
    await new Promise((resolve) => setImmediate(resolve));
    if (fail) throw new Error('EIO');
  });
  const first = runner.run();
  const second = runner.run();
  await assert.rejects(first, /EIO/);
  fail = false;
  await second;
  assert.equal(runner.runCount, 2);
});
