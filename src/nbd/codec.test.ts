// Proves the NBD codec parses every frame the same however it is split, round-trips random frame sequences, and never throws anything but MirrorsanError nor buffers past its caps on garbage.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { isMirrorsanError } from '../errors.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import {
  OptionParser,
  ReplyParser,
  RequestParser,
  ServerHandshakeParser,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeInfoRequestData,
  decodeMetaContextData,
  decodeOffsetData,
  decodeOffsetHole,
  decodeRepInfo,
  decodeRepMetaContext,
  decodeRepServer,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeClientFlags,
  encodeErrorChunk,
  encodeErrorOffsetChunk,
  encodeExportNameAnswer,
  encodeGreeting,
  encodeInfoRequestData,
  encodeMetaContextData,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeOptionRequest,
  encodeRepInfoBlockSize,
  encodeRepInfoExport,
  encodeRepInfoString,
  encodeRepMetaContext,
  encodeRepServer,
  encodeRequestHeader,
  encodeSimpleReply,
  isInvalid,
  type NbdReply,
  type NbdRequest,
  type ReplyMode,
} from './codec.js';
import { CMD, CMD_FLAG, INFO, OPT, REP, REP_ERR, REPLY_FLAG, REPLY_TYPE } from './protocol.js';

const OPTION_CAP = 4096;
const PAYLOAD_MAX = 64 * 1024;
const PAYLOAD_HARD_MAX = 256 * 1024;

