// Proves the source core on its own: a write completes only after the local apply and every
// in-sync member's (cumulative) ACK (I1); FLUSH/FUA wait for the local sync and every SYNC_ACK;
// nothing is sent to a peer after link news until its ACK positions it, and then the stream is
// resent from there; admission is FIFO and bounded (in-flight writes, resend window, async lag,
// queue length); consistency points are requested on a timer, on window pressure and on flush;
// membership changes release pending acknowledgements; stale epochs are refused (I2); a
// catching-up member owes nothing before it joined and its stream starts at its floor, also one
// that moves from the in-sync set to catching up; when this node itself starts catching up, what
// not every member acknowledged fails (queued operations too) and every member's floor moves up;
// a catching-up node skips a peer that lost entries it no longer holds forward.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ENTRY_TYPE } from '../../journal/entry.js';
import { ReplicationSource, type SourceConfig, type SourceEffect, type SourceLimits } from './source.js';

type Ack = 'ACK' | 'SYNC_ACK' | 'CHECKPOINT_ACK';
const ack = (type: Ack, sequence: number, epoch = 1) => ({ type, volume: 'vol', epoch, source: 'a', sequence });

let nextOperation = 1;
function data(options: { fua?: boolean; bytes?: number } = {}) {
  const payload = Buffer.alloc(options.bytes ?? 8, 7);
  return { operationId: nextOperation++, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: payload.length, payload, fua: options.fua ?? false };
}

/** A source with members b and c, both links up and positioned at 0. */
function source(limits: Partial<SourceLimits> = {}, config: Partial<SourceConfig> = {}): ReplicationSource {
  const core = new ReplicationSource({ volume: 'vol', self: 'a', mode: 'sync', limits: { checkpointIntervalMs: 0, ...limits }, ...config });
  core.setMembership(1, ['a', 'b', 'c']);
  for (const peer of ['b', 'c']) {
    core.linkUp(peer, true);
    core.linkUp(peer, false);
    assert.deepEqual(core.receive(peer, ack('ACK', 0)), []);
  }
  return core;
}

/** Effects as short strings, to read like a protocol trace. */
function trace(effects: readonly SourceEffect[]): string[] {
  return effects.map((effect) => {
    switch (effect.kind) {
      case 'appendLocal':
        return `append ${effect.entry.sequence}`;
      case 'syncLocal':
        return `syncLocal ${effect.throughSequence}`;
      case 'send':
        return `${effect.peer}:${effect.message.type} ${effect.message.sequence}`;
      case 'complete':
        return effect.result.ok ? `complete #${effect.operationId}` : `fail #${effect.operationId} ${effect.result.code}`;
      case 'peerNeedsCatchUp':
        return `catchUp ${effect.peer} at ${effect.peerSequence}`;
      case 'peerAhead':
        return `ahead ${effect.peer} at ${effect.peerSequence}`;
      case 'refused':
        return `refused ${effect.code}`;
    }
  });
}

test('[I1] a write completes only once applied locally and ACKed by every in-sync member', () => {
  const core = source();
  const write = data();
  assert.deepEqual(trace(core.write(write)), ['append 1', 'b:WRITE 1', 'c:WRITE 1']);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 1))), []);
  assert.deepEqual(trace(core.localApplied(1)), []);
  assert.deepEqual(trace(core.receive('c', ack('ACK', 1))), [`complete #${write.operationId}`]);
  assert.equal(core.pendingOperations, 0);
});

test('ACKs are cumulative: one ACK completes every write up to it', () => {
  const core = source();
  const writes = [data(), data(), data()];
  for (const write of writes) core.write(write);
  for (let sequence = 1; sequence <= 3; sequence++) core.localApplied(sequence);
  core.receive('b', ack('ACK', 3));
  assert.deepEqual(trace(core.receive('c', ack('ACK', 2))), writes.slice(0, 2).map((write) => `complete #${write.operationId}`));
});

test('FUA: WRITE then SYNC on the same link; completes after the local sync and every SYNC_ACK', () => {
  const core = source();
  const write = data({ fua: true });
  assert.deepEqual(trace(core.write(write)), ['append 1', 'syncLocal 1', 'b:WRITE 1', 'b:SYNC 1', 'c:WRITE 1', 'c:SYNC 1']);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  core.receive('c', ack('ACK', 1));
  core.receive('b', ack('SYNC_ACK', 1));
  core.receive('c', ack('SYNC_ACK', 1));
  assert.deepEqual(trace(core.localSynced(1)), [`complete #${write.operationId}`]);
});

