// Proves the segment header codec: round trips of every field up to their limits, refusal to
// encode what could not be decoded, and that any damage (every bit flip, zeros, a short
// buffer) decodes as "no header", never as a different valid header.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SEGMENT_HEADER_BYTES, decodeSegmentHeader, encodeSegmentHeader, type SegmentHeader } from './segment.js';

const SAMPLE: SegmentHeader = { firstSequence: 123_456_789_012, capacityBytes: 64 * 1024 * 1024, generation: 0xfeed_f00d, zeroTail: true };

test('segment headers round-trip, at an offset too', () => {
  for (const header of [
    SAMPLE,
    { ...SAMPLE, zeroTail: false, capacityBytes: 0 },
    { firstSequence: Number.MAX_SAFE_INTEGER, capacityBytes: Number.MAX_SAFE_INTEGER, generation: 1, zeroTail: false },
  ]) {
    const encoded = encodeSegmentHeader(header);
    assert.equal(encoded.length, SEGMENT_HEADER_BYTES);
    assert.deepEqual(decodeSegmentHeader(encoded), { ok: true, header });
    assert.deepEqual(decodeSegmentHeader(Buffer.concat([Buffer.alloc(5), encoded]), 5), { ok: true, header });
  }
});

test('encodeSegmentHeader refuses headers that could not be decoded', () => {
  assert.throws(() => encodeSegmentHeader({ ...SAMPLE, generation: 0 }), /generation/);
  assert.throws(() => encodeSegmentHeader({ ...SAMPLE, generation: 2 ** 32 }), /generation/);
  assert.throws(() => encodeSegmentHeader({ ...SAMPLE, firstSequence: 0 }), /firstSequence/);
  assert.throws(() => encodeSegmentHeader({ ...SAMPLE, capacityBytes: 16 }), /capacityBytes/);
});

test('zeros, short input and every single bit flip read as no header', () => {
  assert.equal(decodeSegmentHeader(Buffer.alloc(SEGMENT_HEADER_BYTES)).ok, false);
  const encoded = encodeSegmentHeader(SAMPLE);
  assert.equal(decodeSegmentHeader(encoded.subarray(0, SEGMENT_HEADER_BYTES - 1)).ok, false);
  for (let bit = 0; bit < SEGMENT_HEADER_BYTES * 8; bit++) {
    const damaged = Buffer.from(encoded);
    damaged[bit >> 3] = damaged[bit >> 3]! ^ (1 << (bit & 7));
    assert.equal(decodeSegmentHeader(damaged).ok, false, `bit ${bit}`);
  }
});
