// Proves the destination core on its own: it accepts only the expected sequence (duplicates
// re-ACKed and never applied, gaps refused with resyncNeeded), applies and ACKs on receipt,
// spills its bounded partition when full and on SYNC, answers SYNC_ACK only after the
// container is durable, runs checkpoints through the shell before CHECKPOINT_ACK, reports its
// position on every linkUp, and refuses stale epochs without applying anything (I2).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ENTRY_TYPE } from '../../journal/entry.js';
import type { WriteMessage } from '../codec.js';
import { ReplicationTarget, type TargetEffect } from './target.js';

const base = { volume: 'vol', epoch: 3, source: 'a' } as const;

function write(sequence: number, options: { epoch?: number; bytes?: number } = {}): WriteMessage {
  const payload = Buffer.alloc(options.bytes ?? 8, sequence);
  return { type: 'WRITE', ...base, epoch: options.epoch ?? base.epoch, sequence, entryType: ENTRY_TYPE.WRITE, offset: sequence * 8, lengthBytes: payload.length, payload };
}
const seq = (type: 'SYNC' | 'CHECKPOINT', sequence: number, epoch: number = base.epoch) => ({ type, volume: base.volume, source: base.source, epoch, sequence });

function target(limits: { partitionEntriesMax?: number; partitionBytesMax?: number } = {}, recovered = { durableSequence: 0, checkpointSequence: 0 }): ReplicationTarget {
  return new ReplicationTarget({ volume: 'vol', self: 'b', source: 'a', epoch: 3, limits }, recovered);
}

/** Effects as short strings, to read like a protocol trace. */
function trace(effects: readonly TargetEffect[]): string[] {
  return effects.map((effect) => {
    switch (effect.kind) {
      case 'apply':
        return `apply ${effect.entry.sequence}`;
      case 'appendToContainer':
        return `append [${effect.entries.map((entry) => entry.sequence).join(',')}]${effect.sync ? ` sync ${effect.throughSequence}` : ''}`;
      case 'checkpoint':
        return `checkpoint ${effect.sequence}`;
      case 'send':
        return `${effect.message.type} ${effect.message.sequence}`;
      case 'resyncNeeded':
        return 'resync';
      case 'rebase':
        return `rebase ${effect.throughSequence}`;
      case 'refused':
        return `refused ${effect.code}`;
    }
  });
}

test('an in-order WRITE is applied and ACKed at once; the payload is copied out of the frame', () => {
  const core = target();
  const frame = write(1);
  const effects = core.receive(frame);
  assert.deepEqual(trace(effects), ['apply 1', 'ACK 1']);
  frame.payload.fill(0xff); // the socket chunk is reused
  const applied = effects[0]!.kind === 'apply' ? effects[0]!.entry.payload : Buffer.alloc(0);
  assert.deepEqual(applied, Buffer.alloc(8, 1));
  assert.equal(core.receivedSequence, 1);
});

test('a duplicate is re-ACKed with the current position and not applied; a gap asks for a resync', () => {
  const core = target();
  core.receive(write(1));
  core.receive(write(2));
  assert.deepEqual(trace(core.receive(write(1))), ['ACK 2']);
  assert.deepEqual(trace(core.receive(write(4))), ['resync']);
  assert.equal(core.receivedSequence, 2, 'nothing of the gap was taken');
  assert.deepEqual(trace(core.receive(write(3))), ['apply 3', 'ACK 3']);
});

test('every linkUp reports where the stream stands, from the recovered durable point after a restart', () => {
  assert.deepEqual(trace(target({}, { durableSequence: 17, checkpointSequence: 9 }).linkUp()), ['ACK 17']);
  const core = target();
  core.receive(write(1));
  assert.deepEqual(trace(core.linkUp()), ['ACK 1']);
});

test('the partition spills to the container when full, without a sync', () => {
  const core = target({ partitionEntriesMax: 2 });
  assert.deepEqual(trace(core.receive(write(1))), ['apply 1', 'ACK 1']);
  assert.deepEqual(trace(core.receive(write(2))), ['apply 2', 'ACK 2', 'append [1,2]']);
  assert.equal(core.partitionEntries, 0);
  const bytesCore = target({ partitionBytesMax: 20 });
  assert.deepEqual(trace(bytesCore.receive(write(1, { bytes: 12 }))), ['apply 1', 'ACK 1']);
  assert.deepEqual(trace(bytesCore.receive(write(2, { bytes: 12 }))), ['apply 2', 'ACK 2', 'append [1,2]']);
});

test('SYNC spills and syncs; SYNC_ACK leaves only once the container is durable', () => {
  const core = target();
  core.receive(write(1));
  core.receive(write(2));
  assert.deepEqual(trace(core.receive(seq('SYNC', 2))), ['append [1,2] sync 2']);
  core.receive(write(3));
  assert.deepEqual(trace(core.receive(seq('SYNC', 3))), ['append [3] sync 3']);
  assert.deepEqual(trace(core.containerSynced(2)), ['SYNC_ACK 2']);
  assert.equal(core.durableSequence, 2);
  assert.deepEqual(trace(core.containerSynced(3)), ['SYNC_ACK 3']);
  assert.deepEqual(trace(core.receive(seq('SYNC', 3))), ['SYNC_ACK 3'], 'already durable: answered at once');
  assert.throws(() => core.containerSynced(4), /beyond what was spilled/);
});

