// Proves the scheduler's contract: time order, insertion order at equal times, cancellation,
// runs to a time or a predicate, loud failures with the seed (runaway, stall, deadline, a
// throwing event), and that promise continuations run before the next event.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Scheduler, realTimers } from './scheduler.js';
import { SimulationError, Trace } from './trace.js';

test('events run in time order, and in insertion order at the same millisecond', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const order: string[] = [];
  scheduler.at(20, () => order.push('c@20'));
  scheduler.at(10, () => order.push('a@10'));
  scheduler.at(10, () => order.push('b@10'));
  scheduler.after(0, () => order.push('z@0'));
  scheduler.at(15, () => {
    order.push('x@15');
    // Scheduled now for the same millisecond: runs after everything already queued for it.
    scheduler.after(0, () => order.push('y@15'));
  });
  scheduler.at(15, () => order.push('w@15'));
  const result = scheduler.runUntilSync(100);
  assert.deepEqual(order, ['z@0', 'a@10', 'b@10', 'x@15', 'w@15', 'y@15', 'c@20']);
  assert.deepEqual(result, { reached: true, steps: 7, nowMs: 100 });
  assert.equal(scheduler.nowMs(), 100);
  assert.equal(scheduler.steps, 7);
});

test('the clock moves only to event times; events see their own time', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const seen: number[] = [];
  scheduler.at(7, () => seen.push(scheduler.nowMs()));
  scheduler.at(3, () => seen.push(scheduler.nowMs()));
  scheduler.runUntilSync(5);
  assert.deepEqual(seen, [3]);
  assert.equal(scheduler.nowMs(), 5);
  scheduler.runUntilSync(5);
  assert.equal(scheduler.pendingEvents, 1);
  scheduler.runUntilSync(50);
  assert.deepEqual(seen, [3, 7]);
});

test('bad times are refused', () => {
  const scheduler = new Scheduler({ seed: 1 });
  scheduler.runUntilSync(10);
  assert.throws(() => scheduler.at(5, () => {}), /in the past/);
  assert.throws(() => scheduler.after(1.5, () => {}), /integer/);
  assert.throws(() => scheduler.after(-1, () => {}), /non-negative/);
  assert.throws(() => scheduler.runUntilSync(3), /now is 10/);
});

test('cancelled events never run; cancelling twice or after running does nothing', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const ran: string[] = [];
  const a = scheduler.at(5, () => ran.push('a'));
  const b = scheduler.at(6, () => ran.push('b'));
  assert.equal(scheduler.pendingEvents, 2);
  a.cancel();
  a.cancel();
  assert.equal(scheduler.pendingEvents, 1);
  assert.equal(a.pending, false);
  scheduler.runUntilSync(10);
  b.cancel();
  assert.deepEqual(ran, ['b']);
  assert.equal(scheduler.pendingEvents, 0);
  assert.equal(scheduler.step(), false);
});

test('runUntil(predicate) stops as soon as the predicate holds', async () => {
  const scheduler = new Scheduler({ seed: 1 });
  let count = 0;
  const tick = (): void => {
    count++;
    scheduler.after(10, tick);
  };
  scheduler.after(10, tick);
  const result = await scheduler.runUntil(() => count === 5, { stepsMax: 100 });
  assert.deepEqual(result, { reached: true, steps: 5, nowMs: 50 });
});

test('a runaway simulation fails with its seed once stepsMax events ran', async () => {
  const scheduler = new Scheduler({ seed: 4242 });
  const spin = (): void => {
    scheduler.after(1, spin);
  };
  scheduler.after(1, spin);
  await assert.rejects(scheduler.runUntil(() => false, { stepsMax: 1000 }), (error: unknown) => {
    assert.ok(error instanceof SimulationError);
    assert.match(error.message, /runaway simulation: 1000 steps/);
    assert.match(error.message, /seed=4242/);
    assert.equal(error.seed, 4242);
    return true;
  });
  assert.throws(() => scheduler.runUntilSync(1_000_000, { stepsMax: 10 }), /runaway/);
});

