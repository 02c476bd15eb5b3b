// Proves the log entry codec: round trips, zero-copy payload views, every split point of a
// chunked stream, torn-tail versus corruption at every byte and bit, generations (entries of
// an earlier life of a reused container never decode as entries, zero and stale tails end a
// log cleanly), and (fast-check) that random input never throws and a cut log decodes to
// exactly its prefix of whole entries.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isMirrorsanError } from '../errors.js';
import {
  ENTRY_HEADER_BYTES,
  ENTRY_TYPE,
  EntryStreamDecoder,
  decodeEntryAt,
  decodeLog,
  encodeHeader,
  judgeLogEnd,
  retagHeader,
  type EntryType,
  type LogEntry,
} from './entry.js';

interface Sample {
  entry: LogEntry;
  payload: Buffer;
}

function sample(sequence: number, type: EntryType, payloadLength: number, fill = sequence): Sample {
  const payload = type === ENTRY_TYPE.WRITE ? Buffer.alloc(payloadLength, fill & 0xff) : Buffer.alloc(0);
  return {
    entry: { type, flags: sequence & 0xffff, sourceId: 7, sequence, offset: sequence * 4096, lengthBytes: type === ENTRY_TYPE.WRITE ? payloadLength : 8192 },
    payload,
  };
}

function encodeAll(samples: readonly Sample[], generation = 0): Buffer {
  return Buffer.concat(samples.flatMap((s) => [encodeHeader(s.entry, s.payload, generation), s.payload]));
}

function boundaries(samples: readonly Sample[]): number[] {
  const out = [0];
  for (const s of samples) out.push(out[out.length - 1]! + ENTRY_HEADER_BYTES + s.payload.length);
  return out;
}

const THREE: Sample[] = [sample(1, ENTRY_TYPE.WRITE, 100), sample(2, ENTRY_TYPE.ZERO, 0), sample(3, ENTRY_TYPE.WRITE, 37), sample(4, ENTRY_TYPE.TRIM, 0)];

test('entries round-trip through encodeHeader and decodeEntryAt, payload as a view', () => {
  const log = encodeAll(THREE);
  let at = 0;
  for (const s of THREE) {
    const step = decodeEntryAt(log, at);
    assert.equal(step.status, 'entry');
    if (step.status !== 'entry') return;
    assert.deepEqual(step.entry, s.entry);
    assert.deepEqual(step.payload, s.payload);
    if (s.payload.length > 0) assert.equal(step.payload.buffer, log.buffer, 'payload must be a view, not a copy');
    at += step.sizeBytes;
  }
  assert.equal(at, log.length);
});

test('u64 fields up to 2^53-1 survive the round trip', () => {
  const big = Number.MAX_SAFE_INTEGER;
  const entry: LogEntry = { type: ENTRY_TYPE.TRIM, flags: 0xffff, sourceId: 0xffff_ffff, sequence: big, offset: big - 1, lengthBytes: 1 };
  const step = decodeEntryAt(encodeHeader(entry), 0);
  assert.equal(step.status, 'entry');
  if (step.status === 'entry') assert.deepEqual(step.entry, entry);
});

test('encodeHeader refuses entries that could not be decoded', () => {
  const ok = sample(1, ENTRY_TYPE.WRITE, 8);
  assert.throws(() => encodeHeader({ ...ok.entry, sequence: 0 }, ok.payload), /sequence/);
  assert.throws(() => encodeHeader({ ...ok.entry, lengthBytes: 9 }, ok.payload), /payload length/);
  assert.throws(() => encodeHeader({ ...ok.entry, type: ENTRY_TYPE.ZERO }, ok.payload), /payload length/);
  assert.throws(() => encodeHeader({ ...ok.entry, offset: Number.MAX_SAFE_INTEGER }, ok.payload), /out of range/);
  assert.throws(() => encodeHeader({ ...ok.entry, type: 9 as EntryType }, ok.payload), /unknown type/);
});