test('a SYNC never claims more than was received', () => {
  const core = target();
  core.receive(write(1));
  assert.deepEqual(trace(core.receive(seq('SYNC', 5))), ['append [1] sync 1']);
  assert.deepEqual(trace(core.containerSynced(1)), ['SYNC_ACK 1']);
});

test('CHECKPOINT goes through the shell; its ACK follows completion, and the partition forgets what the image holds', () => {
  const core = target();
  for (let sequence = 1; sequence <= 4; sequence++) core.receive(write(sequence));
  assert.deepEqual(trace(core.receive(seq('CHECKPOINT', 3))), ['checkpoint 3']);
  assert.deepEqual(trace(core.receive(seq('CHECKPOINT', 3))), [], 'a resend while it runs adds nothing');
  assert.deepEqual(trace(core.checkpointDone(3)), ['CHECKPOINT_ACK 3']);
  assert.equal(core.partitionEntries, 1);
  assert.equal(core.checkpointSequence, 3);
  assert.deepEqual(trace(core.receive(seq('SYNC', 4))), ['append [4] sync 4'], 'the container continues after the checkpoint');
  assert.deepEqual(trace(core.receive(seq('CHECKPOINT', 2))), ['CHECKPOINT_ACK 3'], 'an old checkpoint is answered from the record');
});

test('a checkpoint also answers a SYNC it covers', () => {
  const core = target();
  core.receive(write(1));
  core.receive(write(2));
  core.receive(seq('SYNC', 2));
  core.receive(seq('CHECKPOINT', 2));
  assert.deepEqual(trace(core.checkpointDone(2)), ['CHECKPOINT_ACK 2', 'SYNC_ACK 2']);
});

test('[I2] frames of an older epoch are refused and never applied; a newer epoch is adopted', () => {
  const core = target();
  assert.deepEqual(trace(core.receive(write(1, { epoch: 2 }))), ['refused REPL_EPOCH_STALE', 'resync']);
  assert.deepEqual(trace(core.receive(seq('SYNC', 1, 2))), ['refused REPL_EPOCH_STALE', 'resync']);
  assert.equal(core.receivedSequence, 0);
  assert.deepEqual(trace(core.receive(write(1, { epoch: 4 }))), ['ACK 0', 'SYNC_ACK 0', 'CHECKPOINT_ACK 0', 'apply 1', 'ACK 1'], 'adopted, with a re-announcement');
  assert.equal(core.epoch, 4);
  assert.deepEqual(trace(core.receive(write(2, { epoch: 3 }))), ['refused REPL_EPOCH_STALE', 'resync']);
  assert.equal(core.receivedSequence, 1);
});

test('a new epoch from the coordinator re-announces position, durable point and checkpoint at that epoch', () => {
  const core = target({}, { durableSequence: 5, checkpointSequence: 2 });
  core.receive(write(6));
  const effects = core.setEpoch(5);
  assert.deepEqual(trace(effects), ['ACK 6', 'SYNC_ACK 5', 'CHECKPOINT_ACK 2']);
  assert.ok(effects.every((effect) => effect.kind === 'send' && effect.message.epoch === 5));
  assert.deepEqual(core.setEpoch(5), [], 'the same epoch again: nothing');
  assert.deepEqual(trace(core.receive(write(7, { epoch: 4 }))), ['refused REPL_EPOCH_STALE', 'resync']);
  assert.throws(() => core.setEpoch(4), /goes back/);
});

test('a frame of another stream is refused', () => {
  const core = target();
  assert.deepEqual(trace(core.receive({ ...write(1), source: 'c' })), ['refused REPL_BAD_FRAME']);
  assert.deepEqual(trace(core.receive({ ...write(1), volume: 'other' })), ['refused REPL_BAD_FRAME']);
});

test('a gap the source marks as a stream restart is a rebase (nothing taken), the stream then continues after it; an unmarked gap is a resync', () => {
  const core = target({}, { durableSequence: 5, checkpointSequence: 3 });
  assert.deepEqual(trace(core.receive(write(40))), ['resync'], 'a gap the source did not mark is a lost frame, never a rebase');
  assert.deepEqual(trace(core.receive({ ...write(40), restartsStream: true })), ['rebase 39']);
  assert.equal(core.receivedSequence, 5, 'the rebase frame changed nothing yet');
  assert.deepEqual(trace(core.rebased(39)), ['ACK 39', 'SYNC_ACK 39', 'CHECKPOINT_ACK 39']);
  assert.deepEqual(trace(core.receive(write(40))), ['apply 40', 'ACK 40']);
  assert.deepEqual(trace(core.receive(seq('SYNC', 40))), ['append [40] sync 40']);
  // A later unmarked gap is an error again.
  assert.deepEqual(trace(core.receive(write(45))), ['resync']);
});
