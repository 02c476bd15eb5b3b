// Proves the membership rules: an in-sync member is removed (epoch + 1, arbiter moved only if it was the arbiter) only when it is both silent for the failure timeout and without a lease, never the last member and never the deciding node; fencing on a lost lease or a lost majority; strict write refusal; per-replica states.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import type { VolumeRecord } from './coordinator.js';
import { decideRemoval, fenceReason, majorityOf, replicaStates, writesAllowed, type MembershipObservation } from './membership.js';

const RECORD: VolumeRecord = { epoch: 4, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2', 'n3'], arbiter: 'n1', updatedAtMs: 0 };
const NOW = 100_000;
const TIMEOUT = 500;

function observe(overrides: Partial<MembershipObservation> = {}): MembershipObservation {
  return {
    self: 'n1',
    record: RECORD,
    spec: { strict: false },
    liveNodes: new Set(['n1', 'n2', 'n3']),
    lastHeardMs: new Map([['n2', NOW], ['n3', NOW]]),
    nowMs: NOW,
    failureTimeoutMs: TIMEOUT,
    ...overrides,
  };
}

describe('decideRemoval', () => {
  it('keeps everyone while every member is heard and leased', () => {
    assert.deepEqual(decideRemoval(observe()), { kind: 'none', reason: 'every in-sync member is reachable' });
  });

  it('removes a member that is silent for the failure timeout and has no lease', () => {
    const decision = decideRemoval(observe({ liveNodes: new Set(['n1', 'n2']), lastHeardMs: new Map([['n2', NOW], ['n3', NOW - TIMEOUT]]) }));
    assert.equal(decision.kind, 'remove');
    assert.ok(decision.kind === 'remove');
    assert.equal(decision.member, 'n3');
    assert.deepEqual(decision.next, { epoch: 5, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2'], arbiter: 'n1' });
    assert.match(decision.reason, /n3 silent for 500 ms .* lease is gone/);
  });

  it('waits while a silent member still holds its lease (it may still serve: I2, I3)', () => {
    const decision = decideRemoval(observe({ lastHeardMs: new Map([['n2', NOW], ['n3', NOW - 10 * TIMEOUT]]) }));
    assert.deepEqual(decision, { kind: 'none', reason: 'n3 silent, waiting for its lease to run out' });
  });

  it('keeps a member without a lease while its link is up (a coordinator blip is not a failure)', () => {
    const decision = decideRemoval(observe({ liveNodes: new Set(['n1', 'n2']), lastHeardMs: new Map([['n2', NOW], ['n3', NOW - TIMEOUT + 1]]) }));
    assert.deepEqual(decision, { kind: 'none', reason: 'n3 has no lease but its link is up' });
  });

  it('treats a peer never heard as silent', () => {
    const decision = decideRemoval(observe({ liveNodes: new Set(['n1', 'n2']), lastHeardMs: new Map([['n2', NOW]]) }));
    assert.ok(decision.kind === 'remove' && decision.member === 'n3' && /never heard/.test(decision.reason));
  });

  it('moves the arbiter to the first remaining in-sync member when the arbiter is removed', () => {
    const decision = decideRemoval(observe({ self: 'n3', liveNodes: new Set(['n2', 'n3']), lastHeardMs: new Map([['n1', NOW - TIMEOUT], ['n2', NOW]]) }));
    assert.ok(decision.kind === 'remove', decision.reason);
    assert.deepEqual(decision.next, { epoch: 5, replicas: ['n1', 'n2', 'n3'], inSync: ['n2', 'n3'], arbiter: 'n2' });
  });

  it('picks the arbiter from the remaining members when the record names none', () => {
    const { arbiter: _arbiter, ...withoutArbiter } = RECORD;
    const decision = decideRemoval(observe({ record: withoutArbiter, liveNodes: new Set(['n1', 'n3']), lastHeardMs: new Map([['n2', 0], ['n3', NOW]]) }));
    assert.ok(decision.kind === 'remove');
    assert.deepEqual(decision.next, { epoch: 5, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n3'], arbiter: 'n1' });
  });

  it('never removes the last in-sync member, nor the deciding node itself', () => {
    const alone: VolumeRecord = { ...RECORD, inSync: ['n2'], arbiter: 'n2' };
    assert.deepEqual(decideRemoval(observe({ record: alone, liveNodes: new Set(['n1']), lastHeardMs: new Map() })), { kind: 'none', reason: 'only n2 is in sync' });
    const selfOnlyDead = decideRemoval(observe({ liveNodes: new Set(['n2', 'n3']) }));
    assert.equal(selfOnlyDead.kind, 'none');
  });

  it('removes one member per change, in record order', () => {
    const five: VolumeRecord = { ...RECORD, replicas: ['n1', 'n2', 'n3', 'n4', 'n5'], inSync: ['n1', 'n2', 'n3', 'n4', 'n5'] };
    const decision = decideRemoval(observe({ record: five, liveNodes: new Set(['n1', 'n4', 'n5']), lastHeardMs: new Map([['n4', NOW], ['n5', NOW]]) }));
    assert.ok(decision.kind === 'remove' && decision.member === 'n2');
    assert.deepEqual(decision.next.inSync, ['n1', 'n3', 'n4', 'n5']);
  });

  it('changes nothing from the minority side: the last node running keeps the others in sync', () => {
    const decision = decideRemoval(observe({ liveNodes: new Set(['n1']), lastHeardMs: new Map() }));
    assert.deepEqual(decision, { kind: 'none', reason: 'no quorum: n1 reaches 1 of 3 replicas and the coordinator (2 of 4 votes, 3 needed) for 500 ms' });
  });

  it('property: a removal always yields a valid next record one epoch later, with a member both silent and unleased', () => {
    const nodes = ['n1', 'n2', 'n3', 'n4', 'n5'];
    fc.assert(
      fc.property(
        fc.subarray(nodes, { minLength: 1 }),
        fc.func(fc.boolean()),
        fc.func(fc.boolean()),
        fc.integer({ min: 0, max: 4 }),
        fc.integer({ min: 1, max: 2000 }),
        fc.dictionary(fc.constantFrom(...nodes), fc.integer({ min: 0, max: NOW })),
        (inSync, isLive, hasArbiter, selfIndex, timeoutMs, heard) => {
          const record: VolumeRecord = { epoch: 7, replicas: nodes, inSync, updatedAtMs: 0, ...(hasArbiter(inSync) ? { arbiter: inSync[0]! } : {}) };
          const self = nodes[selfIndex]!;
          const liveNodes = new Set(nodes.filter((node) => isLive(node)));
          const lastHeardMs = new Map(Object.entries(heard));
          const decision = decideRemoval({ self, record, spec: { strict: false }, liveNodes, lastHeardMs, nowMs: NOW, failureTimeoutMs: timeoutMs });
          if (decision.kind === 'none') return;
          const reachable = 1 + nodes.filter((node) => node !== self && lastHeardMs.has(node) && NOW - lastHeardMs.get(node)! < timeoutMs).length;
          assert.ok(reachable >= 3, 'only a node reaching a majority removes');
          const { next, member } = decision;
          assert.notEqual(member, self);
          assert.ok(record.inSync.includes(member) && !liveNodes.has(member));
          const heardMs = lastHeardMs.get(member);
          assert.ok(heardMs === undefined || NOW - heardMs >= timeoutMs);
          assert.equal(next.epoch, record.epoch + 1);
          assert.deepEqual(next.replicas, record.replicas);
          assert.deepEqual(next.inSync, record.inSync.filter((node) => node !== member));
          assert.ok(next.inSync.length >= 1);
          assert.ok(next.arbiter !== undefined && next.inSync.includes(next.arbiter));
          if (record.arbiter !== undefined && record.arbiter !== member) assert.equal(next.arbiter, record.arbiter);
        },
      ),
    );
  });
});

describe('fenceReason', () => {
  const base = { self: 'n1', record: RECORD, leaseValid: true, lastHeardMs: new Map([['n2', NOW], ['n3', NOW]]), nowMs: NOW, failureTimeoutMs: TIMEOUT };

  it('serves with a lease and a majority', () => {
    assert.equal(fenceReason(base), undefined);
    assert.equal(fenceReason({ ...base, lastHeardMs: new Map([['n2', NOW]]) }), undefined, 'two of three is a majority');
  });

  it('fences on a lost lease', () => {
    assert.match(fenceReason({ ...base, leaseValid: false }) ?? '', /^lease lost/);
  });

  it('fences when fewer than a majority are reachable for the failure timeout', () => {
    assert.match(fenceReason({ ...base, lastHeardMs: new Map([['n2', NOW - TIMEOUT], ['n3', NOW - TIMEOUT]]) }) ?? '', /^no quorum: n1 reaches 1 of 3 replicas and the coordinator \(2 of 4 votes, 3 needed\)/);
    assert.equal(fenceReason({ ...base, lastHeardMs: new Map([['n2', NOW - TIMEOUT + 1]]) }), undefined, 'not silent for the whole timeout yet');
  });

  it('two replicas: the survivor of a dead peer keeps a quorum with the coordinator, and loses it without a lease', () => {
    const two: VolumeRecord = { ...RECORD, replicas: ['n1', 'n2'], inSync: ['n1', 'n2'] };
    assert.equal(fenceReason({ ...base, record: two, lastHeardMs: new Map([['n2', NOW - TIMEOUT]]) }), undefined);
    assert.match(fenceReason({ ...base, record: two, leaseValid: false, lastHeardMs: new Map([['n2', NOW]]) }) ?? '', /^lease lost/);
    const decision = decideRemoval({ self: 'n1', record: two, spec: { strict: false }, liveNodes: new Set(['n1']), lastHeardMs: new Map([['n2', NOW - TIMEOUT]]), nowMs: NOW, failureTimeoutMs: TIMEOUT });
    assert.ok(decision.kind === 'remove' && decision.member === 'n2', JSON.stringify(decision));
    assert.deepEqual(decision.next.inSync, ['n1']);
  });

  it('majorities', () => {
    assert.deepEqual([1, 2, 3, 4, 5].map(majorityOf), [1, 2, 2, 3, 3]);
  });
});

describe('writesAllowed and replicaStates', () => {
  it('a strict volume refuses writes while a replica is out of sync; a relaxed one does not', () => {
    const degraded = { replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2'] };
    assert.equal(writesAllowed(degraded, { strict: false }), true);
    assert.equal(writesAllowed(degraded, { strict: true }), false);
    assert.equal(writesAllowed(RECORD, { strict: true }), true);
  });

  it('reports in-sync, out-of-sync and fenced per replica', () => {
    const record = { replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2'] };
    assert.deepEqual(replicaStates(record, 'n1', true), [
      { node: 'n1', state: 'fenced' },
      { node: 'n2', state: 'in-sync' },
      { node: 'n3', state: 'out-of-sync' },
    ]);
    assert.deepEqual(replicaStates(record, 'n3', true).map((replica) => replica.state), ['in-sync', 'in-sync', 'out-of-sync']);
  });
});