test('stream decoder yields the same entries at every split point of a two-chunk stream', () => {
  const log = encodeAll(THREE);
  for (let split = 0; split <= log.length; split++) {
    const decoder = new EntryStreamDecoder();
    const got: Sample[] = [];
    for (const chunk of [log.subarray(0, split), log.subarray(split)]) {
      decoder.push(chunk);
      for (;;) {
        const step = decoder.next();
        if (step.status === 'need-more') break;
        assert.equal(step.status, 'entry', `split ${split}`);
        if (step.status === 'entry') got.push({ entry: step.entry, payload: Buffer.from(step.payload) });
      }
    }
    assert.deepEqual(got, THREE, `split ${split}`);
    assert.equal(decoder.bufferedBytes, 0);
  }
});

test('stream decoder fed one byte at a time reports what it needs and decodes everything', () => {
  const log = encodeAll(THREE);
  const decoder = new EntryStreamDecoder();
  const got: LogEntry[] = [];
  for (let i = 0; i < log.length; i++) {
    decoder.push(log.subarray(i, i + 1));
    const step = decoder.next();
    if (step.status === 'entry') got.push(step.entry);
    else assert.equal(step.status, 'need-more');
  }
  assert.deepEqual(got, THREE.map((s) => s.entry));
});

test('stream decoder stops at an invalid entry and stays stopped', () => {
  const log = encodeAll(THREE);
  log[ENTRY_HEADER_BYTES + 5] = log[ENTRY_HEADER_BYTES + 5]! ^ 0x01; // inside the first payload
  const decoder = new EntryStreamDecoder();
  decoder.push(log);
  assert.deepEqual(decoder.next(), { status: 'invalid', reason: 'payload crc mismatch' });
  assert.equal(decoder.next().status, 'invalid');
});

test('a log cut at every byte decodes to its whole entries and a torn tail', () => {
  const log = encodeAll(THREE);
  const ends = boundaries(THREE);
  for (let cut = 0; cut <= log.length; cut++) {
    const { entries, end } = decodeLog(log.subarray(0, cut));
    const whole = ends.filter((b) => b <= cut).length - 1;
    assert.deepEqual(entries.map((e) => e.entry), THREE.slice(0, whole).map((s) => s.entry), `cut ${cut}`);
    if (ends.includes(cut)) assert.deepEqual(end, { kind: 'clean', at: cut, reason: 'end of input' }, `cut ${cut}`);
    else assert.equal(end.kind === 'torn' && end.at, ends[whole], `cut ${cut}`);
  }
});

test('a flipped bit anywhere in a middle entry is corruption; in the last entry a torn tail', () => {
  const log = encodeAll(THREE);
  const ends = boundaries(THREE);
  const middle = 2; // the third entry (a WRITE with payload) of four
  for (let byte = ends[middle]!; byte < ends[middle + 1]!; byte++) {
    const damaged = Buffer.from(log);
    damaged[byte] = damaged[byte]! ^ (1 << (byte % 8));
    const { entries, end } = decodeLog(damaged);
    assert.equal(entries.length, middle, `byte ${byte}`);
    assert.equal(end.kind, 'corrupt', `byte ${byte}`);
    assert.equal(end.kind === 'corrupt' && end.at, ends[middle]);
  }
  const lastEntries = [...THREE.slice(0, 3), sample(4, ENTRY_TYPE.WRITE, 64)];
  const lastLog = encodeAll(lastEntries);
  const lastEnds = boundaries(lastEntries);
  for (let byte = lastEnds[3]!; byte < lastLog.length; byte++) {
    const damaged = Buffer.from(lastLog);
    damaged[byte] = damaged[byte]! ^ 0x80;
    const { entries, end } = decodeLog(damaged);
    assert.equal(entries.length, 3, `byte ${byte}`);
    assert.equal(end.kind, 'torn', `byte ${byte}`);
  }
});

test('a sequence gap or duplicate is corruption even when every entry checks out', () => {
  const gap = encodeAll([sample(1, ENTRY_TYPE.ZERO, 0), sample(3, ENTRY_TYPE.ZERO, 0)]);
  assert.equal(decodeLog(gap).end.kind, 'corrupt');
  const duplicate = encodeAll([sample(5, ENTRY_TYPE.ZERO, 0), sample(5, ENTRY_TYPE.ZERO, 0)]);
  assert.equal(decodeLog(duplicate).end.kind, 'corrupt');
  assert.equal(decodeLog(encodeAll([sample(5, ENTRY_TYPE.ZERO, 0)]), { firstSequence: 4 }).end.kind, 'corrupt');
});

