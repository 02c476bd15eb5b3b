// Proves the holder's rules by hand-driven sequences: ascending one-at-a-time acquisition, cached grants, admission only with every grant, RELEASE only after every admitted write is acknowledged, pinned regions kept for writes part-way through, FIFO re-requests, bounded queues and refusals, resends after reconnect, duplicate and lost messages, hold-time reports and epoch changes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Holder, type HolderConfig, type HolderEffect } from './holder.js';
import type { PolicingMessage } from './messages.js';
import { VOLUME, checkedAfterEveryCall, message } from './fixtures.js';

const ARBITER = 'n9';

/** A Holder whose invariants are checked after every call the test makes. */
function holder(overrides: Partial<HolderConfig> = {}): Holder {
  const target = new Holder({ volume: VOLUME, epoch: 1, self: 'n1', arbiter: ARBITER, regionCount: 8, waitingWritesMax: 4, grantHoldMaxMs: 100, resendIntervalMs: 1000, ...overrides });
  return checkedAfterEveryCall(target);
}

function summary(effects: readonly HolderEffect[]): string[] {
  return effects.map((effect) => {
    switch (effect.kind) {
      case 'send':
        assert.equal(effect.target, ARBITER);
        return `${effect.message.type} ${effect.message.region}/${effect.message.generation}@${effect.message.epoch}`;
      case 'admit':
        return `admit ${effect.writeId} [${effect.generations.join(',')}]`;
      case 'refuse':
        return `refuse ${effect.writeId} ${effect.code}`;
      case 'ignored':
        return `ignored ${effect.reason}`;
      case 'holdOverdue':
        return `holdOverdue ${effect.region}/${effect.generation} inflight=${effect.writesInFlight}`;
      case 'epochChanged':
        return `epochChanged ${effect.epoch} ${effect.arbiter}`;
    }
  });
}

test('a multi-region write requests its grants one at a time in ascending order and is admitted with all of them', () => {
  const h = holder();
  assert.deepEqual(summary(h.acquire(1, [2, 3, 5])), ['GRANT_REQUEST 2/0@1']);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 2, 1))), ['GRANT_REQUEST 3/0@1']);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 3, 4))), ['GRANT_REQUEST 5/0@1']);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 5, 2))), ['admit 1 [1,4,2]']);
  assert.equal(h.writesAdmitted, 1);
  assert.equal(h.writesWaiting, 0);
  assert.throws(() => h.acquire(2, [3, 1]), /ascending/);
  assert.throws(() => h.acquire(1, [0]), /already known/);
  assert.throws(() => h.acquire(3, [8]), /outside the volume/);
});

test('grants are cached: later writes to held regions are admitted at once, without messages', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.writeAcknowledged(1);
  assert.deepEqual(summary(h.acquire(2, [0])), ['admit 2 [1]']);
  assert.deepEqual(summary(h.acquire(3, [0])), ['admit 3 [1]'], 'several writes of one node may be in flight on a region');
  assert.deepEqual(h.grantOf(0), { held: true, generation: 1, revoking: false });
});

test('REVOKE: no new admission, RELEASE only once every admitted write is acknowledged, then queued writes request again', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.acquire(2, [0]);
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 1))), []);
  assert.deepEqual(summary(h.acquire(3, [0])), [], 'queued: the region is being given back');
  assert.deepEqual(summary(h.acquire(4, [0, 1])), []);
  assert.deepEqual(summary(h.writeAcknowledged(1)), [], 'write 2 is still unacknowledged');
  assert.deepEqual(summary(h.writeAcknowledged(2)), ['RELEASE 0/1@1', 'GRANT_REQUEST 0/1@1']);
  // The next grant serves the queued writes in arrival order.
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 0, 3))), ['admit 3 [3]', 'GRANT_REQUEST 1/0@1']);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 1, 1))), ['admit 4 [3,1]']);
});