test('a stalled predicate run fails (or returns when asked); a missed deadline fails', async () => {
  const scheduler = new Scheduler({ seed: 8 });
  scheduler.after(5, () => {});
  await assert.rejects(scheduler.runUntil(() => false), /stalled.*seed=8/);
  assert.deepEqual(await scheduler.runUntil(() => false, { onIdle: 'return' }), { reached: false, steps: 0, nowMs: 5 });
  scheduler.after(100, () => {});
  await assert.rejects(scheduler.runUntil(() => false, { deadlineMs: 50 }), /missed its deadline.*50 ms/);
});

test('an exception inside an event fails the run with the seed, the time and the trace tail', () => {
  const trace = new Trace();
  const scheduler = new Scheduler({ seed: 77, trace });
  scheduler.at(3, () => scheduler.log('before the failure'));
  scheduler.at(9, () => {
    throw new Error('invariant broken');
  }, 'checker');
  assert.throws(
    () => scheduler.runUntilSync(20),
    (error: unknown) => {
      assert.ok(error instanceof SimulationError);
      assert.match(error.message, /event "checker" threw at 9 ms \(seed=77\): invariant broken/);
      assert.equal(error.nowMs, 9);
      assert.deepEqual(error.traceTail, ['3ms before the failure']);
      assert.ok(error.cause instanceof Error);
      return true;
    },
  );
});

test('runUntil lets promise continuations run before the next event, at the same simulated time', async () => {
  const run = async (sync: boolean): Promise<string[]> => {
    const scheduler = new Scheduler({ seed: 1 });
    const order: string[] = [];
    let resolve!: () => void;
    const settled = new Promise<void>((done) => (resolve = done));
    void (async () => {
      await settled;
      order.push(`continuation@${scheduler.nowMs()}`);
      await null; // a chain of continuations, not just one
      order.push(`second continuation@${scheduler.nowMs()}`);
    })();
    scheduler.at(10, () => resolve());
    scheduler.at(10, () => order.push('next event@10'));
    scheduler.at(12, () => order.push('later event@12'));
    if (sync) scheduler.runUntilSync(20);
    else await scheduler.runUntil(20);
    await new Promise((done) => setImmediate(done));
    return order;
  };
  assert.deepEqual(await run(false), ['continuation@10', 'second continuation@10', 'next event@10', 'later event@12']);
  // Without yielding, continuations run only after the whole run: why runUntil is async.
  assert.deepEqual(await run(true), ['next event@10', 'later event@12', 'continuation@20', 'second continuation@20']);
});

test('the trace keeps only its last lines, oldest first', () => {
  const trace = new Trace({ capacityLines: 3, echo: false });
  for (let index = 1; index <= 5; index++) trace.add(`line ${index}`);
  assert.deepEqual(trace.tail(), ['line 3', 'line 4', 'line 5']);
  assert.deepEqual(trace.tail(2), ['line 4', 'line 5']);
  assert.equal(trace.totalLines, 5);
  const off = new Trace({ enabled: false });
  off.add('ignored');
  assert.deepEqual(off.tail(), []);
});

test('realTimers is a monotonic integer clock with working timers', async () => {
  const start = realTimers.nowMs();
  assert.ok(Number.isInteger(start));
  await new Promise<void>((resolve) => realTimers.after(5, resolve));
  assert.ok(realTimers.nowMs() >= start + 4);
  let fired = false;
  realTimers.after(1, () => (fired = true)).cancel();
  await new Promise((resolve) => setTimeout(resolve, 10));
  assert.equal(fired, false);
});

test('pending events are bounded, and cancelled events do not accumulate or disturb the order', () => {
  const scheduler = new Scheduler({ seed: 5, pendingEventsMax: 100 });
  for (let index = 0; index < 100; index++) scheduler.after(1, () => {});
  assert.throws(() => scheduler.after(1, () => {}), /runaway simulation: 100 events pending \(seed=5/);
  const busy = new Scheduler({ seed: 6, pendingEventsMax: 2000 });
  const order: number[] = [];
  // Far more cancelled events than the bound: they must not count, and compaction keeps order.
  for (let round = 0; round < 50; round++) {
    for (let index = 0; index < 1000; index++) busy.after(5 + (index % 7), () => order.push(-1)).cancel();
    busy.at(round, () => order.push(round));
  }
  busy.runUntilSync(100);
  assert.deepEqual(order, Array.from({ length: 50 }, (_, index) => index));
});
