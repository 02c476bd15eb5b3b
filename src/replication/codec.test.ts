// Proves the replication codec round-trips every message type however the bytes are split, hands WRITE payloads on without copying, detects every flipped bit, and refuses garbage and oversized frames with MirrorsanErrors only, without buffering past its caps.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { ENTRY_TYPE } from '../journal/entry.js';
import { crc32c } from '../util/crc32c.js';
import { isHandedOver } from '../util/payload-copy.js';
import {
  ERROR_MESSAGE_BYTES_MAX,
  FRAME_BODY_MAX_BYTES,
  FRAME_HEADER_BYTES,
  FRAME_MAGIC,
  FrameDecoder,
  MESSAGE_TYPE,
  NAME_BYTES_MAX,
  NONCE_BYTES,
  PROTOCOL_VERSION,
  WRITE_PAYLOAD_MAX_BYTES,
  bodyMaxBytesOf,
  encodeFrame,
  frameLengthBytes,
} from './codec.js';
import type { MessageType, ReplicationMessage, WireEntryType } from './codec.js';

const MAX_U64 = Number.MAX_SAFE_INTEGER;

function frameBytes(message: ReplicationMessage): Buffer {
  return Buffer.concat(encodeFrame(message));
}

/** Decodes `chunks` fed one by one, pulling every message after each push. */
function decodeChunks(chunks: readonly Buffer[], decoder = new FrameDecoder()): ReplicationMessage[] {
  const messages: ReplicationMessage[] = [];
  for (const chunk of chunks) {
    decoder.push(chunk);
    for (let m = decoder.next(); m !== undefined; m = decoder.next()) messages.push(m);
  }
  return messages;
}

/** A frame with a correct CRC around any body: for malformed-but-checksummed cases. */
function rawFrame(typeId: number, body: Buffer, options: { version?: number; flags?: number; bodyLength?: number } = {}): Buffer {
  const header = Buffer.alloc(FRAME_HEADER_BYTES);
  header.writeUInt32BE(FRAME_MAGIC, 0);
  header.writeUInt8(options.version ?? PROTOCOL_VERSION, 4);
  header.writeUInt8(typeId, 5);
  header.writeUInt16BE(options.flags ?? 0, 6);
  header.writeUInt32BE(options.bodyLength ?? body.length, 8);
  header.writeUInt32BE(crc32c(body, crc32c(header.subarray(0, 12))), 12);
  return Buffer.concat([header, body]);
}