test('an idle grant is released as soon as it is revoked', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.writeAcknowledged(1);
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 1))), ['RELEASE 0/1@1']);
  assert.deepEqual(h.grantOf(0), { held: false, generation: 1, revoking: false });
});

test('a region taken by a write part-way through its ascending acquisition is kept until that write is admitted and acknowledged', () => {
  const h = holder();
  h.acquire(1, [0, 1]);
  h.receive(ARBITER, message('GRANT', 0, 1)); // write 1 takes region 0 and waits for region 1
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 1))), [], 'pinned: releasing it now could make two writers take turns for ever');
  assert.deepEqual(summary(h.acquire(2, [0])), [], 'but no new write is admitted on it');
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 1, 1))), ['admit 1 [1,1]']);
  assert.deepEqual(summary(h.writeAcknowledged(1)), ['RELEASE 0/1@1', 'GRANT_REQUEST 0/1@1']);
});

test('bounded queue: a write beyond waitingWritesMax is refused with VOLUME_BUSY; admitted writes do not count', () => {
  const h = holder({ waitingWritesMax: 2 });
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1)); // write 1 admitted
  h.acquire(2, [1]);
  h.acquire(3, [1]);
  const effects = h.acquire(4, [1]);
  assert.deepEqual(summary(effects), ['refuse 4 VOLUME_BUSY']);
  assert.match((effects[0] as { message: string }).message, /2 writes already wait/);
  assert.equal(h.writesWaiting, 2);
  h.receive(ARBITER, message('GRANT', 1, 1));
  assert.deepEqual(summary(h.acquire(4, [1])), ['admit 4 [1]'], 'room again once they are admitted');
});

test('GRANT_REFUSED fails the writes waiting for that region and gives back what they had pinned', () => {
  const h = holder();
  h.acquire(1, [0, 1]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.receive(ARBITER, message('REVOKE', 0, 1)); // pinned by write 1
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT_REFUSED', 1, 0))), ['RELEASE 0/1@1', 'refuse 1 VOLUME_BUSY']);
  assert.equal(h.writesWaiting, 0);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT_REFUSED', 1, 0))), ['ignored stale'], 'no request is outstanding');
});

test('after a reconnect to the arbiter every unanswered request is sent again, with the last generation seen', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.receive(ARBITER, message('REVOKE', 0, 1));
  h.acquire(2, [0]);
  h.writeAcknowledged(1); // RELEASE 0/1 and GRANT_REQUEST 0/1
  h.acquire(3, [4]); // GRANT_REQUEST 4/0
  // DRAINED too, until the arbiter echoes it.
  assert.deepEqual(summary(h.linkUp(ARBITER)), ['DRAINED 0/0@1', 'GRANT_REQUEST 0/1@1', 'GRANT_REQUEST 4/0@1']);
  assert.deepEqual(summary(h.linkUp('n2')), [], 'another peer');
  assert.deepEqual(summary(h.receive(ARBITER, { type: 'DRAINED', volume: VOLUME, epoch: 1, region: 0, generation: 0 })), []);
  assert.deepEqual(summary(h.linkUp(ARBITER)), ['GRANT_REQUEST 0/1@1', 'GRANT_REQUEST 4/0@1']);
  // The resend timer does the same every resendIntervalMs (for peers that ignored a message
  // of an epoch they did not know yet).
  assert.deepEqual(summary(h.tick(999)), []);
  assert.deepEqual(summary(h.tick(1000)), ['GRANT_REQUEST 0/1@1', 'GRANT_REQUEST 4/0@1']);
  assert.deepEqual(summary(h.tick(1500)), []);
});

