// Proves every NBD command and flag against the server with simple, structured and extended replies, the spec's error for every invalid request, and that the connection survives each refusal.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { MirrorsanError } from '../errors.js';
import { MemoryDevice } from '../volume/memory-device.js';
import { NbdClient, NbdClientError, type NbdClientOptions, type RawReply } from './client.js';
import { decodeOffsetData, decodeOffsetHole, encodeInfoRequestData, encodeRequestHeader } from './codec.js';
import { HookedDevice, RawConnection, pattern, startServer, type TestServer } from './fixtures.js';
import { CMD, CMD_FLAG, ERRNO, OPT, REP, REPLY_TYPE } from './protocol.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function errnoOf(promise: Promise<unknown>): Promise<number | undefined> {
  try {
    await promise;
    return 0;
  } catch (error) {
    assert.ok(error instanceof NbdClientError, `expected NbdClientError, got ${String(error)}`);
    return error.nbdError;
  }
}

const MODES: Array<[string, NbdClientOptions]> = [
  ['simple', { structuredReplies: false }],
  ['structured', { structuredReplies: true, metaContexts: ['base:allocation'] }],
  ['extended', { extendedHeaders: true, metaContexts: ['base:allocation'] }],
];

describe('NBD transmission', () => {
  let t: TestServer;
  let hooked: HookedDevice;
  let slowZero: MemoryDevice;
  before(async () => {
    hooked = new HookedDevice(new MemoryDevice({ name: 'inner', sizeBytes: 8 * MiB }), 'hooked');
    slowZero = new MemoryDevice({ name: 'slowzero', sizeBytes: MiB, fastZero: false });
    t = await startServer({
      extra: [
        new MemoryDevice({ name: 'ro', sizeBytes: MiB, readOnly: true }),
        new MemoryDevice({ name: 'aligned', sizeBytes: 4 * MiB, blockSizeMin: 512, payloadMaxBytes: MiB }),
        hooked,
        slowZero,
      ],
    });
  });
  after(() => t.close());

  const connect = (exportName: string, options: NbdClientOptions = {}) =>
    NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName, ...options });

  for (const [mode, options] of MODES) {
    describe(`${mode} replies`, () => {
      it('negotiates the mode asked for', async () => {
        const client = await connect('disk', options);
        assert.equal(client.structuredReplies, mode === 'structured');
        assert.equal(client.extendedHeaders, mode === 'extended');
        await client.disconnect();
      });

      it('WRITE, READ, FLUSH, CACHE and FUA on every command', async () => {
        const client = await connect('disk', options);
        const base = { simple: 0, structured: 16, extended: 32 }[mode as 'simple'] * MiB;
        const data = pattern(base, 300 * KiB);
        const fuaBefore = t.device.counters.fuaWrites;
        await client.write(base, data, { fua: true });
        assert.equal(t.device.counters.fuaWrites, fuaBefore + 1, 'FUA reaches the device');
        assert.deepEqual(await client.read(base, data.length), data);
        assert.deepEqual(await client.read(base + 1000, 5000, { fua: true }), data.subarray(1000, 6000));
        const flushes = t.device.counters.flushes;
        await client.flush();
        assert.equal(t.device.counters.flushes, flushes + 1);
        await client.cache(base, MiB);
        // [NBD: NBD_CMD_FLAG_FUA] valid on every command once SEND_FUA is advertised.
        const withFua: Array<Parameters<NbdClient['rawRequest']>[0]> = [
          { type: CMD.READ, offset: base, length: 512 },
          { type: CMD.WRITE, offset: base, payload: data.subarray(0, 512) },
          { type: CMD.FLUSH },
          { type: CMD.TRIM, offset: base + 512 * KiB, length: 4096 },
          { type: CMD.CACHE, offset: base, length: 4096 },
          { type: CMD.WRITE_ZEROES, offset: base + 512 * KiB, length: 4096 },
        ];
        if (mode !== 'simple') withFua.push({ type: CMD.BLOCK_STATUS, offset: base, length: 4096 });
        for (const request of withFua) {
          const flags = CMD_FLAG.FUA | (mode === 'extended' && request.type === CMD.WRITE ? CMD_FLAG.PAYLOAD_LEN : 0);
          const reply = await client.rawRequest({ ...request, flags });
          assert.equal(reply.error, 0, `FUA on command ${request.type}`);
        }
        await client.disconnect();
      });

      it('READ reports holes: zeros in a simple reply, OFFSET_HOLE chunks otherwise', async () => {
        const client = await connect('disk', options);
        const base = 48 * MiB + { simple: 0, structured: 1, extended: 2 }[mode as 'simple'] * MiB;
        await client.write(base + 64 * KiB, Buffer.alloc(64 * KiB, 0xee));
        const whole = await client.read(base, 256 * KiB);
        assert.equal(whole.subarray(0, 64 * KiB).every((b) => b === 0), true);
        assert.equal(whole.subarray(64 * KiB, 128 * KiB).every((b) => b === 0xee), true);
        assert.equal(whole.subarray(128 * KiB).every((b) => b === 0), true);
        const raw = await client.rawRequest({ type: CMD.READ, offset: base, length: 256 * KiB });
        if (mode === 'simple') {
          assert.equal(raw.simple, true);
          assert.equal(raw.data?.length, 256 * KiB);
        } else {
          assert.deepEqual(raw.chunks.map((c) => c.type), [REPLY_TYPE.OFFSET_HOLE, REPLY_TYPE.OFFSET_DATA, REPLY_TYPE.OFFSET_HOLE]);
          assert.deepEqual(decodeOffsetHole(raw.chunks[0]!.payload), { offset: base, lengthBytes: 64 * KiB });
          assert.equal(decodeOffsetData(raw.chunks[1]!.payload).offset, base + 64 * KiB);
          assert.deepEqual(raw.chunks.map((c) => c.flags & 1), [0, 0, 1], 'DONE on the last chunk only');
          if (mode === 'extended') assert.deepEqual(raw.chunks.map((c) => c.offset), [base, base, base], 'extended chunks echo the request offset');
        }
        await client.disconnect();
      });

      it('TRIM and WRITE_ZEROES (NO_HOLE, FAST_ZERO, FUA) leave zeros and the right allocation', async () => {
        const client = await connect('disk', options);
        const base = 56 * MiB + { simple: 0, structured: 2, extended: 4 }[mode as 'simple'] * MiB;
        await client.write(base, Buffer.alloc(MiB, 0x33));
        await client.trim(base, 256 * KiB, { fua: true });
        await client.writeZeroes(base + 256 * KiB, 256 * KiB, { noHole: true, fua: true });
        await client.writeZeroes(base + 512 * KiB, 256 * KiB, { fastZero: true });
        await client.writeZeroes(base + 768 * KiB + 100, 100);
        const bytes = await client.read(base, MiB);
        assert.equal(bytes.subarray(256 * KiB, 768 * KiB).every((b) => b === 0), true);
        assert.equal(bytes.subarray(768 * KiB + 100, 768 * KiB + 200).every((b) => b === 0), true);
        assert.equal(bytes[768 * KiB + 99], 0x33);
        assert.deepEqual(t.device.blockStatus(base, MiB).map((e) => [e.length, e.hole, e.zero]), [
          [256 * KiB, true, true],
          [256 * KiB, false, true],
          [256 * KiB, true, true],
          [256 * KiB, false, false],
        ]);
        await client.disconnect();
      });

      if (mode !== 'simple') {
        it('BLOCK_STATUS: one chunk for base:allocation, clipped to the request, REQ_ONE gives one extent', async () => {
          const client = await connect('disk', options);
          const base = 40 * MiB + (mode === 'extended' ? 2 * MiB : 0);
          await client.write(base + 8 * KiB, Buffer.alloc(8 * KiB, 1));
          await client.writeZeroes(base + 16 * KiB, 8 * KiB, { noHole: true });
          const extents = await client.blockStatus(base, 32 * KiB);
          assert.deepEqual(extents.map((e) => [e.offset - base, e.length, e.flags]), [
            [0, 8 * KiB, 3],
            [8 * KiB, 8 * KiB, 0],
            [16 * KiB, 8 * KiB, 2],
            [24 * KiB, 8 * KiB, 3],
          ]);
          assert.deepEqual((await client.blockStatus(base + 12 * KiB, 2 * KiB)).map((e) => [e.length, e.flags]), [[2 * KiB, 0]]);
          const one = await client.blockStatus(base, 32 * KiB, { reqOne: true });
          assert.deepEqual(one.map((e) => [e.length, e.flags]), [[8 * KiB, 3]]);
          const raw = await client.rawRequest({ type: CMD.BLOCK_STATUS, offset: base, length: 32 * KiB });
          assert.deepEqual(raw.chunks.map((c) => c.type), [mode === 'extended' ? REPLY_TYPE.BLOCK_STATUS_EXT : REPLY_TYPE.BLOCK_STATUS]);
          await client.disconnect();
        });

        it('DF READ comes back as one OFFSET_DATA chunk, holes included as zero bytes', async () => {
          const client = await connect('disk', options);
          assert.equal(client.canDf, true);
          const base = 44 * MiB + (mode === 'extended' ? MiB : 0);
          await client.write(base + 4 * KiB, Buffer.alloc(4 * KiB, 9));
          const raw = await client.rawRequest({ type: CMD.READ, flags: CMD_FLAG.DF, offset: base, length: 16 * KiB });
          assert.deepEqual(raw.chunks.map((c) => c.type), [REPLY_TYPE.OFFSET_DATA]);
          const { offset, data } = decodeOffsetData(raw.chunks[0]!.payload);
          assert.equal(offset, base);
          assert.deepEqual(data, Buffer.concat([Buffer.alloc(4 * KiB), Buffer.alloc(4 * KiB, 9), Buffer.alloc(8 * KiB)]));
          await client.disconnect();
        });
      }

      it('refuses invalid requests with the spec error and keeps serving', async () => {
        const client = await connect('disk', options);
        const size = client.sizeBytes;
        const cases: Array<[string, Promise<unknown>, number]> = [
          ['write past the end', client.write(size - 100, Buffer.alloc(200)), ERRNO.ENOSPC],
          ['write-zeroes past the end', client.writeZeroes(size - 100, 200), ERRNO.ENOSPC],
          ['read past the end', client.read(size - 100, 200), ERRNO.EINVAL],
          ['read starting past the end', client.read(size + 4096, 512), ERRNO.EINVAL],
          ['trim past the end', client.trim(size, 512), ERRNO.EINVAL],
          ['cache past the end', client.cache(size - 512, 1024), ERRNO.EINVAL],
          ['zero-length read', client.read(0, 0), ERRNO.EINVAL],
          ['zero-length trim', client.trim(0, 0), ERRNO.EINVAL],
          ['zero-length write-zeroes', client.writeZeroes(0, 0), ERRNO.EINVAL],
          ['read over the maximum payload', client.read(0, 33 * MiB), mode === 'simple' ? ERRNO.EINVAL : ERRNO.EOVERFLOW],
        ];
        if (mode !== 'simple') {
          cases.push(['block status past the end', client.blockStatus(size - 512, 1024), ERRNO.EINVAL]);
          cases.push(['zero-length block status', client.blockStatus(0, 0), ERRNO.EINVAL]);
          cases.push(['DF read over the maximum payload', client.read(0, 33 * MiB, { df: true }), ERRNO.EOVERFLOW]);
        }
        for (const [what, promise, errno] of cases) assert.equal(await errnoOf(promise), errno, what);
        const raw = async (fields: Parameters<NbdClient['rawRequest']>[0]): Promise<RawReply> => client.rawRequest(fields);
        const rawCases: Array<[string, Parameters<NbdClient['rawRequest']>[0], number]> = [
          ['unknown command', { type: 42, offset: 0, length: 512 }, ERRNO.EINVAL],
          ['RESIZE (not implemented)', { type: CMD.RESIZE, offset: 0, length: 0 }, ERRNO.EINVAL],
          ['NO_HOLE on READ', { type: CMD.READ, flags: CMD_FLAG.NO_HOLE, offset: 0, length: 512 }, ERRNO.EINVAL],
          ['REQ_ONE on TRIM', { type: CMD.TRIM, flags: CMD_FLAG.REQ_ONE, offset: 0, length: 512 }, ERRNO.EINVAL],
          ['FAST_ZERO on TRIM', { type: CMD.TRIM, flags: CMD_FLAG.FAST_ZERO, offset: 0, length: 512 }, ERRNO.EINVAL],
          ['unknown flag bit', { type: CMD.FLUSH, flags: 1 << 9 }, ERRNO.EINVAL],
          ['FLUSH with an offset', { type: CMD.FLUSH, offset: 512 }, ERRNO.EINVAL],
        ];
        if (mode === 'simple') rawCases.push(['DF without structured replies', { type: CMD.READ, flags: CMD_FLAG.DF, offset: 0, length: 512 }, ERRNO.EINVAL]);
        if (mode !== 'extended') rawCases.push(['PAYLOAD_LEN with compact headers', { type: CMD.READ, flags: CMD_FLAG.PAYLOAD_LEN, offset: 0, length: 512 }, ERRNO.EINVAL]);
        for (const [what, fields, errno] of rawCases) {
          const reply = await raw(fields);
          assert.equal(reply.error, errno, what);
          if (mode !== 'simple') assert.ok(reply.message.length > 0, `${what}: error chunks carry a message`);
        }
        // The connection is fine after all that.
        await client.write(0, Buffer.from('ok'));
        assert.equal((await client.read(0, 2)).toString(), 'ok');
        await client.disconnect();
      });

      it('a WRITE over the maximum payload (but under 32 MiB) is consumed and refused with EINVAL', async () => {
        const client = await connect('aligned', options);
        assert.equal(await errnoOf(client.write(0, Buffer.alloc(MiB + 512, 1))), ERRNO.EINVAL);
        await client.write(0, Buffer.alloc(512, 2));
        assert.equal((await client.read(0, 512))[0], 2);
        await client.disconnect();
      });

      it('misaligned requests on an export with a 512-byte minimum block size get EINVAL', async () => {
        const client = await connect('aligned', options);
        assert.equal(await errnoOf(client.read(100, 512)), ERRNO.EINVAL);
        assert.equal(await errnoOf(client.read(512, 100)), ERRNO.EINVAL);
        assert.equal(await errnoOf(client.write(512, Buffer.alloc(513))), ERRNO.EINVAL);
        assert.equal(await errnoOf(client.trim(1, 512)), ERRNO.EINVAL);
        assert.equal(await errnoOf(client.writeZeroes(512, 1)), ERRNO.EINVAL);
        assert.equal((await client.read(512, 512)).length, 512);
        await client.disconnect();
      });

      it('writes, trims and zeroes on a read-only export get EPERM', async () => {
        const client = await connect('ro', options);
        assert.equal(await errnoOf(client.write(0, Buffer.alloc(512))), ERRNO.EPERM);
        assert.equal(await errnoOf(client.trim(0, 512)), ERRNO.EPERM);
        assert.equal(await errnoOf(client.writeZeroes(0, 512)), ERRNO.EPERM);
        assert.equal((await client.read(0, 512)).length, 512);
        await client.flush();
        await client.disconnect();
      });

      it('maps device errors: NBD codes to their errno, anything else to EIO with an error log line', async () => {
        const client = await connect('hooked', options);
        hooked.failWith = (operation) => (operation === 'write' ? new MirrorsanError('NBD_ENOSPC', 'volume full') : undefined);
        assert.equal(await errnoOf(client.write(0, Buffer.alloc(512))), ERRNO.ENOSPC);
        hooked.failWith = (operation) => (operation === 'read' ? new MirrorsanError('NBD_EIO', 'disk gone') : undefined);
        // A simple-reply READ error goes out before any data: the next request must still parse.
        assert.equal(await errnoOf(client.read(0, 64 * KiB)), ERRNO.EIO);
        hooked.failWith = (operation) => (operation === 'flush' ? new TypeError('bug in the storage layer') : undefined);
        assert.equal(await errnoOf(client.flush()), ERRNO.EIO);
        assert.ok(t.logger.lines.some((line) => line.includes('error') && line.includes('device failed a request') && line.includes('bug in the storage layer')));
        hooked.failWith = undefined;
        await client.write(0, Buffer.from('fine'));
        assert.equal((await client.read(0, 4)).toString(), 'fine');
        await client.disconnect();
      });

      it('FAST_ZERO that the device cannot do fast gets ENOTSUP, and the data is untouched', async () => {
        const client = await connect('slowzero', options);
        assert.equal(client.canFastZero, true);
        await client.write(0, Buffer.alloc(4 * KiB, 5));
        assert.equal(await errnoOf(client.writeZeroes(0, 4 * KiB, { fastZero: true })), ERRNO.ENOTSUP);
        assert.equal((await client.read(0, 1))[0], 5);
        await client.writeZeroes(0, 4 * KiB);
        assert.equal((await client.read(0, 1))[0], 0);
        await client.disconnect();
      });
    });
  }

  describe('transmission framing', () => {
    it('BLOCK_STATUS without a negotiated context is EINVAL', async () => {
      const client = await connect('disk', { structuredReplies: true });
      const reply = await client.rawRequest({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 });
      assert.equal(reply.error, ERRNO.EINVAL);
      await client.disconnect();
    });

    it('extended headers: 64-bit effect lengths, a WRITE without PAYLOAD_LEN, and a payload on a command that takes none', async () => {
      const client = await connect('disk', { extendedHeaders: true, metaContexts: ['base:allocation'] });
      assert.equal((await client.rawRequest({ type: CMD.TRIM, offset: 0, length: 2n ** 40n })).error, ERRNO.EINVAL);
      assert.equal((await client.rawRequest({ type: CMD.WRITE, offset: 0, length: 512 })).error, ERRNO.EINVAL, 'extended WRITE needs PAYLOAD_LEN');
      // [NBD: Request message] the payload is consumed before EINVAL, so framing survives.
      const withPayload = await client.rawRequest({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.PAYLOAD_LEN, offset: 0, payload: Buffer.alloc(12) });
      assert.equal(withPayload.error, ERRNO.EINVAL);
      const status = await client.blockStatus(0, 64 * MiB);
      assert.equal(status.reduce((sum, e) => sum + e.length, 0), 64 * MiB);
      await client.disconnect();
    });

    it('garbage instead of a request magic closes that connection only, with a log line', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
      raw.send(Buffer.alloc(28, 0x41));
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('request magic 0x41414141')));
      const client = await connect('disk');
      assert.equal((await client.read(0, 512)).length, 512);
      await client.disconnect();
    });

    it('a WRITE payload over the 32 MiB hard cap is a denial of service: closed', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []));
      raw.send(encodeRequestHeader({ cookie: 1n, type: CMD.WRITE, flags: 0, offset: 0, length: 64 * MiB }, false));
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('exceeds the 33554432-byte cap')));
    });
  });
});