test('FLUSH syncs locally and on every member, requests a consistency point, and completes after every SYNC_ACK', () => {
  const core = source();
  const write = data();
  core.write(write);
  assert.deepEqual(trace(core.flush(900)), ['syncLocal 1', 'b:SYNC 1', 'b:CHECKPOINT 1', 'c:SYNC 1', 'c:CHECKPOINT 1']);
  core.localApplied(1);
  core.localSynced(1);
  core.receive('b', ack('SYNC_ACK', 1));
  assert.deepEqual(trace(core.receive('c', ack('SYNC_ACK', 1))), [`complete #${write.operationId}`, 'complete #900'], 'SYNC_ACK implies ACK');
  assert.deepEqual(trace(core.flush(901)), ['complete #901'], 'nothing new to flush');
});

test('after link news nothing is sent until the peer ACKs its position, then the stream is resent from there', () => {
  const core = source();
  core.write(data());
  core.write(data());
  core.linkDown('b', true);
  assert.deepEqual(trace(core.write(data())), ['append 3', 'c:WRITE 3']);
  core.linkUp('b', true);
  assert.deepEqual(trace(core.write(data())), ['append 4', 'c:WRITE 4'], 'b is not positioned yet');
  // b had received only 1 before its link dropped: resend 2..4, and the outstanding SYNC nowhere.
  assert.deepEqual(trace(core.receive('b', ack('ACK', 1))), ['b:WRITE 2', 'b:WRITE 3', 'b:WRITE 4']);
  assert.equal(core.peer('b')!.nextToSend, 5);
});

test('outstanding SYNC and CHECKPOINT are sent again after a reconnect', () => {
  const core = source();
  core.write(data());
  core.flush(902);
  core.linkDown('b', false); // the reverse direction: its answers may be lost
  core.linkUp('b', false);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 1))), ['b:SYNC 1', 'b:CHECKPOINT 1']);
});

test('a peer that restarted below its acknowledgements holds pending writes back until the resend is ACKed', () => {
  const core = source({ retainedEntriesMax: 100 });
  const write = data();
  core.write(write);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  core.linkDown('c', true);
  core.linkUp('c', true);
  assert.deepEqual(trace(core.receive('c', ack('ACK', 0))), ['c:WRITE 1'], 'it lost entry 1: resent');
  assert.deepEqual(trace(core.receive('c', ack('ACK', 1))), [`complete #${write.operationId}`]);
});

test('a peer below the resend window is reported for catch-up and sent nothing', () => {
  const core = source();
  core.write(data());
  core.localApplied(1);
  for (const peer of ['b', 'c']) core.receive(peer, ack('CHECKPOINT_ACK', 1));
  assert.equal(core.retainedCount, 0, 'checkpointed everywhere: dropped');
  core.write(data());
  core.linkDown('c', true);
  core.linkUp('c', true);
  assert.deepEqual(trace(core.receive('c', ack('ACK', 0))), ['catchUp c at 0']);
});

test('admission is FIFO and bounded by writes in flight; a flush queued behind a write covers it', () => {
  const core = source({ inFlightWritesMax: 1 });
  const [first, second] = [data(), data()];
  assert.deepEqual(trace(core.write(first)), ['append 1', 'b:WRITE 1', 'c:WRITE 1']);
  assert.deepEqual(trace(core.write(second)), [], 'waits');
  assert.deepEqual(trace(core.flush(903)), [], 'waits behind the write');
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  const effects = trace(core.receive('c', ack('ACK', 1)));
  assert.deepEqual(effects, [`complete #${first.operationId}`, 'append 2', 'syncLocal 2', 'b:WRITE 2', 'b:SYNC 2', 'b:CHECKPOINT 2', 'c:WRITE 2', 'c:SYNC 2', 'c:CHECKPOINT 2']);
});

test('the queue of waiting operations is bounded: one more is refused with VOLUME_BUSY', () => {
  const core = source({ inFlightWritesMax: 1, queuedOperationsMax: 2 });
  core.write(data());
  core.write(data());
  core.flush(904);
  assert.deepEqual(trace(core.flush(905)), ['fail #905 VOLUME_BUSY']);
});

