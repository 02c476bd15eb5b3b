// Proves the catch-up record changes: a replica outside the in-sync set joins catchingUp at the next epoch (once), an in-sync replica that restarted with unacknowledged writes leaves for catchingUp (never the last in-sync one), a catching-up replica is promoted into inSync (once), a replica whose disk failed leaves both sets (never the last in-sync member; the arbiter moves off it), and none applies to a node that is not in the state it requires; every result passes the record validation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { volumeRecordProblem, type VolumeRecord } from './coordinator.js';
import { joinCatchUp, leaveDiskless, leaveToCatchUp, promoteCaughtUp } from './catch-up-record.js';

const base: VolumeRecord = { epoch: 7, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2'], arbiter: 'n1', updatedAtMs: 1 };

test('an out-of-sync replica joins catchingUp at the next epoch, once', () => {
  const joined = joinCatchUp(base, 'n3', 99);
  assert.deepEqual(joined, { ...base, epoch: 8, catchingUp: ['n3'], updatedAtMs: 99 });
  assert.equal(volumeRecordProblem(joined), undefined);
  assert.equal(joinCatchUp(joined!, 'n3', 100), undefined, 'already catching up');
  assert.equal(joinCatchUp(base, 'n1', 100), undefined, 'in sync already');
  assert.equal(joinCatchUp(base, 'n9', 100), undefined, 'not a replica');
});

test('a catching-up replica is promoted into inSync, and catchingUp keeps the others', () => {
  const two: VolumeRecord = { ...base, replicas: ['n1', 'n2', 'n3', 'n4'], catchingUp: ['n3', 'n4'] };
  const promoted = promoteCaughtUp(two, 'n3', 5);
  assert.deepEqual(promoted, { ...two, epoch: 8, inSync: ['n1', 'n2', 'n3'], catchingUp: ['n4'], updatedAtMs: 5 });
  assert.equal(volumeRecordProblem(promoted), undefined);
  const last = promoteCaughtUp(promoted!, 'n4', 6)!;
  assert.equal(last.catchingUp, undefined, 'an empty catchingUp is left out');
  assert.deepEqual(last.inSync, ['n1', 'n2', 'n3', 'n4']);
  assert.equal(volumeRecordProblem(last), undefined);
  assert.equal(promoteCaughtUp(base, 'n3', 7), undefined, 'not catching up (removed meanwhile)');
});

test('the record validation refuses a catchingUp member that is in sync or not a replica', () => {
  assert.match(volumeRecordProblem({ ...base, catchingUp: ['n1'] }) ?? '', /outside inSync/);
  assert.match(volumeRecordProblem({ ...base, catchingUp: ['n9'] }) ?? '', /outside inSync/);
  assert.match(volumeRecordProblem({ ...base, catchingUp: ['n3', 'n3'] }) ?? '', /distinct/);
});

test('an in-sync replica leaves for catchingUp, keeping the arbiter; never the last in-sync member', () => {
  const all: VolumeRecord = { ...base, inSync: ['n1', 'n2', 'n3'] };
  const left = leaveToCatchUp(all, 'n1', 3);
  assert.deepEqual(left, { ...all, epoch: 8, inSync: ['n2', 'n3'], catchingUp: ['n1'], updatedAtMs: 3 });
  assert.equal(volumeRecordProblem(left), undefined);
  assert.equal(leaveToCatchUp(left!, 'n1', 4), undefined, 'not in sync any more');
  assert.equal(leaveToCatchUp({ ...base, inSync: ['n1'] }, 'n1', 4), undefined, 'the last in-sync member holds the only copy');
});

test('a replica whose disk failed leaves the in-sync set for neither set; the arbiter moves off it; never the last in-sync member', () => {
  const all: VolumeRecord = { ...base, inSync: ['n1', 'n2', 'n3'] };
  const left = leaveDiskless(all, 'n1', 3);
  assert.deepEqual(left, { ...all, epoch: 8, inSync: ['n2', 'n3'], arbiter: 'n2', updatedAtMs: 3 });
  assert.equal(volumeRecordProblem(left), undefined);
  assert.equal(leaveDiskless(left!, 'n1', 4), undefined, 'out of both sets already');
  // Another member arbitrates: it stays.
  assert.deepEqual(leaveDiskless(all, 'n3', 5), { ...all, epoch: 8, inSync: ['n1', 'n2'], updatedAtMs: 5 });
  // No arbiter in the record: the first in-sync member arbitrates by default, so it is named.
  const implicit: VolumeRecord = { epoch: 7, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2', 'n3'], updatedAtMs: 1 };
  assert.equal(leaveDiskless(implicit, 'n1', 6)?.arbiter, 'n2');
  assert.equal(leaveDiskless({ ...base, inSync: ['n1'] }, 'n1', 7), undefined, 'the last in-sync member holds the only copy');
  assert.equal(leaveDiskless(base, 'n9', 7), undefined, 'not a replica');
});

test('a catching-up replica whose disk failed leaves catchingUp (the field goes once empty)', () => {
  const catching: VolumeRecord = { ...base, catchingUp: ['n3'] };
  const left = leaveDiskless(catching, 'n3', 9);
  assert.deepEqual(left, { ...base, epoch: 8, updatedAtMs: 9 });
  assert.equal(volumeRecordProblem(left), undefined);
  const two: VolumeRecord = { ...base, replicas: ['n1', 'n2', 'n3', 'n4'], catchingUp: ['n3', 'n4'] };
  assert.deepEqual(leaveDiskless(two, 'n4', 9)?.catchingUp, ['n3']);
  // A catching-up arbiter (left to catch up as the arbiter) hands it on too.
  assert.equal(leaveDiskless({ ...catching, arbiter: 'n3' }, 'n3', 9)?.arbiter, 'n1');
});