test('a torn entry whose payload holds a copy of a log is still a torn tail', () => {
  // A guest may store a mirrorsan log on its volume: entry-shaped bytes inside a payload
  // must not turn a torn tail into a false corruption.
  const nested = encodeAll([sample(10, ENTRY_TYPE.WRITE, 16), sample(11, ENTRY_TYPE.WRITE, 16)]);
  const carrier: Sample = {
    entry: { type: ENTRY_TYPE.WRITE, flags: 0, sourceId: 1, sequence: 2, offset: 0, lengthBytes: nested.length + 100 },
    payload: Buffer.concat([nested, Buffer.alloc(100, 0xee)]),
  };
  const log = encodeAll([sample(1, ENTRY_TYPE.ZERO, 0), carrier]);
  const damaged = Buffer.from(log);
  damaged[log.length - 1] = damaged[log.length - 1]! ^ 1; // payload crc now fails; the header is intact
  assert.equal(decodeLog(damaged).end.kind, 'torn');
  assert.equal(decodeLog(log.subarray(0, log.length - 50)).end.kind, 'torn');
});

test('an entry of another generation is foreign: never an entry, whatever its sequence', () => {
  const log = encodeAll(THREE, 0xdead_beef);
  assert.equal(decodeEntryAt(log, 0, 0xdead_beef).status, 'entry');
  assert.deepEqual(decodeEntryAt(log, 0, 7), { status: 'foreign', generation: 0xdead_beef });
  assert.deepEqual(decodeEntryAt(log, 0).status, 'foreign', 'generation 0 (outside containers) is a generation too');
  const decoder = new EntryStreamDecoder({ generation: 7 });
  decoder.push(log);
  assert.equal(decoder.next().status, 'invalid');
  const matching = new EntryStreamDecoder({ generation: 0xdead_beef });
  matching.push(log);
  assert.equal(matching.next().status, 'entry');
  // The header CRC covers the generation: changing it by hand breaks the header.
  const forged = Buffer.from(log);
  forged.writeUInt32LE(7, 40);
  assert.deepEqual(decodeEntryAt(forged, 0, 7), { status: 'invalid', reason: 'header crc mismatch', headerTrusted: false, sizeBytes: 0 });
});

test('retagHeader moves an encoded entry to another generation and keeps its payload CRC', () => {
  const s = sample(9, ENTRY_TYPE.WRITE, 300);
  const header = encodeHeader(s.entry, s.payload, 5);
  retagHeader(header, 6);
  assert.deepEqual(header, encodeHeader(s.entry, s.payload, 6));
  const step = decodeEntryAt(Buffer.concat([header, s.payload]), 0, 6);
  assert.equal(step.status, 'entry');
  assert.throws(() => retagHeader(header.subarray(1), 6), /assertion failed/);
});

test('a preallocated (zero-filled) container: zeros end the log cleanly, any leftover byte is a torn tail', () => {
  const generation = 41;
  const live = encodeAll(THREE, generation);
  const ends = boundaries(THREE);
  const image = Buffer.concat([live, Buffer.alloc(4096)]);
  assert.deepEqual(decodeLog(image, { generation }).end, { kind: 'clean', at: live.length, reason: 'unwritten space (zeros)' });
  // The last entry written only up to byte `cut`, the rest still zeros: torn, except when
  // nothing of it reached the disk.
  const lastStart = ends[3]!;
  for (let cut = lastStart; cut < live.length; cut++) {
    const torn = Buffer.from(image);
    torn.fill(0, cut, live.length);
    const { entries, end } = decodeLog(torn, { generation });
    assert.equal(entries.length, 3, `cut ${cut}`);
    assert.equal(end.kind, cut === lastStart ? 'clean' : 'torn', `cut ${cut}`);
    assert.equal(end.at, lastStart);
  }
  // A stray non-zero byte far after the entries was written by this life too.
  const stray = Buffer.from(image);
  stray[image.length - 1] = 1;
  assert.equal(decodeLog(stray, { generation }).end.kind, 'torn');
});