test('the resend window bounds admission and asks for a consistency point; CHECKPOINT_ACKs free it', () => {
  const core = source({ retainedEntriesMax: 4, inFlightWritesMax: 10 });
  core.write(data());
  assert.deepEqual(trace(core.write(data())), ['append 2', 'b:WRITE 2', 'b:CHECKPOINT 2', 'c:WRITE 2', 'c:CHECKPOINT 2'], 'half full: a consistency point');
  core.write(data());
  core.write(data());
  const fifth = data();
  assert.deepEqual(trace(core.write(fifth)), [], 'the window is full (one checkpoint outstanding at a time)');
  core.receive('b', ack('CHECKPOINT_ACK', 2));
  assert.deepEqual(trace(core.receive('c', ack('CHECKPOINT_ACK', 2))), ['append 5', 'b:WRITE 5', 'b:CHECKPOINT 5', 'c:WRITE 5', 'c:CHECKPOINT 5'], 'still half full: the next one');
  assert.equal(core.retainedFromSequence, 3);
  assert.equal(core.retainedCount, 3);
});

test('a window full of bytes blocks too, and the blocked write itself asks for the consistency point', () => {
  const core = source({ retainedBytesMax: 20, checkpointRetainedBytes: 20, inFlightWritesMax: 10 });
  core.write(data({ bytes: 12 }));
  assert.deepEqual(trace(core.write(data({ bytes: 12 }))), ['b:CHECKPOINT 1', 'c:CHECKPOINT 1']);
});

test('a consistency point is requested on the timer when there is something new', () => {
  const core = source({ checkpointIntervalMs: 100 });
  assert.deepEqual(trace(core.tick(500)), [], 'nothing written');
  core.write(data());
  assert.deepEqual(trace(core.tick(550)), ['b:CHECKPOINT 1', 'c:CHECKPOINT 1']);
  core.write(data());
  assert.deepEqual(trace(core.tick(600)), [], 'not before the interval');
  assert.deepEqual(trace(core.tick(650)), ['b:CHECKPOINT 2', 'c:CHECKPOINT 2']);
});

test('a member that leaves the in-sync set no longer holds writes back; a new epoch stamps the frames', () => {
  const core = source();
  const write = data();
  core.write(write);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  assert.deepEqual(trace(core.setMembership(2, ['a', 'b'])), [`complete #${write.operationId}`]);
  assert.deepEqual(core.members, ['b']);
  const effects = core.write(data());
  const frame = effects.find((effect) => effect.kind === 'send');
  assert.equal(frame?.kind === 'send' ? frame.message.epoch : -1, 2);
  assert.throws(() => core.setMembership(1, ['a']), /goes back/);
});

test('[I2] acknowledgements of an older epoch are refused and count for nothing', () => {
  const core = source();
  core.write(data());
  core.localApplied(1);
  core.setMembership(2, ['a', 'b', 'c']);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 1, 1))), ['refused REPL_EPOCH_STALE']);
  assert.equal(core.peer('b')!.ackedSeq, 0);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 9, 2))), ['refused REPL_BAD_FRAME'], 'a sequence never sent');
});

test('a new epoch sends outstanding SYNC and CHECKPOINT requests again, stamped with it', () => {
  const core = source();
  core.write(data());
  core.flush(906);
  const effects = core.setMembership(2, ['a', 'b', 'c']);
  assert.deepEqual(trace(effects), ['b:SYNC 1', 'b:CHECKPOINT 1', 'c:SYNC 1', 'c:CHECKPOINT 1']);
  assert.ok(effects.every((effect) => effect.kind === 'send' && effect.message.epoch === 2));
});

test('async mode completes after the local log and bounds how far the slowest member trails', () => {
  const core = source({ asyncLagEntriesMax: 2 }, { mode: 'async' });
  const first = data();
  core.write(first);
  assert.deepEqual(trace(core.localApplied(1)), [`complete #${first.operationId}`]);
  core.write(data());
  assert.deepEqual(trace(core.write(data())), [], 'two entries unacknowledged by c: waits');
  core.receive('b', ack('ACK', 2));
  assert.deepEqual(trace(core.receive('c', ack('ACK', 1))), ['append 3', 'b:WRITE 3', 'c:WRITE 3']);
});

