// Proves the arbiter's rules by hand-driven message sequences: grants with generation + 1, FIFO queues with one REVOKE per generation, releases handed to the next requester, retries and lost releases recognised by generation, bounded queues answered with GRANT_REFUSED, revokes resent on reconnect, hold-time reports, and epoch resets.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Arbiter, type ArbiterConfig, type ArbiterEffect } from './arbiter.js';
import type { PolicingMessage } from './messages.js';
import { VOLUME, checkedAfterEveryCall, message } from './fixtures.js';


/** An Arbiter whose invariants are checked after every call the test makes. */
function arbiter(overrides: Partial<ArbiterConfig> = {}): Arbiter {
  const target = new Arbiter({ volume: VOLUME, epoch: 1, regionCount: 8, waitersPerRegionMax: 4, grantHoldMaxMs: 100, ...overrides });
  return checkedAfterEveryCall(target);
}

/** Sends as "target TYPE region/generation", the rest as their kind (and reason). */
function summary(effects: readonly ArbiterEffect[]): string[] {
  return effects.map((effect) => {
    switch (effect.kind) {
      case 'send':
        return `${effect.target} ${effect.message.type} ${effect.message.region}/${effect.message.generation}`;
      case 'queued':
        return `queued ${effect.node} ${effect.region}@${effect.position}`;
      case 'ignored':
        return `ignored ${effect.source} ${effect.reason}`;
      case 'holdOverdue':
        return `holdOverdue ${effect.holder} ${effect.region}/${effect.generation} ${effect.revokedForMs}ms`;
    }
  });
}

test('a free region is granted at generation + 1; after its release the next grant is one higher', () => {
  const a = arbiter();
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 3, 0))), ['n1 GRANT 3/1']);
  assert.deepEqual(a.region(3), { holder: 'n1', generation: 1, waiters: [] });
  assert.deepEqual(summary(a.receive('n1', message('RELEASE', 3, 1))), []);
  assert.deepEqual(a.region(3), { holder: undefined, generation: 1, waiters: [] });
  assert.deepEqual(summary(a.receive('n2', message('GRANT_REQUEST', 3, 0))), ['n2 GRANT 3/2']);
});

test('contention: requesters queue FIFO, the holder is revoked once, each release grants the head and revokes again while others wait', () => {
  const a = arbiter();
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(a.receive('n2', message('GRANT_REQUEST', 0, 0))), ['queued n2 0@0', 'n1 REVOKE 0/1']);
  assert.deepEqual(summary(a.receive('n3', message('GRANT_REQUEST', 0, 0))), ['queued n3 0@1'], 'REVOKE is sent once per generation');
  // n1 releases: n2 (first in line) gets generation 2 and is revoked at once, for n3.
  assert.deepEqual(summary(a.receive('n1', message('RELEASE', 0, 1))), ['n2 GRANT 0/2', 'n2 REVOKE 0/2']);
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 1))), ['queued n1 0@1']);
  assert.deepEqual(summary(a.receive('n2', message('RELEASE', 0, 2))), ['n3 GRANT 0/3', 'n3 REVOKE 0/3']);
  assert.deepEqual(summary(a.receive('n3', message('RELEASE', 0, 3))), ['n1 GRANT 0/4']);
  assert.deepEqual(a.region(0), { holder: 'n1', generation: 4, waiters: [] });
});

test('regions are independent: one node requesting several regions is served per region', () => {
  const a = arbiter();
  a.receive('n2', message('GRANT_REQUEST', 2, 0));
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 1, 0))), ['n1 GRANT 1/1']);
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 2, 0))), ['queued n1 2@0', 'n2 REVOKE 2/1']);
  assert.deepEqual(summary(a.receive('n2', message('RELEASE', 2, 1))), ['n1 GRANT 2/2']);
  assert.equal(a.region(1).holder, 'n1');
});

test('stale and unexpected messages change nothing and are reported', () => {
  const a = arbiter();
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(a.receive('n2', message('RELEASE', 0, 1))), ['ignored n2 stale'], 'not the holder');
  assert.deepEqual(summary(a.receive('n1', message('RELEASE', 0, 7))), ['ignored n1 stale'], 'another generation');
  assert.deepEqual(summary(a.receive('n1', message('RELEASE', 5, 1))), ['ignored n1 stale'], 'a region never granted');
  assert.deepEqual(summary(a.receive('n1', message('GRANT', 0, 1))), ['ignored n1 unexpected']);
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 8, 0))), ['ignored n1 region']);
  assert.deepEqual(summary(a.receive('n1', { ...message('GRANT_REQUEST', 1, 0), volume: 'other' })), ['ignored n1 volume']);
  assert.equal(a.region(0).holder, 'n1');
});

test('retries: a queued requester asking again is a duplicate; the holder asking again gets its GRANT again', () => {
  const a = arbiter();
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(a.receive('n2', message('GRANT_REQUEST', 0, 0))), ['ignored n2 duplicate']);
  // n1's GRANT was lost with a link: it still has seen generation 0 only.
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 0))), ['n1 GRANT 0/1']);
  assert.deepEqual(a.region(0), { holder: 'n1', generation: 1, waiters: ['n2'] });
});

