// Proves the pure parts both coordinator backends share: the watch filter (epoch order, no
// regressions, deletes and new incarnations announced), the record invariants, and the lease
// session's one-way rule (a lease whose validity ran out never comes back).
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, mock, test } from 'node:test';
import { RecordWatchFilter, assertCasArguments, volumeRecordProblem } from './coordinator.js';
import type { LeaseLostReason, VolumeRecord } from './coordinator.js';
import { LeaseKeeper, renewIntervalMs, safetyMarginMs } from './session.js';
import type { RenewResult } from './session.js';
import { createMemoryLogger } from '../util/log.js';

const record = (epoch: number): VolumeRecord => ({ epoch, replicas: ['a', 'b'], inSync: ['a'], updatedAtMs: 0 });
const epochs = (values: Array<VolumeRecord | undefined>) => values.map((v) => v?.epoch);

describe('RecordWatchFilter', () => {
  test('delivers the first observation, then only newer epochs of the same incarnation', () => {
    const filter = new RecordWatchFilter();
    assert.deepEqual(epochs(filter.offer('i1', record(3))), [3]);
    assert.deepEqual(epochs(filter.offer('i1', record(3))), [], 'a duplicate is dropped');
    assert.deepEqual(epochs(filter.offer('i1', record(2))), [], 'an older epoch is dropped');
    assert.deepEqual(epochs(filter.offer('i1', record(5))), [5], 'a gap is delivered as is');
  });

  test('announces a delete once, and a new incarnation even when the delete was missed', () => {
    const filter = new RecordWatchFilter();
    assert.deepEqual(epochs(filter.offer(undefined, undefined)), [undefined], 'no record yet: delivered once');
    assert.deepEqual(epochs(filter.offer(undefined, undefined)), []);
    assert.deepEqual(epochs(filter.offer('i1', record(1))), [1]);
    assert.deepEqual(epochs(filter.offer('i1', record(2))), [2]);
    assert.deepEqual(epochs(filter.offer(undefined, undefined)), [undefined]);
    assert.deepEqual(epochs(filter.offer('i2', record(1))), [1], 'after a delivered delete: just the new life');
    assert.deepEqual(epochs(filter.offer('i3', record(1))), [undefined, 1], 'a missed delete is announced');
  });
});

describe('record invariants', () => {
  test('epoch, in-sync subset, arbiter among the replicas', () => {
    assert.equal(volumeRecordProblem(record(1)), undefined);
    assert.match(volumeRecordProblem({ ...record(1), epoch: 0 }) ?? '', /epoch/);
    assert.match(volumeRecordProblem({ ...record(1), inSync: [] }) ?? '', /inSync/);
    assert.match(volumeRecordProblem({ ...record(1), inSync: ['c'] }) ?? '', /not a replica/);
    assert.match(volumeRecordProblem({ ...record(1), replicas: ['a', 'a'] }) ?? '', /distinct/);
    assert.match(volumeRecordProblem({ ...record(1), arbiter: 'z' }) ?? '', /arbiter/);
    assert.match(volumeRecordProblem({ ...record(1), replicas: ['../x'], inSync: ['../x'] }) ?? '', /replicas/);
  });

  test('a CAS moves the epoch by exactly one; a create starts at 1 or later', () => {
    assertCasArguments('v', null, record(1));
    assertCasArguments('v', null, record(9));
    assertCasArguments('v', 4, record(5));
    assert.throws(() => assertCasArguments('v', 4, record(4)), /expected epoch 4 \+ 1/);
    assert.throws(() => assertCasArguments('v', 4, record(6)), /expected epoch 4 \+ 1/);
    assert.throws(() => assertCasArguments('v/../w', 4, record(5)), /safe name/);
  });
});

describe('LeaseKeeper', () => {
  const ttlMs = 1200;
  const marginMs = safetyMarginMs(ttlMs);
  let nowMs = 0;
  let answers: Array<(result: RenewResult) => void> = [];
  let keeper: LeaseKeeper;
  let lost: LeaseLostReason[];

  beforeEach(() => {
    mock.timers.enable({ apis: ['setTimeout'] });
    nowMs = 0;
    answers = [];
    lost = [];
    keeper = new LeaseKeeper({
      nodeId: 'n1',
      leaseId: 'L1',
      ttlMs,
      validUntilMs: ttlMs,
      now: () => nowMs,
      renew: () => new Promise<RenewResult>((resolve) => answers.push(resolve)),
      revokeRemote: async () => {},
      logger: createMemoryLogger(),
    });
    keeper.onLost((reason) => lost.push(reason));
  });
  afterEach(() => {
    keeper.close();
    mock.timers.reset();
  });

  const advance = (ms: number): void => {
    nowMs += ms;
    mock.timers.tick(ms);
  };
  const settle = () => new Promise((resolve) => setImmediate(resolve));

  test('renews three times per TTL and stays valid while the answers come back', async () => {
    for (let round = 0; round < 6; round++) {
      advance(renewIntervalMs(ttlMs));
      assert.equal(answers.length, 1, 'one renewal in flight');
      answers.shift()!({ kind: 'renewed', validUntilMs: nowMs + ttlMs });
      await settle();
    }
    assert.ok(keeper.isValid());
    assert.equal(keeper.remainingMs(), ttlMs - marginMs);
    assert.deepEqual(lost, []);
  });

  test('without answers the session ends at validity − margin, by timer or by the clock', async () => {
    advance(ttlMs - marginMs - 1);
    assert.ok(keeper.isValid());
    nowMs += 1; // the clock moved, the timer did not fire yet (a stalled event loop)
    assert.equal(keeper.isValid(), false);
    await settle();
    assert.deepEqual(lost, ['expired']);
  });

  test('an answer that arrives after the validity ran out does not bring the session back', async () => {
    advance(renewIntervalMs(ttlMs));
    const answer = answers.shift()!;
    nowMs = ttlMs - marginMs + 5; // stalled past the deadline before the answer was processed
    answer({ kind: 'renewed', validUntilMs: renewIntervalMs(ttlMs) + ttlMs });
    await settle();
    assert.equal(keeper.isValid(), false);
    assert.deepEqual(lost, ['expired']);
  });

  test('a rejection ends the session at once; failures are retried until the deadline', async () => {
    advance(renewIntervalMs(ttlMs));
    answers.shift()!({ kind: 'failed', error: new Error('unreachable') });
    await settle();
    assert.ok(keeper.isValid());
    advance(Math.floor(renewIntervalMs(ttlMs) / 2));
    assert.equal(answers.length, 1, 'retried sooner than the normal interval');
    answers.shift()!({ kind: 'rejected', detail: 'lease unknown' });
    await settle();
    assert.equal(keeper.isValid(), false);
    assert.deepEqual(lost, ['rejected']);
  });
});