test('a reused container: stale entries after the live ones end the log cleanly, even with the expected sequence', () => {
  const oldGeneration = 1000;
  const generation = 2000;
  // An earlier life wrote entries 1..40 of 64 bytes; this life wrote 1..3 over its start.
  const old = encodeAll(Array.from({ length: 40 }, (_, i) => sample(i + 1, ENTRY_TYPE.WRITE, 64)), oldGeneration);
  const live = encodeAll(THREE, generation);
  const image = Buffer.from(old);
  live.copy(image, 0);
  const { entries, end } = decodeLog(image, { generation, staleTail: true });
  assert.deepEqual(entries.map((e) => e.entry), THREE.map((s) => s.entry));
  assert.equal(end.kind, 'clean');
  assert.equal(end.at, live.length);
  // Worst case: right after the live entries sits an old entry whose sequence is exactly the
  // next one expected (sequences are reused after a crash cuts a tail). It is still foreign.
  const next = encodeAll([sample(5, ENTRY_TYPE.WRITE, 64)], oldGeneration);
  next.copy(image, live.length);
  const again = decodeLog(image, { generation, staleTail: true });
  assert.equal(again.entries.length, 4);
  assert.deepEqual(again.end, { kind: 'clean', at: live.length, reason: `entry of generation ${oldGeneration} (an earlier life of the file)` });
  // In a zero-filled container the same bytes would be this life's: torn.
  assert.equal(decodeLog(image, { generation }).end.kind, 'torn');
  // A torn header of this life is indistinguishable from stale bytes there (and as harmless),
  // but a trusted header whose payload is incomplete is a torn tail.
  const tornPayload = Buffer.from(image);
  const fourth = encodeAll([sample(5, ENTRY_TYPE.WRITE, 64, 0x99)], generation);
  fourth.copy(tornPayload, live.length, 0, fourth.length - 10);
  assert.equal(decodeLog(tornPayload, { generation, staleTail: true }).end.kind, 'torn');
  const tornHeader = Buffer.from(image);
  fourth.copy(tornHeader, live.length, 0, 20);
  assert.equal(decodeLog(tornHeader, { generation, staleTail: true }).end.kind, 'clean');
});

test('corruption in a reused container is found among stale entries', () => {
  const generation = 77;
  const old = encodeAll(Array.from({ length: 40 }, (_, i) => sample(i + 1, ENTRY_TYPE.ZERO, 0)), 76);
  const live = encodeAll(THREE, generation);
  const image = Buffer.concat([live, old]);
  const ends = boundaries(THREE);
  const damaged = Buffer.from(image);
  damaged[ends[1]! + 10] = damaged[ends[1]! + 10]! ^ 0x10; // the second live entry
  const { entries, end } = decodeLog(damaged, { generation, staleTail: true });
  assert.equal(entries.length, 1);
  assert.equal(end.kind, 'corrupt');
  assert.equal(end.at, ends[1]);
  // Damage to the last live entry has only stale entries after it: torn, not corrupt.
  const last = Buffer.from(image);
  last[ends[3]! + 10] = last[ends[3]! + 10]! ^ 0x10; // the header of the fourth (a TRIM: header only)
  assert.equal(decodeLog(last, { generation, staleTail: true }).end.kind, 'clean', 'an untrusted header among stale bytes');
  const payloadDamage = Buffer.from(image);
  payloadDamage[ends[2]! + ENTRY_HEADER_BYTES + 3] = payloadDamage[ends[2]! + ENTRY_HEADER_BYTES + 3]! ^ 1; // third entry's payload
  assert.equal(decodeLog(payloadDamage, { generation, staleTail: true }).end.kind, 'corrupt', 'a valid fourth entry follows');
});

test('judgeLogEnd: the verdicts, case by case', () => {
  const trusted = { status: 'invalid', reason: 'payload crc mismatch', headerTrusted: true, sizeBytes: 100 } as const;
  const garbage = { status: 'invalid', reason: 'bad magic', headerTrusted: false, sizeBytes: 0 } as const;
  const foreign = { status: 'foreign', generation: 3 } as const;
  const cut = { status: 'incomplete', neededBytes: 100, headerTrusted: true } as const;
  for (const staleTail of [false, true]) {
    assert.equal(judgeLogEnd(trusted, { staleTail, nonZeroAfter: true }).kind, 'torn');
    assert.equal(judgeLogEnd(cut, { staleTail, nonZeroAfter: true }).kind, 'torn');
    assert.equal(judgeLogEnd(garbage, { staleTail, nonZeroAfter: false }).kind, 'clean');
  }
  assert.equal(judgeLogEnd(garbage, { staleTail: false, nonZeroAfter: true }).kind, 'torn');
  assert.equal(judgeLogEnd(foreign, { staleTail: false, nonZeroAfter: true }).kind, 'torn');
  assert.equal(judgeLogEnd(garbage, { staleTail: true, nonZeroAfter: true }).kind, 'clean');
  assert.equal(judgeLogEnd(foreign, { staleTail: true, nonZeroAfter: true }).kind, 'clean');
});

