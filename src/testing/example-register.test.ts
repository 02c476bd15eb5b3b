// Proves the example register's pieces on their own: the log codec keeps exactly the valid
// prefix (every split point, corrupt and out-of-order records), and the state machine persists
// before it sends, commits only what every backup made durable, recovers from its backups
// before serving, and treats resends as duplicates.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  REGISTER_RECORD_BYTES,
  RegisterReplica,
  decodeRegisterLog,
  encodeRegisterRecord,
  type RegisterEffect,
  type RegisterEntry,
  type RegisterMessage,
} from './example-register.js';

const entries: RegisterEntry[] = Array.from({ length: 5 }, (_, index) => ({ seq: index + 1, block: index % 3, tag: 100 + index }));
const logBytes = Buffer.concat(entries.map(encodeRegisterRecord));

test('the log decodes to its entries, and every prefix to its whole records with the tail cut', () => {
  assert.deepEqual(decodeRegisterLog(logBytes), { entries, validBytes: logBytes.length, cutReason: undefined });
  for (let length = 0; length <= logBytes.length; length++) {
    const decoded = decodeRegisterLog(logBytes.subarray(0, length));
    const whole = Math.floor(length / REGISTER_RECORD_BYTES);
    assert.deepEqual(decoded.entries, entries.slice(0, whole), `prefix of ${length} bytes`);
    assert.equal(decoded.validBytes, whole * REGISTER_RECORD_BYTES);
    assert.equal(decoded.cutReason === undefined, length % REGISTER_RECORD_BYTES === 0);
  }
});

test('a flipped bit anywhere in a record cuts the log at that record (I5)', () => {
  for (let bit = 0; bit < REGISTER_RECORD_BYTES * 8; bit++) {
    const damaged = Buffer.from(logBytes);
    const offset = 2 * REGISTER_RECORD_BYTES + (bit >> 3);
    damaged[offset] = damaged[offset]! ^ (1 << (bit & 7));
    const decoded = decodeRegisterLog(damaged);
    assert.deepEqual(decoded.entries, entries.slice(0, 2), `bit ${bit}`);
    assert.match(decoded.cutReason ?? '', /bad (magic|crc) at 40/);
  }
});

test('a valid record out of sequence cuts the log', () => {
  const skipped = Buffer.concat([encodeRegisterRecord(entries[0]!), encodeRegisterRecord(entries[2]!)]);
  const decoded = decodeRegisterLog(skipped);
  assert.deepEqual(decoded.entries, [entries[0]]);
  assert.match(decoded.cutReason ?? '', /sequence 3 at 20, expected 2/);
});

const config = { primary: 'p', backups: ['b1', 'b2'], blocks: 3 } as const;
const sends = (effects: RegisterEffect[]) =>
  effects.filter((effect) => effect.kind === 'send').map((effect) => (effect.kind === 'send' ? `${effect.target}:${effect.message.kind}` : ''));
const up = (source: string, target: string) => ({ source, target });

/** A primary brought to 'active' with both backups holding `held` entries. */
function activePrimary(held: RegisterEntry[] = [], bug: 'none' | 'ackBeforeReplicated' = 'none'): RegisterReplica {
  const primary = new RegisterReplica({ ...config, self: 'p', bug }, held);
  for (const backup of config.backups) {
    assert.deepEqual(sends(primary.receive(backup, { kind: 'hello', durableSeq: held.length })), [`${backup}:fetch`]);
  }
  primary.receive('b1', { kind: 'log', entries: held, durableSeq: held.length });
  assert.equal(primary.active, false, 'waits for every backup');
  primary.receive('b2', { kind: 'log', entries: held, durableSeq: held.length });
  assert.equal(primary.active, true);
  return primary;
}

test('a recovering primary refuses clients until every backup has told it its log', () => {
  const primary = new RegisterReplica({ ...config, self: 'p' }, []);
  assert.deepEqual(primary.clientWrite(1, 0, 7), [{ kind: 'reply', request: 1, reply: { ok: false, reason: 'unavailable' } }]);
  assert.deepEqual(primary.clientRead(2, 0), [{ kind: 'reply', request: 2, reply: { ok: false, reason: 'unavailable' } }]);
  activePrimary();
});