/** Splits `bytes` at the given cut points (sorted, deduplicated, within range). */
function cut(bytes: Buffer, points: number[]): Buffer[] {
  const sorted = [...new Set(points.map((p) => Math.max(0, Math.min(bytes.length, p))))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let start = 0;
  for (const point of sorted) {
    chunks.push(bytes.subarray(start, point));
    start = point;
  }
  chunks.push(bytes.subarray(start));
  return chunks;
}

/** Feeds chunks one by one, pulling every frame available after each. */
function feed<T>(chunks: Buffer[], make: (queue: ChunkQueue) => () => T | undefined): T[] {
  const queue = new ChunkQueue();
  const next = make(queue);
  const frames: T[] = [];
  for (const chunk of chunks) {
    // Copy so that views cannot alias between runs.
    queue.push(Buffer.from(chunk));
    for (let frame = next(); frame !== undefined; frame = next()) frames.push(frame);
  }
  return frames;
}

/** Every split point, two-way, and byte at a time, must give the result of one whole chunk. */
function assertSplitInvariant<T>(bytes: Buffer, make: (queue: ChunkQueue) => () => T | undefined, normalize: (frames: T[]) => unknown): void {
  const whole = normalize(feed([bytes], make));
  for (let point = 0; point <= bytes.length; point++) {
    assert.deepEqual(normalize(feed(cut(bytes, [point]), make)), whole, `split at ${point}`);
  }
  const bytewise = Array.from({ length: bytes.length }, (_, i) => bytes.subarray(i, i + 1));
  assert.deepEqual(normalize(feed(bytewise, make)), whole, 'byte at a time');
}

const optionFrames = (queue: ChunkQueue) => {
  const parser = new OptionParser(queue, { optionDataBytesMax: OPTION_CAP, expectClientFlags: true });
  return () => parser.next();
};
const normalizeOptionFrames = (frames: ReturnType<OptionParser['next']>[]) =>
  frames.map((frame) => (frame?.kind === 'option' ? { ...frame, data: Buffer.from(frame.data).toString('hex') } : frame));

function requestFrames(extendedHeaders: boolean) {
  return (queue: ChunkQueue) => {
    const parser = new RequestParser(queue, { extendedHeaders, payloadMaxBytes: PAYLOAD_MAX, payloadHardMaxBytes: PAYLOAD_HARD_MAX });
    return () => parser.next();
  };
}
const normalizeRequests = (frames: NbdRequest[]) =>
  frames.map((request) => ({ ...request, payload: request.payload === undefined ? undefined : Buffer.from(request.payload).toString('hex') }));

function replyFrames(mode: ReplyMode, readLengths: Map<bigint, number>) {
  return (queue: ChunkQueue) => {
    const parser = new ReplyParser(queue, { mode, payloadBytesMax: PAYLOAD_HARD_MAX, readLengthForCookie: (cookie) => readLengths.get(cookie) ?? 0 });
    return () => parser.next();
  };
}
const normalizeReplies = (frames: NbdReply[]) =>
  frames.map((reply) => ({ ...reply, payload: reply.payload === undefined ? undefined : Buffer.from(reply.payload).toString('hex') }));

function request(fields: Partial<NbdRequest> & { type: number }): NbdRequest {
  return { cookie: 1n, flags: 0, offset: 0, offsetExact: undefined, length: 0, payload: undefined, payloadDiscarded: false, ...fields };
}

function encodeRequest(req: NbdRequest, extended: boolean): Buffer {
  const header = encodeRequestHeader({ cookie: req.cookie, type: req.type, flags: req.flags, offset: req.offsetExact ?? req.offset, length: req.length }, extended);
  return req.payload === undefined ? header : Buffer.concat([header, req.payload]);
}

describe('codec: server side, every split point', () => {
  it('client flags and option requests (empty data, GO data, SET_META_CONTEXT data)', () => {
    const bytes = Buffer.concat([
      encodeClientFlags(3),
      encodeOptionRequest(OPT.STRUCTURED_REPLY),
      encodeOptionRequest(OPT.GO, encodeInfoRequestData('disk', [INFO.BLOCK_SIZE, INFO.NAME])),
      encodeOptionRequest(OPT.SET_META_CONTEXT, encodeMetaContextData('disk', ['base:allocation', 'qemu:dirty-bitmap:x'])),
      encodeOptionRequest(0x1234, Buffer.from('unknown option data')),
    ]);
    assertSplitInvariant(bytes, optionFrames, normalizeOptionFrames);
    const frames = feed([bytes], optionFrames);
    assert.deepEqual(frames[0], { kind: 'clientFlags', flags: 3 });
    assert.equal(frames.length, 5);
    const go = frames[2];
    assert.ok(go?.kind === 'option' && go.option === OPT.GO);
    assert.deepEqual(decodeInfoRequestData(go.data), { name: 'disk', infoTypes: [INFO.BLOCK_SIZE, INFO.NAME] });
  });

  it('compact requests: READ, WRITE with payload, FLUSH, DISC', () => {
    const write = request({ type: CMD.WRITE, cookie: 0xdeadbeefcafef00dn, offset: 4096, length: 3000, payload: Buffer.alloc(3000, 0x5a) });
    const frames = [
      request({ type: CMD.READ, cookie: 7n, offset: 2 ** 40, length: 65536, flags: CMD_FLAG.FUA | CMD_FLAG.DF }),
      write,
      request({ type: CMD.FLUSH, cookie: 9n }),
      request({ type: CMD.DISC, cookie: 10n }),
    ];
    const bytes = Buffer.concat(frames.map((frame) => encodeRequest(frame, false)));
    assertSplitInvariant(bytes, requestFrames(false), normalizeRequests);
    assert.deepEqual(normalizeRequests(feed([bytes], requestFrames(false))), normalizeRequests(frames));
  });

  it('extended requests: 64-bit lengths, PAYLOAD_LEN writes, offsets past 2^53 echoed exactly', () => {
    const frames = [
      request({ type: CMD.BLOCK_STATUS, cookie: 1n, offset: 0, length: 2 ** 40, flags: CMD_FLAG.REQ_ONE }),
      request({ type: CMD.WRITE, cookie: 2n, offset: 512, length: 1000, flags: CMD_FLAG.PAYLOAD_LEN, payload: Buffer.alloc(1000, 1) }),
      request({ type: CMD.TRIM, cookie: 3n, offset: 2 ** 64 - 1, offsetExact: 2n ** 64n - 1n, length: 1 }),
    ];
    const bytes = Buffer.concat(frames.map((frame) => encodeRequest(frame, true)));
    assertSplitInvariant(bytes, requestFrames(true), normalizeRequests);
    const parsed = feed([bytes], requestFrames(true));
    assert.equal(parsed[2]?.offsetExact, 2n ** 64n - 1n);
  });

  it('a payload over the maximum but under the hard cap is consumed and flagged, framing intact', () => {
    const big = request({ type: CMD.WRITE, cookie: 5n, length: PAYLOAD_MAX + 1, payload: Buffer.alloc(PAYLOAD_MAX + 1, 2) });
    const after = request({ type: CMD.READ, cookie: 6n, length: 512 });
    const bytes = Buffer.concat([encodeRequest(big, false), encodeRequest(after, false)]);
    const parsed = feed(cut(bytes, [10, 30, 40000, 70000]), requestFrames(false));
    assert.equal(parsed.length, 2);
    assert.equal(parsed[0]?.payloadDiscarded, true);
    assert.equal(parsed[0]?.payload, undefined);
    assert.equal(parsed[1]?.cookie, 6n);
  });

  it('a payload in one chunk is a view; one spanning chunks is a single exact-size copy', () => {
    const payload = Buffer.alloc(5000, 3);
    const bytes = encodeRequest(request({ type: CMD.WRITE, length: 5000, payload }), false);
    const queue = new ChunkQueue();
    const parser = new RequestParser(queue, { extendedHeaders: false, payloadMaxBytes: PAYLOAD_MAX, payloadHardMaxBytes: PAYLOAD_HARD_MAX });
    queue.push(bytes);
    const inOne = parser.next();
    assert.equal(inOne?.payload?.buffer, bytes.buffer, 'payload shares the received chunk');
    const split = cut(bytes, [28 + 100, 28 + 2000]);
    for (const chunk of split) queue.push(chunk);
    const spanning = parser.next();
    assert.equal(spanning?.payload?.length, 5000);
    for (const chunk of split) assert.notEqual(spanning?.payload?.buffer, chunk.buffer);
    assert.equal(queue.length, 0);
  });

  it('errors: wrong magic, oversized option data, payload over the hard cap', () => {
    const wrongMagic = Buffer.concat([encodeClientFlags(3), Buffer.from('GARBAGE!GARBAGE!')]);
    assert.throws(() => feed([wrongMagic], optionFrames), (error) => isMirrorsanError(error, 'NBD_BAD_MAGIC'));
    const oversized = Buffer.concat([encodeClientFlags(3), encodeOptionRequest(OPT.GO).subarray(0, 12), Buffer.from([0, 1, 0, 0])]);
    // The length is checked from the header alone, before any data is buffered.
    assert.throws(() => feed([oversized], optionFrames), (error) => isMirrorsanError(error, 'NBD_OPTION_TOO_LARGE'));
    const huge = encodeRequestHeader({ cookie: 1n, type: CMD.WRITE, flags: 0, offset: 0, length: PAYLOAD_HARD_MAX + 1 }, false);
    assert.throws(() => feed([huge], requestFrames(false)), (error) => isMirrorsanError(error, 'NBD_PROTOCOL'));
    const compactInExtended = encodeRequestHeader({ cookie: 1n, type: CMD.READ, flags: 0, offset: 0, length: 1 }, false);
    assert.throws(() => feed([compactInExtended, Buffer.alloc(4)], requestFrames(true)), (error) => isMirrorsanError(error, 'NBD_BAD_MAGIC'));
  });

  it('decodes INFO/GO and meta-context option data, refusing malformed lengths', () => {
    assert.deepEqual(decodeInfoRequestData(encodeInfoRequestData('', [])), { name: '', infoTypes: [] });
    assert.ok(isInvalid(decodeInfoRequestData(Buffer.alloc(5))));
    const overrun = encodeInfoRequestData('disk', [1]);
    overrun.writeUInt32BE(100, 0);
    assert.ok(isInvalid(decodeInfoRequestData(overrun)));
    assert.ok(isInvalid(decodeInfoRequestData(Buffer.concat([encodeInfoRequestData('disk', [1]), Buffer.alloc(1)]))));
    assert.deepEqual(decodeMetaContextData(encodeMetaContextData('x', ['base:', 'a:b'])), { name: 'x', queries: ['base:', 'a:b'] });
    const badCount = encodeMetaContextData('x', []);
    badCount.writeUInt32BE(1_000_000, 5);
    assert.ok(isInvalid(decodeMetaContextData(badCount)));
    const badQuery = encodeMetaContextData('x', ['base:allocation']);
    badQuery.writeUInt32BE(999, 9);
    assert.ok(isInvalid(decodeMetaContextData(badQuery)));
  });
});

describe('codec: client side, every split point', () => {
  it('greeting, every option reply type, and the EXPORT_NAME answer (with and without zeroes)', () => {
    for (const noZeroes of [true, false]) {
      const replies = [
        encodeOptionReply(OPT.STRUCTURED_REPLY, REP.ACK),
        encodeRepServer(OPT.LIST, 'disk', 'the disk'),
        encodeRepInfoExport(OPT.GO, 2 ** 40 + 512, 0xded),
        encodeRepInfoString(OPT.GO, INFO.NAME, 'disk'),
        encodeRepInfoString(OPT.GO, INFO.DESCRIPTION, 'described'),
        encodeRepInfoBlockSize(OPT.GO, 512, 4096, 1 << 25),
        encodeRepMetaContext(OPT.SET_META_CONTEXT, 1, 'base:allocation'),
        encodeOptionError(OPT.GO, REP_ERR.UNKNOWN, 'no export named "x"'),
      ];
      const bytes = Buffer.concat([encodeGreeting(3), ...replies, encodeExportNameAnswer(1 << 30, 0x4d, noZeroes)]);
      const make = (queue: ChunkQueue) => {
        const parser = new ServerHandshakeParser(queue, { replyDataBytesMax: OPTION_CAP });
        let step = 0;
        return () => {
          let value: unknown;
          if (step === 0) value = parser.greeting();
          else if (step <= replies.length) value = parser.optionReply();
          else if (step === replies.length + 1) value = parser.exportNameAnswer(noZeroes);
          else return undefined;
          if (value !== undefined) step++;
          return value;
        };
      };
      const normalize = (frames: unknown[]) => frames.map((f) => JSON.stringify(f, (_k, v) => (v?.type === 'Buffer' ? Buffer.from(v.data).toString('hex') : v)));
      assertSplitInvariant(bytes, make, normalize);
      const frames = feed([bytes], make) as Array<Record<string, unknown>>;
      assert.deepEqual(frames[0], { handshakeFlags: 3 });
      assert.deepEqual(decodeRepServer(frames[2]!.data as Buffer), { name: 'disk', description: 'the disk' });
      assert.deepEqual(decodeRepInfo(frames[3]!.data as Buffer), { type: INFO.EXPORT, sizeBytes: 2 ** 40 + 512, transmissionFlags: 0xded });
      assert.deepEqual(decodeRepInfo(frames[4]!.data as Buffer), { type: INFO.NAME, name: 'disk' });
      assert.deepEqual(decodeRepInfo(frames[5]!.data as Buffer), { type: INFO.DESCRIPTION, description: 'described' });
      assert.deepEqual(decodeRepInfo(frames[6]!.data as Buffer), { type: INFO.BLOCK_SIZE, minimum: 512, preferred: 4096, maximum: 1 << 25 });
      assert.deepEqual(decodeRepMetaContext(frames[7]!.data as Buffer), { contextId: 1, name: 'base:allocation' });
      assert.equal(frames[8]!.type, REP_ERR.UNKNOWN);
      assert.deepEqual(frames[9], { sizeBytes: 1 << 30, transmissionFlags: 0x4d });
    }
  });

  it('simple replies, with READ data for a pending READ cookie', () => {
    const readLengths = new Map([[2n, 1000]]);
    const bytes = Buffer.concat([encodeSimpleReply(1n, 0), encodeSimpleReply(2n, 0), Buffer.alloc(1000, 9), encodeSimpleReply(3n, 22)]);
    assertSplitInvariant(bytes, replyFrames('simple', readLengths), normalizeReplies);
    const frames = feed([bytes], replyFrames('simple', readLengths));
    assert.deepEqual(frames.map((f) => [f.cookie, f.error, f.payload?.length]), [[1n, 0, undefined], [2n, 0, 1000], [3n, 22, undefined]]);
  });

  it('structured chunks of every type, mixed with simple replies', () => {
    const target = { cookie: 4n, offset: 8192 };
    const data = Buffer.alloc(700, 0x11);
    const bytes = Buffer.concat([
      encodeOffsetDataHeader(false, target, 0, 8192, data.length),
      data,
      encodeOffsetHole(false, target, 0, 8892, 300),
      encodeBlockStatus(target, 0, 1, [{ lengthBytes: 4096, flags: 3 }, { lengthBytes: 512, flags: 0 }]),
      encodeErrorChunk(false, target, 0, 5, 'I/O error'),
      encodeErrorOffsetChunk(false, target, 0, 5, 'bad sector', 9000),
      encodeNoneChunk(false, target),
      encodeSimpleReply(5n, 0),
    ]);
    assertSplitInvariant(bytes, replyFrames('structured', new Map()), normalizeReplies);
    const frames = feed([bytes], replyFrames('structured', new Map()));
    assert.deepEqual(frames.map((f) => f.type), [REPLY_TYPE.OFFSET_DATA, REPLY_TYPE.OFFSET_HOLE, REPLY_TYPE.BLOCK_STATUS, REPLY_TYPE.ERROR, REPLY_TYPE.ERROR_OFFSET, REPLY_TYPE.NONE, -1]);
    assert.deepEqual(decodeOffsetData(frames[0]!.payload!), { offset: 8192, data });
    assert.deepEqual(decodeOffsetHole(frames[1]!.payload!), { offset: 8892, lengthBytes: 300 });
    assert.deepEqual(decodeBlockStatus(REPLY_TYPE.BLOCK_STATUS, frames[2]!.payload!), { contextId: 1, extents: [{ lengthBytes: 4096, flags: 3 }, { lengthBytes: 512, flags: 0 }] });
    assert.deepEqual(decodeErrorChunk(REPLY_TYPE.ERROR, frames[3]!.payload!), { error: 5, message: 'I/O error', offset: undefined });
    assert.deepEqual(decodeErrorChunk(REPLY_TYPE.ERROR_OFFSET, frames[4]!.payload!), { error: 5, message: 'bad sector', offset: 9000 });
    assert.equal(frames[5]!.flags & REPLY_FLAG.DONE, REPLY_FLAG.DONE);
  });

  it('extended chunks echo the request offset; BLOCK_STATUS_EXT carries 64-bit lengths', () => {
    const target = { cookie: 8n, offset: 2 ** 45 };
    const bytes = Buffer.concat([
      encodeOffsetDataHeader(true, target, 0, 2 ** 45, 3),
      Buffer.from([1, 2, 3]),
      encodeBlockStatusExt(target, REPLY_FLAG.DONE, 7, [{ lengthBytes: 2 ** 35, flags: 2 }]),
      encodeErrorChunk(true, target, REPLY_FLAG.DONE, 22, 'nope'),
      encodeNoneChunk(true, target),
    ]);
    assertSplitInvariant(bytes, replyFrames('extended', new Map()), normalizeReplies);
    const frames = feed([bytes], replyFrames('extended', new Map()));
    assert.deepEqual(frames.map((f) => f.offset), [2 ** 45, 2 ** 45, 2 ** 45, 2 ** 45]);
    assert.deepEqual(decodeBlockStatus(REPLY_TYPE.BLOCK_STATUS_EXT, frames[1]!.payload!), { contextId: 7, extents: [{ lengthBytes: 2 ** 35, flags: 2 }] });
  });

  it('refuses a reply magic that the negotiated mode does not allow', () => {
    const structured = encodeNoneChunk(false, { cookie: 1n, offset: 0 });
    assert.throws(() => feed([structured], replyFrames('simple', new Map())), (error) => isMirrorsanError(error, 'NBD_BAD_MAGIC'));
    assert.throws(() => feed([encodeSimpleReply(1n, 0)], replyFrames('extended', new Map())), (error) => isMirrorsanError(error, 'NBD_BAD_MAGIC'));
  });
});

// ---------------------------------------------------------------------------------------------
// Property tests

const cookieArb = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
const offsetArb = fc.oneof(fc.integer({ min: 0, max: 2 ** 40 }), fc.constant(2 ** 53 - 1));
const payloadArb = fc.uint8Array({ minLength: 1, maxLength: 3000 }).map((bytes) => Buffer.from(bytes));

function requestArb(extended: boolean): fc.Arbitrary<NbdRequest> {
  const plain = fc.record({
    cookie: cookieArb,
    type: fc.constantFrom(CMD.READ, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS, CMD.DISC, 99),
    flags: fc.integer({ min: 0, max: 0x1f }),
    offset: offsetArb,
    length: extended ? fc.integer({ min: 0, max: 2 ** 50 }) : fc.integer({ min: 0, max: 0xffffffff }),
  }).map((r) => request(r));
  const write = fc.record({ cookie: cookieArb, offset: offsetArb, payload: payloadArb, flags: fc.integer({ min: 0, max: 1 }) }).map((r) =>
    request({
      type: CMD.WRITE,
      cookie: r.cookie,
      offset: r.offset,
      flags: r.flags | (extended ? CMD_FLAG.PAYLOAD_LEN : 0),
      length: r.payload.length,
      payload: r.payload,
    }),
  );
  return fc.oneof(plain, write);
}

function replyArb(mode: 'structured' | 'extended'): fc.Arbitrary<Buffer> {
  const extended = mode === 'extended';
  const target = fc.record({ cookie: cookieArb, offset: fc.integer({ min: 0, max: 2 ** 40 }) });
  const flags = fc.constantFrom(0, REPLY_FLAG.DONE);
  return fc.oneof(
    fc.tuple(target, flags, payloadArb).map(([t, f, data]) => Buffer.concat([encodeOffsetDataHeader(extended, t, f, t.offset, data.length), data])),
    fc.tuple(target, flags, fc.integer({ min: 1, max: 0xffffffff })).map(([t, f, n]) => encodeOffsetHole(extended, t, f, t.offset, n)),
    fc.tuple(target, flags, fc.array(fc.record({ lengthBytes: fc.integer({ min: 1, max: 0xffffffff }), flags: fc.integer({ min: 0, max: 3 }) }), { minLength: 1, maxLength: 20 })).map(
      ([t, f, extents]) => (extended ? encodeBlockStatusExt(t, f, 1, extents) : encodeBlockStatus(t, f, 1, extents)),
    ),
    fc.tuple(target, fc.integer({ min: 1, max: 200 }), fc.string({ maxLength: 40 })).map(([t, e, m]) => encodeErrorChunk(extended, t, REPLY_FLAG.DONE, e, m)),
    target.map((t) => encodeNoneChunk(extended, t)),
    ...(extended ? [] : [fc.tuple(cookieArb, fc.integer({ min: 0, max: 200 })).map(([c, e]) => encodeSimpleReply(c, e))]),
  );
}

/** Random cut points for a buffer of `length` bytes. */
const cutsArb = fc.array(fc.nat(), { maxLength: 30 });

describe('codec: properties', () => {
  for (const extended of [false, true]) {
    it(`random ${extended ? 'extended' : 'compact'} request sequences round-trip through random splits`, () => {
      fc.assert(
        fc.property(fc.array(requestArb(extended), { minLength: 1, maxLength: 12 }), cutsArb, (requests, points) => {
          const bytes = Buffer.concat(requests.map((r) => encodeRequest(r, extended)));
          const parsed = feed(cut(bytes, points.map((p) => p % (bytes.length + 1))), requestFrames(extended));
          assert.deepEqual(normalizeRequests(parsed), normalizeRequests(requests));
        }),
        { numRuns: 200 },
      );
    });
  }

  for (const mode of ['structured', 'extended'] as const) {
    it(`random ${mode} reply sequences round-trip through random splits`, () => {
      fc.assert(
        fc.property(fc.array(replyArb(mode), { minLength: 1, maxLength: 12 }), cutsArb, (frames, points) => {
          const bytes = Buffer.concat(frames);
          const whole = normalizeReplies(feed([bytes], replyFrames(mode, new Map())));
          assert.equal(whole.length, frames.length);
          const split = normalizeReplies(feed(cut(bytes, points.map((p) => p % (bytes.length + 1))), replyFrames(mode, new Map())));
          assert.deepEqual(split, whole);
        }),
        { numRuns: 200 },
      );
    });
  }

  it('random option sequences round-trip through random splits', () => {
    const optionArb = fc.record({ option: fc.integer({ min: 0, max: 0xffffffff }), data: fc.uint8Array({ maxLength: 300 }) });
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.array(optionArb, { maxLength: 10 }), cutsArb, (flags, options, points) => {
        const bytes = Buffer.concat([encodeClientFlags(flags), ...options.map((o) => encodeOptionRequest(o.option, Buffer.from(o.data)))]);
        const frames = feed(cut(bytes, points.map((p) => p % (bytes.length + 1))), optionFrames);
        assert.deepEqual(normalizeOptionFrames(frames), [
          { kind: 'clientFlags', flags },
          ...options.map((o) => ({ kind: 'option', option: o.option, data: Buffer.from(o.data).toString('hex') })),
        ]);
      }),
      { numRuns: 200 },
    );
  });

  /**
   * Feeds garbage in random chunks. Only MirrorsanError may escape, and after every chunk the
   * bytes buffered stay under the frame caps (a frame in progress plus what one chunk brought).
   */
  function garbageProperty(make: (queue: ChunkQueue) => { next: () => unknown; held: () => number }, frameCapBytes: number, heldCapBytes: number): void {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ minLength: 1, maxLength: 512 }), { minLength: 1, maxLength: 40 }), (chunks) => {
        const queue = new ChunkQueue();
        const parser = make(queue);
        try {
          for (const chunk of chunks) {
            queue.push(Buffer.from(chunk));
            while (parser.next() !== undefined) {
              // drain
            }
            assert.ok(queue.length <= frameCapBytes + chunk.length, `buffered ${queue.length} bytes`);
            assert.ok(parser.held() <= heldCapBytes, `held ${parser.held()} bytes`);
          }
        } catch (error) {
          if (!isMirrorsanError(error)) throw error;
        }
      }),
      { numRuns: 300 },
    );
  }

  it('garbage into the option parser: only MirrorsanError, buffering capped', () => {
    garbageProperty((queue) => {
      const parser = new OptionParser(queue, { optionDataBytesMax: OPTION_CAP, expectClientFlags: true });
      return { next: () => parser.next(), held: () => 0 };
    }, 16 + OPTION_CAP, 0);
  });

  it('garbage into the request parsers: only MirrorsanError, buffering capped', () => {
    for (const extendedHeaders of [false, true]) {
      garbageProperty((queue) => {
        const parser = new RequestParser(queue, { extendedHeaders, payloadMaxBytes: PAYLOAD_MAX, payloadHardMaxBytes: PAYLOAD_HARD_MAX });
        return { next: () => parser.next(), held: () => parser.heldPayloadBytes };
      }, 32, PAYLOAD_HARD_MAX);
    }
  });

  it('garbage into the reply parsers and the handshake parser: only MirrorsanError, buffering capped', () => {
    for (const mode of ['simple', 'structured', 'extended'] as const) {
      garbageProperty((queue) => {
        const parser = new ReplyParser(queue, { mode, payloadBytesMax: PAYLOAD_HARD_MAX, readLengthForCookie: () => 100 });
        return { next: () => parser.next(), held: () => parser.heldPayloadBytes };
      }, 32, PAYLOAD_HARD_MAX);
    }
    garbageProperty((queue) => {
      const parser = new ServerHandshakeParser(queue, { replyDataBytesMax: OPTION_CAP });
      let greeted = false;
      return {
        next: () => {
          if (!greeted) return (greeted = parser.greeting() !== undefined) || undefined;
          return parser.optionReply();
        },
        held: () => 0,
      };
    }, 20 + OPTION_CAP, 0);
  });

  it('garbage with a valid prefix reaches the deeper states of the request parser', () => {
    fc.assert(
      fc.property(requestArb(false), fc.uint8Array({ maxLength: 200 }), cutsArb, (valid, garbage, points) => {
        const bytes = Buffer.concat([encodeRequest(valid, false), Buffer.from(garbage)]);
        try {
          const frames = feed(cut(bytes, points.map((p) => p % (bytes.length + 1))), requestFrames(false));
          assert.ok(frames.length >= 1);
        } catch (error) {
          if (!isMirrorsanError(error)) throw error;
        }
      }),
      { numRuns: 300 },
    );
  });
});
