// Proves the failure simulation's coordinator model (sim-coordinator.ts): a CAS changes the record only from the current epoch to the next, and only by a record change the design knows; removing another member while the lease it served under lives is an I2 violation, as is moving another member out to catch up; leases expire at the coordinator a TTL after the last renewal it received, and a previous incarnation's live lease blocks a new registration; answers carry the records the requester missed, in epoch order.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { VolumeRecord } from '../cluster/coordinator.js';
import { Scheduler } from './scheduler.js';
import { SimCoordinator, classifyRecordChange } from './sim-coordinator.js';
import { SimulationError } from './trace.js';

const REPLICAS = ['n1', 'n2', 'n3'];

function record(epoch: number, inSync: string[], catchingUp?: string[]): VolumeRecord {
  return { epoch, replicas: REPLICAS, inSync, arbiter: 'n1', ...(catchingUp ? { catchingUp } : {}), updatedAtMs: 0 };
}

test('record changes are classified as the design knows them, anything else is illegal', () => {
  const all = record(1, REPLICAS);
  assert.equal(classifyRecordChange(all, record(2, REPLICAS)).kind, 'rejoin');
  assert.deepEqual(classifyRecordChange(all, record(2, ['n1', 'n2'])), { kind: 'remove', member: 'n3' });
  assert.deepEqual(classifyRecordChange(record(2, ['n1', 'n2']), record(3, ['n1', 'n2'], ['n3'])), { kind: 'join', member: 'n3' });
  assert.deepEqual(classifyRecordChange(record(3, ['n1', 'n2'], ['n3']), record(4, REPLICAS)), { kind: 'promote', member: 'n3' });
  assert.deepEqual(classifyRecordChange(all, record(2, ['n1', 'n2'], ['n3'])), { kind: 'leave', member: 'n3' });
  assert.deepEqual(classifyRecordChange(record(3, ['n1', 'n2'], ['n3']), record(4, ['n1', 'n2'])), { kind: 'remove', member: 'n3' });
  assert.equal(classifyRecordChange(all, record(2, ['n1'])).kind, 'illegal', 'two members at once');
  assert.equal(classifyRecordChange(all, record(2, [])).kind, 'illegal', 'an empty in-sync set');
  assert.equal(classifyRecordChange(all, { ...record(2, REPLICAS), replicas: ['n1', 'n2'] }).kind, 'illegal', 'the replicas changed');
});

test('a CAS from an old epoch loses and returns the records the requester missed; a good one moves the epoch by one', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const coordinator = new SimCoordinator({ scheduler, replicas: REPLICAS, leaseTtlMs: 100 });
  const won = coordinator.handle('n1', { op: 'cas', expectedEpoch: 1, next: record(2, REPLICAS), requester: 'n1', why: 'rejoin' }, 1);
  assert.deepEqual(won, { op: 'cas', ok: true, current: coordinator.record, records: [coordinator.record] });
  const lost = coordinator.handle('n2', { op: 'cas', expectedEpoch: 1, next: record(2, REPLICAS), requester: 'n2', why: 'rejoin' }, 0);
  assert.equal(lost.op === 'cas' && lost.ok, false);
  assert.deepEqual(lost.op === 'cas' ? lost.records.map((entry) => entry.epoch) : [], [1, 2]);
  assert.throws(() => coordinator.handle('n1', { op: 'cas', expectedEpoch: 2, next: record(4, REPLICAS), requester: 'n1', why: 'skip' }), (error: unknown) => error instanceof SimulationError && /I2 violated: n1 CAS from epoch 2 to 4/.test(error.message));
});

test('removing a member whose lease lives is an I2 violation; one re-registered since the current record is not', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const coordinator = new SimCoordinator({ scheduler, replicas: REPLICAS, leaseTtlMs: 100 });
  coordinator.handle('n3', { op: 'register', node: 'n3' });
  assert.throws(() => coordinator.handle('n1', { op: 'cas', expectedEpoch: 1, next: record(2, ['n1', 'n2']), requester: 'n1', why: 'remove n3' }), /I2 violated: n1 removed n3 at epoch 2 while n3 still holds the live lease/);
  scheduler.runUntilSync(150);
  assert.equal(coordinator.hasLiveLease('n3'), false, 'the lease ran out 100 ms after its registration');
  coordinator.handle('n2', { op: 'cas', expectedEpoch: 1, next: record(2, REPLICAS), requester: 'n2', why: 'rejoin' });
  // n3 registers again after the current record was written: it cannot serve before its rejoin CAS.
  scheduler.runUntilSync(160);
  coordinator.handle('n3', { op: 'register', node: 'n3' });
  const removed = coordinator.handle('n1', { op: 'cas', expectedEpoch: 2, next: record(3, ['n1', 'n2']), requester: 'n1', why: 'remove n3' });
  assert.equal(removed.op === 'cas' && removed.ok, true);
  assert.throws(() => coordinator.handle('n1', { op: 'cas', expectedEpoch: 3, next: record(4, ['n1'], ['n2']), requester: 'n1', why: 'push n2 out' }), /I2 violated: n1 moved n2 out of the in-sync set/);
});

test('a lease lives a TTL after the last renewal the coordinator received; a live one blocks a new registration of its node', () => {
  const scheduler = new Scheduler({ seed: 1 });
  const expired: string[] = [];
  const coordinator = new SimCoordinator({ scheduler, replicas: REPLICAS, leaseTtlMs: 100, onLeaseExpired: (node, leaseId) => expired.push(`${node} ${leaseId}`) });
  const registered = coordinator.handle('n1', { op: 'register', node: 'n1' });
  assert.equal(registered.op, 'register');
  const leaseId = registered.op === 'register' ? registered.leaseId! : '';
  assert.deepEqual(coordinator.handle('n1', { op: 'register', node: 'n1' }), { op: 'register', leaseId: undefined }, 'the previous incarnation still holds it');
  scheduler.runUntilSync(80);
  assert.deepEqual(coordinator.handle('n1', { op: 'keepalive', leaseId }), { op: 'keepalive', renewed: true });
  scheduler.runUntilSync(170);
  assert.deepEqual(coordinator.liveNodes(), ['n1']);
  scheduler.runUntilSync(181);
  assert.deepEqual(coordinator.liveNodes(), []);
  assert.deepEqual(expired, [`n1 ${leaseId}`]);
  assert.deepEqual(coordinator.handle('n1', { op: 'keepalive', leaseId }), { op: 'keepalive', renewed: false }, 'an expired lease is not renewed');
});