test('a lost RELEASE: the holder requesting with the current generation has released it, and queues behind the others', () => {
  const a = arbiter();
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0));
  // n1 released generation 1 (lost) and asks again for a new write.
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 1))), ['queued n1 0@1', 'n2 GRANT 0/2', 'n2 REVOKE 0/2']);
  // Alone, it simply gets the next generation.
  const b = arbiter();
  b.receive('n1', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(b.receive('n1', message('GRANT_REQUEST', 0, 1))), ['n1 GRANT 0/2']);
});

test('a full queue refuses the requester with GRANT_REFUSED and changes nothing else', () => {
  const a = arbiter({ waitersPerRegionMax: 1 });
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(a.receive('n3', message('GRANT_REQUEST', 0, 0))), ['n3 GRANT_REFUSED 0/0']);
  assert.deepEqual(a.region(0), { holder: 'n1', generation: 1, waiters: ['n2'] });
});

test('a reconnect resends the REVOKEs of the regions that peer holds while others wait, and nothing else', () => {
  const a = arbiter();
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n1', message('GRANT_REQUEST', 1, 0));
  a.receive('n2', message('GRANT_REQUEST', 1, 0));
  assert.deepEqual(summary(a.linkUp('n1')), ['n1 REVOKE 1/1']);
  assert.deepEqual(summary(a.linkUp('n2')), []);
  a.receive('n1', message('RELEASE', 1, 1));
  assert.deepEqual(summary(a.linkUp('n1')), []);
});

test('hold-time limit: a revoked holder past grantHoldMaxMs is reported once; a release clears it', () => {
  const a = arbiter({ grantHoldMaxMs: 100 });
  a.tick(1000);
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0)); // revoked at 1000
  assert.deepEqual(summary(a.tick(1100)), []);
  assert.deepEqual(summary(a.tick(1101)), ['holdOverdue n1 0/1 101ms']);
  assert.deepEqual(summary(a.tick(1500)), [], 'once per revoke');
  a.receive('n1', message('RELEASE', 0, 1)); // n2 holds, nobody waits: not revoked
  assert.deepEqual(summary(a.tick(5000)), []);
  assert.throws(() => a.tick(4000), /time goes forward/);
});

test('epochs: other epochs are ignored; reset drops the table and generations start again', () => {
  const a = arbiter();
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 0, 2))), ['ignored n1 epoch']);
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0));
  a.reset(2);
  assert.equal(a.epoch, 2);
  assert.deepEqual(a.region(0), { holder: undefined, generation: 0, waiters: [] });
  assert.deepEqual(summary(a.receive('n1', message('RELEASE', 0, 1))), ['ignored n1 epoch'], 'the old epoch is gone');
  assert.deepEqual(summary(a.receive('n2', message('GRANT_REQUEST', 0, 0, 2))), ['n2 GRANT 0/1']);
  assert.deepEqual(summary(a.linkUp('n1')), []);
  assert.throws(() => a.reset(2), /epochs only grow/);
});

test('epoch fence: with members, requests queue and nothing is granted until every member said DRAINED (each echoed)', () => {
  const a = arbiter({ members: ['n1', 'n2', 'n3'] });
  assert.ok(a.fenced);
  assert.deepEqual(summary(a.receive('n2', message('GRANT_REQUEST', 0, 0))), ['queued n2 0@0']);
  assert.deepEqual(summary(a.receive('n3', message('GRANT_REQUEST', 0, 0))), ['queued n3 0@1']);
  assert.deepEqual(summary(a.receive('n3', message('GRANT_REQUEST', 1, 0))), ['queued n3 1@0']);
  const drained = { type: 'DRAINED', volume: VOLUME, epoch: 1, region: 0, generation: 0 } as const;
  assert.deepEqual(summary(a.receive('n1', drained)), ['n1 DRAINED 0/0']);
  assert.deepEqual(summary(a.receive('n2', drained)), ['n2 DRAINED 0/0']);
  assert.deepEqual(summary(a.receive('n2', drained)), ['n2 DRAINED 0/0'], 'a resent DRAINED is echoed again');
  assert.ok(a.fenced);
  a.assertInvariants();
  // The last member drained: every region goes to the head of its queue.
  assert.deepEqual(summary(a.receive('n3', drained)), ['n3 DRAINED 0/0', 'n2 GRANT 0/1', 'n2 REVOKE 0/1', 'n3 GRANT 1/1']);
  assert.ok(!a.fenced);
  a.assertInvariants();
  // reset() fences the new epoch again.
  a.reset(2, ['n1']);
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 0, 2))), ['queued n1 0@0']);
  assert.deepEqual(summary(a.receive('n1', { ...drained, epoch: 2 })), ['n1 DRAINED 0/0', 'n1 GRANT 0/1']);
});

test('a lost RELEASE found out by a request that the full queue refuses still hands the region on', () => {
  const a = arbiter({ waitersPerRegionMax: 1 });
  a.receive('n1', message('GRANT_REQUEST', 0, 0));
  a.receive('n2', message('GRANT_REQUEST', 0, 0));
  assert.deepEqual(summary(a.receive('n1', message('GRANT_REQUEST', 0, 1))), ['n1 GRANT_REFUSED 0/0', 'n2 GRANT 0/2']);
  a.assertInvariants();
});