test('duplicates and losses: a repeated GRANT is ignored, a REVOKE of a released generation gets its RELEASE again, a REVOKE for an unseen generation is a lost GRANT', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 0, 1))), ['ignored stale']);
  h.writeAcknowledged(1);
  h.receive(ARBITER, message('REVOKE', 0, 1));
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 1))), ['RELEASE 0/1@1'], 'the first RELEASE may have been lost');
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 0, 1))), ['ignored stale'], 'a resent GRANT of a released generation');
  // Write 2 waits for region 0; GRANT 0/2 is lost, and the resent REVOKE 0/2 arrives first.
  h.acquire(2, [0]);
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 2))), ['admit 2 [2]']);
  assert.deepEqual(summary(h.writeAcknowledged(2)), ['RELEASE 0/2@1']);
  assert.deepEqual(summary(h.receive(ARBITER, message('REVOKE', 0, 1))), ['ignored stale']);
});

test('messages of another volume, epoch, sender or region are ignored and reported', () => {
  const h = holder();
  h.acquire(1, [0]);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 0, 1, 2))), ['ignored epoch']);
  assert.deepEqual(summary(h.receive(ARBITER, { ...message('GRANT', 0, 1), volume: 'x' })), ['ignored volume']);
  assert.deepEqual(summary(h.receive('n2', message('GRANT', 0, 1))), ['ignored source']);
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 9, 1))), ['ignored region']);
  assert.deepEqual(summary(h.receive(ARBITER, message('RELEASE', 0, 1))), ['ignored unexpected']);
  assert.equal(h.writesWaiting, 1);
});

test('hold-time limit: a revoked region whose writes stay unacknowledged past grantHoldMaxMs is reported once', () => {
  const h = holder({ grantHoldMaxMs: 100 });
  h.tick(50);
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.receive(ARBITER, message('REVOKE', 0, 1)); // revoked at 50
  assert.deepEqual(summary(h.tick(150)), []);
  assert.deepEqual(summary(h.tick(151)), ['holdOverdue 0/1 inflight=1']);
  assert.deepEqual(summary(h.tick(400)), []);
  assert.deepEqual(summary(h.writeAcknowledged(1)), ['RELEASE 0/1@1']);
});

test('epoch change: nothing is admitted until the old epoch drains; then grants are dropped and waiting writes ask the new arbiter', () => {
  const h = holder();
  h.acquire(1, [0]);
  h.receive(ARBITER, message('GRANT', 0, 1));
  h.acquire(2, [1, 2]);
  h.receive(ARBITER, message('GRANT', 1, 1)); // write 2 pins region 1, waits for 2
  assert.deepEqual(summary(h.changeEpoch(2, 'n2')), []);
  assert.ok(h.changingEpoch);
  assert.deepEqual(summary(h.acquire(3, [0])), [], 'region 0 is still held, but not admitted under a dying epoch');
  assert.deepEqual(summary(h.receive(ARBITER, message('GRANT', 2, 1))), ['ignored draining']);
  const effects = h.writeAcknowledged(1);
  assert.deepEqual(
    effects.map((effect) => (effect.kind === 'send' ? `${effect.target} ${effect.message.type} ${effect.message.region}/${effect.message.generation}@${effect.message.epoch}` : effect.kind)),
    ['epochChanged', 'n2 DRAINED 0/0@2', 'n2 GRANT_REQUEST 1/0@2', 'n2 GRANT_REQUEST 0/0@2'],
  );
  assert.equal(h.epoch, 2);
  assert.equal(h.arbiter, 'n2');
  assert.deepEqual(h.grantOf(0), { held: false, generation: 0, revoking: false });
  assert.deepEqual(summary(h.receive('n2', message('GRANT', 0, 1, 2))), ['admit 3 [1]']);
  assert.throws(() => h.changeEpoch(2, 'n3'), /epochs only grow/);
});

test('an epoch change with nothing in flight takes effect at once', () => {
  const h = holder();
  h.acquire(1, [3]);
  assert.deepEqual(summary(h.changeEpoch(5, ARBITER)), ['epochChanged 5 n9', 'DRAINED 0/0@5', 'GRANT_REQUEST 3/0@5']);
});
