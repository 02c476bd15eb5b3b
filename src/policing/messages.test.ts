// Proves the policing messages map onto the replication codec's GRANT_* frames and back (GRANT_REFUSED and DRAINED as generation 0), survive a real encode/decode, and are routed to the right state machine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameDecoder, encodeFrame, type GrantMessage, type ReplicationMessage } from '../replication/codec.js';
import { fromWireGrantMessage, policingRecipient, toWireGrantMessage, type PolicingMessage } from './messages.js';

function isGrantMessage(message: ReplicationMessage): message is GrantMessage {
  return message.type === 'GRANT_REQUEST' || message.type === 'GRANT' || message.type === 'REVOKE' || message.type === 'RELEASE';
}

const base = { volume: 'vol', epoch: 7, region: 3 };
const messages: PolicingMessage[] = [
  { ...base, type: 'GRANT_REQUEST', generation: 0 },
  { ...base, type: 'GRANT_REQUEST', generation: 4 },
  { ...base, type: 'GRANT', generation: 5 },
  { ...base, type: 'REVOKE', generation: 5 },
  { ...base, type: 'RELEASE', generation: 5 },
  { ...base, type: 'GRANT_REFUSED', generation: 0 },
  { volume: 'vol', epoch: 7, type: 'DRAINED', region: 0, generation: 0 },
];

test('every policing message maps to a codec GrantMessage and back unchanged', () => {
  for (const message of messages) assert.deepEqual(fromWireGrantMessage(toWireGrantMessage(message)), message);
  assert.equal(toWireGrantMessage(messages[5]!).type, 'GRANT');
  assert.equal(toWireGrantMessage(messages[6]!).type, 'RELEASE');
});

test('every policing message survives the replication codec', () => {
  for (const message of messages) {
    const decoder = new FrameDecoder();
    for (const part of encodeFrame(toWireGrantMessage(message))) decoder.push(part);
    const decoded = decoder.next();
    assert.ok(decoded !== undefined && isGrantMessage(decoded), `decoded ${decoded?.type}`);
    assert.equal(decoder.next(), undefined);
    assert.deepEqual(fromWireGrantMessage(decoded), message);
  }
});

test('routing: requests and releases to the arbiter, grants and revokes to the holder, DRAINED by whether this node arbitrates its epoch', () => {
  const never = () => false;
  assert.deepEqual(messages.map((message) => policingRecipient(message, never)), ['arbiter', 'arbiter', 'holder', 'holder', 'arbiter', 'holder', 'holder']);
  assert.equal(policingRecipient(messages[6]!, (epoch) => epoch === 7), 'arbiter');
});