test('a write is persisted before it is sent, and answered only once every backup made it durable', () => {
  const primary = activePrimary();
  const write = primary.clientWrite(10, 1, 42);
  assert.deepEqual(write, [{ kind: 'persist', entries: [{ seq: 1, block: 1, tag: 42 }] }], 'nothing is sent before the local log has it');
  assert.deepEqual(sends(primary.persisted(1)), ['b1:append', 'b2:append']);
  assert.deepEqual(primary.receive('b1', { kind: 'ack', seq: 1 }), []);
  assert.deepEqual(primary.clientRead(11, 1), [{ kind: 'reply', request: 11, reply: { ok: true, value: 0 } }], 'uncommitted: not visible');
  assert.deepEqual(primary.receive('b2', { kind: 'ack', seq: 1 }), [{ kind: 'reply', request: 10, reply: { ok: true } }]);
  assert.deepEqual(primary.clientRead(12, 1), [{ kind: 'reply', request: 12, reply: { ok: true, value: 42 } }]);
  assert.equal(primary.commitSeq, 1);
});

test('the ackBeforeReplicated bug answers without the backups (what the simulator must catch)', () => {
  const primary = activePrimary([], 'ackBeforeReplicated');
  primary.clientWrite(10, 0, 42);
  const effects = primary.persisted(1);
  assert.ok(effects.some((effect) => effect.kind === 'reply' && effect.request === 10));
});

test('a restarted primary adopts the longest log and serves no read until all of it is committed again', () => {
  const primary = new RegisterReplica({ ...config, self: 'p' }, entries.slice(0, 2));
  primary.receive('b1', { kind: 'hello', durableSeq: 4 });
  primary.receive('b2', { kind: 'hello', durableSeq: 3 });
  primary.receive('b1', { kind: 'log', entries: entries.slice(0, 4), durableSeq: 4 });
  const adopted = primary.receive('b2', { kind: 'log', entries: entries.slice(0, 3), durableSeq: 3 });
  assert.deepEqual(adopted, [{ kind: 'persist', entries: entries.slice(2, 4) }]);
  assert.equal(primary.lastSeq, 4);
  assert.deepEqual(primary.clientRead(5, 0), [], 'queued, not answered from a possibly stale state');
  assert.deepEqual(sends(primary.persisted(4)), ['b2:append']);
  const answered = primary.receive('b2', { kind: 'ack', seq: 4 });
  // Entry 4 wrote tag 103 to block 0.
  assert.deepEqual(answered, [{ kind: 'reply', request: 5, reply: { ok: true, value: 103 } }]);
});

test('a forked history is refused loudly', () => {
  const primary = new RegisterReplica({ ...config, self: 'p' }, entries.slice(0, 2));
  primary.receive('b1', { kind: 'log', entries: [entries[0]!, { seq: 2, block: 0, tag: 999 }], durableSeq: 2 });
  assert.throws(() => primary.receive('b2', { kind: 'log', entries: [], durableSeq: 0 }), /history forked at sequence 2/);
});

test('a backup says hello on every link to the primary, appends in order, and never applies a resend twice', () => {
  const backup = new RegisterReplica({ ...config, self: 'b1' }, entries.slice(0, 1));
  assert.deepEqual(backup.linkUp(up('b1', 'p')), [{ kind: 'send', target: 'p', message: { kind: 'hello', durableSeq: 1 } }]);
  assert.deepEqual(backup.linkUp(up('p', 'b1')), [{ kind: 'send', target: 'p', message: { kind: 'hello', durableSeq: 1 } }]);
  assert.deepEqual(backup.linkUp(up('b1', 'b2')), []);
  const append = (entry: RegisterEntry): RegisterMessage => ({ kind: 'append', entry });
  assert.deepEqual(backup.receive('p', append(entries[1]!)), [{ kind: 'persist', entries: [entries[1]] }]);
  assert.deepEqual(backup.receive('p', append(entries[1]!)), [], 'in flight to disk: the ack will follow');
  assert.deepEqual(backup.receive('p', append(entries[3]!)), [], 'a gap is ignored');
  assert.equal(backup.gapsIgnored, 1);
  assert.deepEqual(backup.persisted(2), [{ kind: 'send', target: 'p', message: { kind: 'ack', seq: 2 } }]);
  assert.deepEqual(backup.receive('p', append(entries[0]!)), [{ kind: 'send', target: 'p', message: { kind: 'ack', seq: 2 } }], 'a durable duplicate is re-acknowledged');
  assert.throws(() => backup.receive('p', append({ seq: 1, block: 2, tag: 5 })), /differs/);
  assert.deepEqual(backup.receive('p', { kind: 'fetch' }), [{ kind: 'send', target: 'p', message: { kind: 'log', entries: entries.slice(0, 2), durableSeq: 2 } }]);
  assert.deepEqual(backup.logImage(), Buffer.from(new Uint32Array([100, 101, 0]).buffer));
});