function expectCode(run: () => unknown, code: string): MirrorsanError {
  let caught: unknown;
  try {
    run();
  } catch (error) {
    caught = error;
  }
  assert.ok(isMirrorsanError(caught), `expected a MirrorsanError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  return caught;
}

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) bytes[i] = (i * 31 + seed) & 0xff;
  return bytes;
}

const nonce = pattern(NONCE_BYTES, 7);
const longName = 'v'.repeat(NAME_BYTES_MAX);

/** At least one of every message type, with edge values. */
const SAMPLES: ReplicationMessage[] = [
  { type: 'HELLO', protocolVersion: PROTOCOL_VERSION, clusterId: 'prod', nodeId: 'n1', nonce },
  { type: 'HELLO', protocolVersion: 0xffff, clusterId: longName, nodeId: 'nœud-Ω', nonce: Buffer.alloc(NONCE_BYTES, 0xff) },
  { type: 'AUTH', hmac: pattern(32, 3) },
  { type: 'WRITE', volume: 'vol0', epoch: 3, source: 'n1', sequence: 1, entryType: ENTRY_TYPE.WRITE, offset: 4096, lengthBytes: 100, payload: pattern(100, 1) },
  { type: 'WRITE', volume: longName, epoch: MAX_U64, source: longName, sequence: MAX_U64, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 1, payload: Buffer.from([0x4d]) },
  { type: 'WRITE', volume: 'vol0', epoch: 0, source: 'n2', sequence: 2, entryType: ENTRY_TYPE.ZERO, offset: 2 ** 40, lengthBytes: 2 ** 30, payload: Buffer.alloc(0) },
  { type: 'WRITE', volume: 'vol0', epoch: 1, source: 'n2', sequence: 3, entryType: ENTRY_TYPE.TRIM, offset: MAX_U64 - 1, lengthBytes: 1, payload: Buffer.alloc(0) },
  // The first frame after a catch-up floor: the restart marker rides in the entry type byte.
  { type: 'WRITE', volume: 'vol0', epoch: 4, source: 'n3', sequence: 70, entryType: ENTRY_TYPE.ZERO, offset: 8192, lengthBytes: 4096, payload: Buffer.alloc(0), restartsStream: true },
  { type: 'ACK', volume: 'vol0', epoch: 3, source: 'n1', sequence: 0 },
  { type: 'SYNC', volume: 'vol0', epoch: 3, source: 'n1', sequence: 17 },
  { type: 'SYNC_ACK', volume: 'vol0', epoch: 3, source: 'n1', sequence: MAX_U64 },
  { type: 'CHECKPOINT', volume: 'vol0', epoch: 4, source: 'n3', sequence: 99 },
  { type: 'CHECKPOINT_ACK', volume: 'vol0', epoch: 4, source: 'n3', sequence: 99 },
  { type: 'GRANT_REQUEST', volume: 'vol0', epoch: 5, region: 0, generation: 0 },
  { type: 'GRANT', volume: 'vol0', epoch: 5, region: 12, generation: 1 },
  { type: 'REVOKE', volume: 'vol0', epoch: 5, region: 12, generation: 1 },
  { type: 'RELEASE', volume: 'vol0', epoch: 5, region: MAX_U64, generation: MAX_U64 },
  { type: 'PING', timestampMs: 1_700_000_000_000 },
  { type: 'PONG', timestampMs: 0 },
  { type: 'REGION_REQUEST', volume: 'vol0', epoch: 6, requestId: 1, kind: 'digests', offset: 0, lengthBytes: 16 * 1024 * 1024, chunkBytes: 1024 * 1024 },
  { type: 'REGION_REQUEST', volume: longName, epoch: MAX_U64, requestId: MAX_U64, kind: 'read', offset: MAX_U64 - 1, lengthBytes: 1, chunkBytes: 0 },
  { type: 'REGION_REQUEST', volume: 'vol0', epoch: 9, requestId: 2, kind: 'dirty', offset: 7, lengthBytes: 0, chunkBytes: 1024 * 1024 },
  { type: 'REGION_REPLY', volume: 'vol0', epoch: 6, requestId: 1, ok: true, data: pattern(16 * 16, 5) },
  { type: 'REGION_REPLY', volume: 'vol0', epoch: 6, requestId: 2, ok: false, data: Buffer.from('volume vol0 is not in sync here') },
  { type: 'ERROR', code: 'REPL_EPOCH_STALE', message: 'volume vol0 epoch 2 is older than 3' },
  { type: 'ERROR', code: 'X', message: '' },
];

describe('replication codec: round trips', () => {
  it('covers every message type', () => {
    const covered = new Set(SAMPLES.map((m) => m.type));
    assert.deepEqual([...covered].sort(), (Object.keys(MESSAGE_TYPE) as MessageType[]).sort());
  });

  it('decodes every message type to what was encoded, from one chunk', () => {
    for (const message of SAMPLES) {
      const parts = encodeFrame(message);
      assert.deepEqual(decodeChunks([Buffer.concat(parts)]), [message], message.type);
      assert.equal(frameLengthBytes(parts), Buffer.concat(parts).length);
    }
  });

  it('passes a WRITE payload through as its own buffer, never copied', () => {
    const payload = pattern(8192, 5);
    const parts = encodeFrame({ type: 'WRITE', volume: 'v', epoch: 1, source: 'n1', sequence: 1, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: payload.length, payload });
    assert.equal(parts.length, 2);
    assert.equal(parts[1], payload);
    assert.equal(encodeFrame({ type: 'PING', timestampMs: 1 }).length, 1);
  });

  it('decodes the same messages at every split point of every frame', () => {
    for (const message of SAMPLES) {
      const bytes = frameBytes(message);
      for (let cut = 0; cut <= bytes.length; cut++) {
        const decoded = decodeChunks([bytes.subarray(0, cut), bytes.subarray(cut)]);
        assert.deepEqual(decoded, [message], `${message.type} cut at ${cut}`);
      }
    }
  });

  it('decodes the whole sample stream fed one byte at a time', () => {
    const stream = Buffer.concat(SAMPLES.map(frameBytes));
    const bytes = Array.from({ length: stream.length }, (_, i) => stream.subarray(i, i + 1));
    assert.deepEqual(decodeChunks(bytes), SAMPLES);
  });

  it('decodes every split point of a two-frame stream (boundaries between frames)', () => {
    const a = SAMPLES[3]!;
    const b = SAMPLES[7]!;
    const stream = Buffer.concat([frameBytes(a), frameBytes(b)]);
    for (let i = 0; i <= stream.length; i++) {
      for (let j = i; j <= stream.length; j += 7) {
        const chunks = [stream.subarray(0, i), stream.subarray(i, j), stream.subarray(j)];
        assert.deepEqual(decodeChunks(chunks), [a, b], `cuts ${i},${j}`);
      }
    }
  });

  it('hands the payload on as a view of the chunk it lies in, and copies it once when it spans chunks', () => {
    const payload = pattern(4096, 9);
    const message: ReplicationMessage = { type: 'WRITE', volume: 'v', epoch: 1, source: 'n1', sequence: 1, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 4096, payload };
    const [head, body] = encodeFrame(message) as [Buffer, Buffer];
    const whole = Buffer.concat([head, body]);
    // All in one chunk: a view.
    const [one] = decodeChunks([whole]) as [Extract<ReplicationMessage, { type: 'WRITE' }>];
    assert.equal(one.payload.buffer, whole.buffer);
    // Header and fields in one chunk, the payload alone in the next: still a view.
    const payloadChunk = Buffer.from(body);
    const [two] = decodeChunks([head, payloadChunk]) as [Extract<ReplicationMessage, { type: 'WRITE' }>];
    assert.equal(two.payload.buffer, payloadChunk.buffer);
    assert.equal(two.payload.byteOffset, payloadChunk.byteOffset);
    // Spanning two chunks: one exact-size copy, equal bytes.
    const cut = head.length + 1000;
    const [three] = decodeChunks([whole.subarray(0, cut), whole.subarray(cut)]) as [Extract<ReplicationMessage, { type: 'WRITE' }>];
    assert.notEqual(three.payload.buffer, whole.buffer);
    assert.equal(three.payload.length, 4096);
    assert.ok(three.payload.equals(payload));
    // Only that copy is handed over (a holder may keep it without copying); views are not.
    assert.ok(isHandedOver(three.payload));
    assert.ok(!isHandedOver(one.payload) && !isHandedOver(two.payload));
  });

  it('round-trips a maximum-size WRITE in 64 KiB chunks', () => {
    const payload = pattern(WRITE_PAYLOAD_MAX_BYTES, 11);
    const message: ReplicationMessage = { type: 'WRITE', volume: longName, epoch: 9, source: longName, sequence: 5, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: payload.length, payload };
    const stream = Buffer.concat(encodeFrame(message));
    assert.ok(stream.length - FRAME_HEADER_BYTES <= FRAME_BODY_MAX_BYTES);
    const chunks: Buffer[] = [];
    for (let at = 0; at < stream.length; at += 65536) chunks.push(stream.subarray(at, at + 65536));
    const decoder = new FrameDecoder();
    const [decoded] = decodeChunks(chunks, decoder) as [Extract<ReplicationMessage, { type: 'WRITE' }>];
    assert.ok(decoded.payload.equals(payload));
    assert.ok(decoder.atFrameBoundary);
    assert.equal(decoder.bufferedBytes, 0);
  });

  it('cuts a long ERROR message at a character boundary', () => {
    const text = 'é'.repeat(ERROR_MESSAGE_BYTES_MAX); // 2 bytes each: cut in the middle of the string
    const [decoded] = decodeChunks([frameBytes({ type: 'ERROR', code: 'C', message: text })]) as [Extract<ReplicationMessage, { type: 'ERROR' }>];
    assert.equal(decoded.message, 'é'.repeat(ERROR_MESSAGE_BYTES_MAX / 2));
    const odd = 'a' + 'é'.repeat(ERROR_MESSAGE_BYTES_MAX);
    const [cut] = decodeChunks([frameBytes({ type: 'ERROR', code: 'C', message: odd })]) as [Extract<ReplicationMessage, { type: 'ERROR' }>];
    assert.equal(cut.message, 'a' + 'é'.repeat(ERROR_MESSAGE_BYTES_MAX / 2 - 1));
  });

  it('refuses to encode invalid messages (programmer errors, not MirrorsanErrors)', () => {
    const bad: ReplicationMessage[] = [
      { type: 'ACK', volume: '', epoch: 1, source: 'n1', sequence: 1 },
      { type: 'ACK', volume: 'v'.repeat(NAME_BYTES_MAX + 1), epoch: 1, source: 'n1', sequence: 1 },
      { type: 'ACK', volume: 'v', epoch: 2 ** 53, source: 'n1', sequence: 1 },
      { type: 'ACK', volume: 'v', epoch: -1, source: 'n1', sequence: 1 },
      { type: 'ACK', volume: 'v', epoch: 1.5, source: 'n1', sequence: 1 },
      { type: 'HELLO', protocolVersion: 1, clusterId: 'c', nodeId: 'n', nonce: Buffer.alloc(31) },
      { type: 'AUTH', hmac: Buffer.alloc(33) },
      { type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 10, payload: Buffer.alloc(9) },
      { type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.ZERO, offset: 0, lengthBytes: 10, payload: Buffer.alloc(10) },
      { type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.TRIM, offset: 0, lengthBytes: 0, payload: Buffer.alloc(0) },
      { type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.DIRECT_WRITE as WireEntryType, offset: 0, lengthBytes: 1, payload: Buffer.alloc(0) },
      { type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.ZERO, offset: MAX_U64, lengthBytes: 1, payload: Buffer.alloc(0) },
    ];
    for (const message of bad) {
      assert.throws(() => encodeFrame(message), (error: unknown) => error instanceof Error && !isMirrorsanError(error) && /assertion failed/.test(error.message), JSON.stringify(message.type));
    }
  });
});

describe('replication codec: refusals', () => {
  const validAck = frameBytes({ type: 'ACK', volume: 'v', epoch: 1, source: 'n1', sequence: 1 });

  it('refuses a wrong magic, an unknown type and reserved flags from the header', () => {
    const wrongMagic = Buffer.from(validAck);
    wrongMagic[0] = 0x47; // "GET / HTTP/1.1" and friends
    expectCode(() => decodeChunks([wrongMagic]), 'REPL_BAD_FRAME');
    expectCode(() => decodeChunks([rawFrame(0x7e, Buffer.alloc(8))]), 'REPL_BAD_FRAME');
    expectCode(() => decodeChunks([rawFrame(MESSAGE_TYPE.PING, Buffer.alloc(8), { flags: 1 })]), 'REPL_BAD_FRAME');
  });

  it('names another protocol version as such', () => {
    const error = expectCode(() => decodeChunks([rawFrame(MESSAGE_TYPE.PING, Buffer.alloc(8), { version: 2 })]), 'REPL_VERSION_MISMATCH');
    assert.match(error.message, /version 2/);
  });

  it('refuses a 4 GiB body from the header alone, holding nothing', () => {
    for (const type of ['WRITE', 'HELLO', 'ACK'] as const) {
      const header = rawFrame(MESSAGE_TYPE[type], Buffer.alloc(0), { bodyLength: 0xffff_ffff });
      const decoder = new FrameDecoder();
      decoder.push(header);
      expectCode(() => decoder.next(), 'REPL_FRAME_TOO_LARGE');
      assert.equal(decoder.bufferedBytes, 0);
    }
  });

  it('caps each type at its own maximum body, and at the configured bodyMaxBytes', () => {
    for (const type of Object.keys(MESSAGE_TYPE) as MessageType[]) {
      const header = rawFrame(MESSAGE_TYPE[type], Buffer.alloc(0), { bodyLength: bodyMaxBytesOf(type) + 1 });
      expectCode(() => decodeChunks([header]), 'REPL_FRAME_TOO_LARGE');
    }
    const write = frameBytes({ type: 'WRITE', volume: 'v', epoch: 1, source: 'n', sequence: 1, entryType: ENTRY_TYPE.WRITE, offset: 0, lengthBytes: 2048, payload: Buffer.alloc(2048) });
    expectCode(() => decodeChunks([write.subarray(0, FRAME_HEADER_BYTES)], new FrameDecoder({ bodyMaxBytes: 1024 })), 'REPL_FRAME_TOO_LARGE');
    assert.equal(decodeChunks([write], new FrameDecoder({ bodyMaxBytes: 4096 })).length, 1);
  });

  it('refuses types outside acceptOnly from the header, before the body arrives', () => {
    const decoder = new FrameDecoder();
    decoder.acceptOnly(['HELLO']);
    const write = frameBytes(SAMPLES[3]!);
    decoder.push(write.subarray(0, FRAME_HEADER_BYTES));
    const error = expectCode(() => decoder.next(), 'REPL_BAD_FRAME');
    assert.match(error.message, /WRITE frame not accepted/);
  });

  it('refuses a body too short for its type', () => {
    expectCode(() => decodeChunks([rawFrame(MESSAGE_TYPE.PING, Buffer.alloc(4))]), 'REPL_BAD_FRAME');
    expectCode(() => decodeChunks([rawFrame(MESSAGE_TYPE.AUTH, Buffer.alloc(31))]), 'REPL_BAD_FRAME');
  });

  it('refuses well-checksummed frames whose fields break the format', () => {
    const name = (text: string): Buffer => Buffer.concat([Buffer.of(Buffer.byteLength(text)), Buffer.from(text)]);
    const u64 = (high: number, low: number): Buffer => {
      const b = Buffer.alloc(8);
      b.writeUInt32BE(high, 0);
      b.writeUInt32BE(low, 4);
      return b;
    };
    const cases: [string, Buffer][] = [
      ['u64 of 2^53', rawFrame(MESSAGE_TYPE.ACK, Buffer.concat([u64(0x20_0000, 0), u64(0, 1), name('v'), name('n')]))],
      ['empty name', rawFrame(MESSAGE_TYPE.ACK, Buffer.concat([u64(0, 1), u64(0, 1), Buffer.of(0), name('n'), Buffer.of(0x41)]))],
      ['invalid UTF-8', rawFrame(MESSAGE_TYPE.ACK, Buffer.concat([u64(0, 1), u64(0, 1), Buffer.of(2, 0xc3, 0x28), name('n')]))],
      ['name over the cap', rawFrame(MESSAGE_TYPE.GRANT, Buffer.concat([u64(0, 1), u64(0, 1), u64(0, 1), Buffer.of(200), Buffer.alloc(100, 0x61)]))],
      ['trailing bytes', rawFrame(MESSAGE_TYPE.ACK, Buffer.concat([u64(0, 1), u64(0, 1), name('v'), name('n'), Buffer.of(0)]))],
      ['name runs past the end', rawFrame(MESSAGE_TYPE.ACK, Buffer.concat([u64(0, 1), u64(0, 1), name('v'), Buffer.of(9, 0x61)]))],
      ['ERROR message over the cap', rawFrame(MESSAGE_TYPE.ERROR, Buffer.concat([name('C'), Buffer.of(0x10, 0x01)]))],
    ];
    const writeBody = (entryType: number, lengthBytes: number, payload: Buffer, volumeLength = 1): Buffer =>
      Buffer.concat([u64(0, 1), u64(0, 1), u64(0, 0), u64(0, lengthBytes), Buffer.of(entryType, volumeLength, 1), Buffer.from('v'), Buffer.from('n'), payload]);
    cases.push(
      ['WRITE payload shorter than lengthBytes', rawFrame(MESSAGE_TYPE.WRITE, writeBody(ENTRY_TYPE.WRITE, 10, Buffer.alloc(9)))],
      ['ZERO with a payload', rawFrame(MESSAGE_TYPE.WRITE, writeBody(ENTRY_TYPE.ZERO, 10, Buffer.alloc(10)))],
      ['WRITE of zero bytes', rawFrame(MESSAGE_TYPE.WRITE, writeBody(ENTRY_TYPE.TRIM, 0, Buffer.alloc(0)))],
      ['DIRECT_WRITE on the wire', rawFrame(MESSAGE_TYPE.WRITE, writeBody(ENTRY_TYPE.DIRECT_WRITE, 1, Buffer.alloc(0)))],
      ['WRITE names past its body', rawFrame(MESSAGE_TYPE.WRITE, writeBody(ENTRY_TYPE.TRIM, 1, Buffer.alloc(0), 200))],
      ['unknown entry type behind the restart bit', rawFrame(MESSAGE_TYPE.WRITE, writeBody(0x80 | 0x7f, 1, Buffer.alloc(0)))],
    );
    const u32 = (value: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(value, 0);
      return b;
    };
    cases.push(
      ['REGION_REQUEST of an unknown kind', rawFrame(MESSAGE_TYPE.REGION_REQUEST, Buffer.concat([u64(0, 1), u64(0, 1), Buffer.of(9), u64(0, 0), u64(0, 4096), u32(4096), name('v')]))],
      ['REGION_REPLY data length past its body', rawFrame(MESSAGE_TYPE.REGION_REPLY, Buffer.concat([u64(0, 1), u64(0, 1), Buffer.of(1), u32(100), name('v'), Buffer.alloc(10)]))],
      ['REGION_REPLY data length over the cap', rawFrame(MESSAGE_TYPE.REGION_REPLY, Buffer.concat([u64(0, 1), u64(0, 1), Buffer.of(1), u32(0xffff_ffff), name('v')]))],
    );
    for (const [what, frame] of cases) {
      const whole = expectCode(() => decodeChunks([frame]), 'REPL_BAD_FRAME');
      // Also byte at a time: the check must not depend on how the frame arrived.
      const bytewise = expectCode(() => decodeChunks(Array.from({ length: frame.length }, (_, i) => frame.subarray(i, i + 1))), 'REPL_BAD_FRAME');
      assert.equal(bytewise.message, whole.message, what);
    }
  });

  it('stays dead after an error: every later call rethrows it', () => {
    const decoder = new FrameDecoder();
    decoder.push(Buffer.from('garbage garbage garbage'));
    const first = expectCode(() => decoder.next(), 'REPL_BAD_FRAME');
    assert.throws(() => decoder.next(), (error: unknown) => error === first);
    assert.throws(() => decoder.push(validAck), (error: unknown) => error === first);
    assert.equal(decoder.bufferedBytes, 0);
  });

  it('detects a flipped bit anywhere in any frame: never yields a message for it', () => {
    const trailer = Buffer.concat(SAMPLES.slice(0, 8).map(frameBytes));
    for (const message of SAMPLES) {
      const bytes = frameBytes(message);
      for (let bit = 0; bit < bytes.length * 8; bit++) {
        const flipped = Buffer.from(bytes);
        flipped[bit >> 3]! ^= 1 << (bit & 7);
        // Followed by valid frames, so a length made longer swallows them and must still fail.
        const decoder = new FrameDecoder();
        const yielded: ReplicationMessage[] = [];
        try {
          decoder.push(Buffer.concat([flipped, trailer]));
          for (let m = decoder.next(); m !== undefined; m = decoder.next()) yielded.push(m);
        } catch (error) {
          assert.ok(isMirrorsanError(error), String(error));
          assert.match(error.code, /^REPL_/);
        }
        assert.equal(yielded.length, 0, `${message.type} bit ${bit} flipped yielded ${yielded[0]?.type}`);
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Property-based tests

const nameArb = fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 }).filter((s) => Buffer.byteLength(s) <= NAME_BYTES_MAX);
const u64Arb = fc.integer({ min: 0, max: MAX_U64 });
const smallU64Arb = fc.oneof(fc.integer({ min: 0, max: 1000 }), u64Arb);

const writeArb: fc.Arbitrary<ReplicationMessage> = fc
  .record({
    volume: nameArb,
    epoch: smallU64Arb,
    source: nameArb,
    sequence: smallU64Arb,
    entryType: fc.constantFrom<WireEntryType>(ENTRY_TYPE.WRITE, ENTRY_TYPE.ZERO, ENTRY_TYPE.TRIM),
    offset: fc.integer({ min: 0, max: 2 ** 50 }),
    lengthBytes: fc.integer({ min: 1, max: 3000 }),
    seed: fc.integer({ min: 0, max: 255 }),
  })
  .map(({ seed, ...w }) => ({ type: 'WRITE' as const, ...w, payload: w.entryType === ENTRY_TYPE.WRITE ? pattern(w.lengthBytes, seed) : Buffer.alloc(0) }));

const messageArb: fc.Arbitrary<ReplicationMessage> = fc.oneof(
  fc.record({ protocolVersion: fc.integer({ min: 0, max: 0xffff }), clusterId: nameArb, nodeId: nameArb, nonce: fc.uint8Array({ minLength: 32, maxLength: 32 }) }).map((h) => ({ type: 'HELLO' as const, ...h, nonce: Buffer.from(h.nonce) })),
  fc.uint8Array({ minLength: 32, maxLength: 32 }).map((h) => ({ type: 'AUTH' as const, hmac: Buffer.from(h) })),
  writeArb,
  writeArb,
  fc.record({ type: fc.constantFrom('ACK', 'SYNC', 'SYNC_ACK', 'CHECKPOINT', 'CHECKPOINT_ACK'), volume: nameArb, epoch: smallU64Arb, source: nameArb, sequence: smallU64Arb }).map((r) => ({ ...r })) as fc.Arbitrary<ReplicationMessage>,
  fc.record({ type: fc.constantFrom('GRANT_REQUEST', 'GRANT', 'REVOKE', 'RELEASE'), volume: nameArb, epoch: smallU64Arb, region: smallU64Arb, generation: smallU64Arb }).map((r) => ({ ...r })) as fc.Arbitrary<ReplicationMessage>,
  fc.record({ type: fc.constantFrom('PING', 'PONG'), timestampMs: u64Arb }).map((r) => ({ ...r })) as fc.Arbitrary<ReplicationMessage>,
  fc.record({ code: nameArb, message: fc.string({ maxLength: 200 }) }).map((e) => ({ type: 'ERROR' as const, ...e })),
);

/** Cuts `bytes` at the given positions (any order, duplicates allowed: empty chunks too). */
function cutAt(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let at = 0;
  for (const point of points) {
    chunks.push(bytes.subarray(at, point));
    at = point;
  }
  chunks.push(bytes.subarray(at));
  return chunks;
}

describe('replication codec: properties', () => {
  it('random message sequences cut at random points decode to the same messages', () => {
    fc.assert(
      fc.property(fc.array(messageArb, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 30 }), (messages, cuts) => {
        const stream = Buffer.concat(messages.map(frameBytes));
        const decoder = new FrameDecoder();
        assert.deepEqual(decodeChunks(cutAt(stream, cuts), decoder), messages);
        assert.ok(decoder.atFrameBoundary);
      }),
      { numRuns: 300 },
    );
  });

  it('random garbage only ever throws MirrorsanError and never holds more than one capped frame', () => {
    const cap = FRAME_HEADER_BYTES + FRAME_BODY_MAX_BYTES;
    // Plausible garbage: a valid magic and version with random type, flags, length and bytes,
    // so that the decoder gets past the magic and has to bound what it holds.
    const plausible = fc
      .record({ type: fc.constantFrom(...Object.values(MESSAGE_TYPE), 0, 0xff), flags: fc.constantFrom(0, 0, 1), length: fc.oneof(fc.nat({ max: 400 }), fc.nat()), rest: fc.uint8Array({ maxLength: 600 }) })
      .map(({ type, flags, length, rest }) => {
        const header = Buffer.alloc(12);
        header.writeUInt32BE(FRAME_MAGIC, 0);
        header.writeUInt8(PROTOCOL_VERSION, 4);
        header.writeUInt8(type, 5);
        header.writeUInt16BE(flags, 6);
        header.writeUInt32BE(length, 8);
        return Buffer.concat([header, rest]);
      });
    const garbage = fc.array(fc.oneof(fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)), plausible), { minLength: 1, maxLength: 8 });
    fc.assert(
      fc.property(garbage, fc.array(fc.nat(), { maxLength: 10 }), (pieces, cuts) => {
        const stream = Buffer.concat(pieces);
        const decoder = new FrameDecoder();
        try {
          for (const chunk of cutAt(stream, cuts)) {
            decoder.push(chunk);
            while (decoder.next() !== undefined) {
              // A well-formed frame in garbage is possible only with a matching CRC: fine.
            }
            // At most one incomplete frame, whose announced body passed the caps (a payload
            // spanning chunks is allocated at its exact announced size).
            assert.ok(decoder.bufferedBytes <= cap, `holds ${decoder.bufferedBytes} bytes`);
          }
        } catch (error) {
          assert.ok(isMirrorsanError(error), `threw a non-MirrorsanError: ${String(error)}`);
          assert.match(error.code, /^REPL_/);
          assert.equal(decoder.bufferedBytes, 0);
        }
      }),
      { numRuns: 1000 },
    );
  });

  it('a valid stream with one random byte changed never yields a wrong message', () => {
    fc.assert(
      fc.property(fc.array(messageArb, { minLength: 1, maxLength: 6 }), fc.nat(), fc.integer({ min: 1, max: 255 }), (messages, position, xor) => {
        const stream = Buffer.concat(messages.map(frameBytes));
        const at = position % stream.length;
        stream[at]! ^= xor;
        const yielded: ReplicationMessage[] = [];
        const decoder = new FrameDecoder();
        try {
          decoder.push(stream);
          for (let m = decoder.next(); m !== undefined; m = decoder.next()) yielded.push(m);
        } catch (error) {
          assert.ok(isMirrorsanError(error));
        }
        // Every message yielded is one that was sent, in order, before the damaged frame.
        assert.deepEqual(yielded, messages.slice(0, yielded.length));
        let frameStart = 0;
        for (const m of messages.slice(0, yielded.length)) frameStart += frameBytes(m).length;
        assert.ok(frameStart <= at, 'a damaged frame was delivered');
      }),
      { numRuns: 500 },
    );
  });
});