test('the completeBeforeAcks bug switch does what it says (the simulation must catch it)', () => {
  const core = source({}, { bug: 'completeBeforeAcks' });
  const write = data();
  core.write(write);
  assert.deepEqual(trace(core.localApplied(1)), [`complete #${write.operationId}`]);
});

test('a catching-up member owes nothing before it joined, then gets and acknowledges every new entry, starting at its floor', () => {
  const core = source();
  const old = data();
  core.write(old);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  // c left at epoch 2 (write 1 completes without it), wrote on; it returns at epoch 3, catching up.
  assert.deepEqual(trace(core.setMembership(2, ['a', 'b'])), [`complete #${old.operationId}`]);
  for (let i = 0; i < 3; i++) {
    core.write(data());
    core.localApplied(core.lastSequence);
    core.receive('b', ack('ACK', core.lastSequence, 2));
  }
  const inFlight = data();
  core.write(inFlight); // sequence 5: before c joins, still waiting for b
  core.localApplied(5);
  assert.deepEqual(trace(core.setMembership(3, ['a', 'b'], ['c'])), [], 'c is a member now, but owes nothing through 5');
  assert.deepEqual(core.members.sort(), ['b', 'c']);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 5, 3))), [`complete #${inFlight.operationId}`], 'write 5 does not wait for c');
  // c reports where its old stream stood (1): it is positioned at its floor (5), not stranded.
  core.linkDown('c', true);
  core.linkUp('c', true);
  assert.deepEqual(trace(core.receive('c', ack('ACK', 1, 3))), []);
  const next = data();
  const sent = core.write(next);
  assert.deepEqual(trace(sent), ['append 6', 'b:WRITE 6', 'c:WRITE 6']);
  const restartMarks = sent.flatMap((effect) => (effect.kind === 'send' && effect.message.type === 'WRITE' ? [`${effect.peer}:${effect.message.restartsStream === true}`] : []));
  assert.deepEqual(restartMarks, ['b:false', 'c:true'], 'the first frame after the jump says the stream restarts');
  core.localApplied(6);
  core.receive('b', ack('ACK', 6, 3));
  assert.deepEqual(trace(core.receive('c', ack('ACK', 6, 3))), [`complete #${next.operationId}`], 'new writes wait for c');
  assert.deepEqual(core.peer('c')?.checkpointAckedSeq, 5);
});

// ---- found by the failure simulation (src/testing/failure-simulation.ts) ---------------------

test('when this node starts catching up, what its members had not all acknowledged fails, and so does what is still queued', () => {
  const core = source({ inFlightWritesMax: 2 });
  const acked = data();
  core.write(acked);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  assert.deepEqual(trace(core.receive('c', ack('ACK', 1))), [`complete #${acked.operationId}`]);
  const unacked = data();
  const inFlight = data();
  const queued = data();
  core.write(unacked);
  core.write(inFlight);
  core.write(queued); // queued: two writes are in flight
  const flush = nextOperation++;
  core.flush(flush); // queued behind it
  core.localApplied(2);
  core.localApplied(3);
  core.receive('b', ack('ACK', 3)); // c never acknowledges 2 or 3
  // This node left the in-sync set and now joins the catching-up set.
  const effects = trace(core.setMembership(2, ['b', 'c'], ['a']));
  for (const operation of [unacked.operationId, inFlight.operationId, queued.operationId, flush]) {
    assert.ok(effects.includes(`fail #${operation} NBD_EIO`), `#${operation}: ${effects.join(' ')}`);
  }
  assert.ok(!effects.some((effect) => effect.startsWith('append')), 'the queued write never takes a sequence number');
  assert.equal(core.pendingOperations, 0);
  assert.equal(core.lastSequence, 3);
});

test("the 'completePendingOnJoin' bug switch completes them instead (the behaviour before the fix)", () => {
  const core = source({}, { bug: 'completePendingOnJoin' });
  const unacked = data();
  core.write(unacked);
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  assert.deepEqual(trace(core.setMembership(2, ['b', 'c'], ['a'])), [`complete #${unacked.operationId}`]);
});