const entryArb = fc
  .record({
    type: fc.constantFrom<EntryType>(ENTRY_TYPE.WRITE, ENTRY_TYPE.ZERO, ENTRY_TYPE.TRIM),
    flags: fc.integer({ min: 0, max: 0xffff }),
    sourceId: fc.integer({ min: 0, max: 0xffff_ffff }),
    offset: fc.integer({ min: 0, max: 2 ** 40 }),
    length: fc.integer({ min: 1, max: 300 }),
    fill: fc.integer({ min: 0, max: 255 }),
  })
  .map((r) => r);

test('fast-check: random bytes never throw anything but MirrorsanError', () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 400 }), fc.integer({ min: 1, max: 64 }), (bytes, chunkBytes) => {
      const buf = Buffer.from(bytes);
      try {
        decodeLog(buf);
        for (let at = 0; at < buf.length; at += 7) decodeEntryAt(buf, at);
        const decoder = new EntryStreamDecoder();
        for (let at = 0; at < buf.length; at += chunkBytes) {
          decoder.push(buf.subarray(at, at + chunkBytes));
          while (decoder.next().status === 'entry');
        }
      } catch (error) {
        if (!isMirrorsanError(error)) throw error;
      }
    }),
    { numRuns: 2000 },
  );
});

test('fast-check: random bytes spliced into a valid log never decode as extra entries', () => {
  fc.assert(
    fc.property(fc.array(entryArb, { minLength: 1, maxLength: 6 }), fc.uint8Array({ minLength: 1, maxLength: 80 }), (records, junk) => {
      const samples = records.map((r, i): Sample => {
        const payload = r.type === ENTRY_TYPE.WRITE ? Buffer.alloc(r.length, r.fill) : Buffer.alloc(0);
        return { entry: { type: r.type, flags: r.flags, sourceId: r.sourceId, sequence: i + 1, offset: r.offset, lengthBytes: r.length }, payload };
      });
      const log = Buffer.concat([encodeAll(samples), Buffer.from(junk)]);
      const { entries, end } = decodeLog(log);
      assert.deepEqual(entries.map((e) => e.entry), samples.map((s) => s.entry));
      // Zeros are unwritten space (a preallocated container); any other junk is a torn tail.
      assert.equal(end.kind, junk.every((byte) => byte === 0) ? 'clean' : 'torn');
    }),
    { numRuns: 300 },
  );
});

test('fast-check: a valid log cut at any byte decodes to the prefix of whole entries', () => {
  fc.assert(
    fc.property(
      fc.array(entryArb, { minLength: 1, maxLength: 8 }),
      fc.integer({ min: 1, max: 2 ** 40 }),
      fc.double({ min: 0, max: 1, noNaN: true }),
      (records, firstSequence, cutFraction) => {
        const samples = records.map((r, i): Sample => {
          const payload = r.type === ENTRY_TYPE.WRITE ? Buffer.alloc(r.length, r.fill) : Buffer.alloc(0);
          return {
            entry: { type: r.type, flags: r.flags, sourceId: r.sourceId, sequence: firstSequence + i, offset: r.offset, lengthBytes: r.length },
            payload,
          };
        });
        const log = encodeAll(samples);
        const cut = Math.floor(cutFraction * log.length);
        const ends = boundaries(samples);
        const whole = ends.filter((b) => b <= cut).length - 1;
        const { entries, end } = decodeLog(log.subarray(0, cut), { firstSequence });
        assert.deepEqual(entries.map((e) => e.entry), samples.slice(0, whole).map((s) => s.entry));
        entries.forEach((e, i) => assert.deepEqual(e.payload, samples[i]!.payload));
        assert.equal(end.kind, ends.includes(cut) ? 'clean' : 'torn');
      },
    ),
    { numRuns: 500 },
  );
});