test("when this node starts catching up, every member's floor moves up to its last sequence, also one that joined earlier", () => {
  const core = source();
  core.setMembership(2, ['a', 'b'], ['c']); // c joins at floor 0
  core.write(data());
  core.localApplied(1);
  core.receive('b', ack('ACK', 1, 2));
  // c has not received entry 1. Now this node leaves (to catch up itself): entry 1 is never owed to c.
  core.setMembership(3, ['b'], ['c', 'a']);
  for (const peer of ['b', 'c']) {
    core.linkDown(peer, true);
    core.linkUp(peer, true);
  }
  assert.deepEqual(trace(core.receive('c', ack('ACK', 0, 3))), [], 'positioned at the floor, nothing resent');
  assert.deepEqual(trace(core.receive('b', ack('ACK', 1, 3))), []);
  const next = data();
  assert.deepEqual(trace(core.write(next)), ['append 2', 'b:WRITE 2', 'c:WRITE 2']);
});

test('a member that moves from the in-sync set to catching up starts at a floor like a new one', () => {
  const core = source();
  core.write(data());
  core.localApplied(1);
  core.receive('b', ack('ACK', 1));
  core.receive('c', ack('ACK', 1));
  core.receive('b', ack('CHECKPOINT_ACK', 1));
  core.receive('c', ack('CHECKPOINT_ACK', 1)); // the window empties: entry 1 is gone
  // c restarted with less than it had (its store lost entry 1) and left to catch up.
  core.setMembership(2, ['a', 'b'], ['c']);
  core.linkDown('c', true);
  core.linkUp('c', true);
  assert.deepEqual(trace(core.receive('c', ack('ACK', 0, 2))), [], 'not stranded below the window: positioned at its floor');
  const next = data();
  const sent = core.write(next);
  const marks = sent.flatMap((effect) => (effect.kind === 'send' && effect.message.type === 'WRITE' ? [`${effect.peer}:${effect.message.restartsStream === true}`] : []));
  assert.deepEqual(marks, ['b:false', 'c:true']);
});

test('a catching-up node skips a peer that lost entries it no longer holds forward instead of stranding it; what that peer lacked fails', () => {
  const core = source();
  core.setMembership(2, ['b', 'c'], ['a']); // this node catches up
  for (const peer of ['b', 'c']) {
    core.linkDown(peer, true);
    core.linkUp(peer, true);
    core.receive(peer, ack('ACK', 0, 2));
  }
  const copy = data();
  core.write(copy); // a catch-up copy
  core.localApplied(1);
  core.receive('b', ack('CHECKPOINT_ACK', 1, 2));
  core.receive('c', ack('ACK', 1, 2));
  const pending = data();
  core.write(pending);
  core.localApplied(2);
  core.receive('b', ack('ACK', 2, 2));
  core.receive('c', ack('CHECKPOINT_ACK', 2, 2)); // the window empties through 2
  // b comes back on a replaced disk: its stream stands at 0, below the window.
  core.linkDown('b', true);
  core.linkUp('b', true);
  const effects = trace(core.receive('b', ack('ACK', 0, 2)));
  assert.ok(!effects.some((effect) => effect.startsWith('catchUp')), effects.join(' '));
  const next = data();
  const sent = core.write(next);
  const marks = sent.flatMap((effect) => (effect.kind === 'send' && effect.message.type === 'WRITE' ? [`${effect.peer}:${effect.message.restartsStream === true}`] : []));
  assert.deepEqual(marks, ['b:true', 'c:false'], 'b restarts at the next entry');
});

test("the 'strandPeersWhileCatchingUp' bug switch strands it instead (the behaviour before the fix)", () => {
  const core = source({}, { bug: 'strandPeersWhileCatchingUp' });
  core.setMembership(2, ['b', 'c'], ['a']);
  for (const peer of ['b', 'c']) {
    core.linkDown(peer, true);
    core.linkUp(peer, true);
    core.receive(peer, ack('ACK', 0, 2));
  }
  core.write(data());
  core.localApplied(1);
  core.receive('b', ack('CHECKPOINT_ACK', 1, 2));
  core.receive('c', ack('CHECKPOINT_ACK', 1, 2));
  core.linkDown('b', true);
  core.linkUp('b', true);
  assert.deepEqual(trace(core.receive('b', ack('ACK', 0, 2))), ['catchUp b at 0']);
});
