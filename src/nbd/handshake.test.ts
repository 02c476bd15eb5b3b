// Proves the server's handshake: fixed and plain newstyle, every option (INFO, GO, LIST, ABORT, meta contexts, structured replies, extended headers, unknown ones) and every malformed-handshake case closing only the offending connection, with a log line.
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import { MemoryDevice } from '../volume/memory-device.js';
import { NbdClient, NbdClientError } from './client.js';
import {
  ReplyParser,
  decodeRepInfo,
  decodeRepMetaContext,
  decodeRepServer,
  encodeInfoRequestData,
  encodeMetaContextData,
  encodeOptionRequest,
  encodeRequestHeader,
} from './codec.js';
import { RawConnection, duplexPair, eventually, run, startServer, type TestServer } from './fixtures.js';
import { CMD, ERRNO, INFO, OPT, REP, REP_ERR, TRANSMISSION_FLAG } from './protocol.js';

const MiB = 1 << 20;

describe('NBD handshake', () => {
  let t: TestServer;
  before(async () => {
    t = await startServer({
      extra: [
        new MemoryDevice({ name: 'ro', description: 'read-only disk', sizeBytes: MiB, readOnly: true, multiConn: false }),
        new MemoryDevice({ name: 'aligned', sizeBytes: 4 * MiB, blockSizeMin: 512, blockSizePreferred: 4096, payloadMaxBytes: MiB }),
      ],
    });
  });
  after(() => t.close());

  const target = () => ({ host: '127.0.0.1', port: t.port });

  /** A healthy client still works: violations must only close their own connection. */
  async function othersUnaffected(): Promise<void> {
    const client = await NbdClient.connect(target(), { exportName: 'disk' });
    await client.write(0, Buffer.from('still alive'));
    assert.equal((await client.read(0, 11)).toString(), 'still alive');
    await client.disconnect();
  }

  function logged(fragment: string): boolean {
    return t.logger.lines.some((line) => line.includes(fragment));
  }

  describe('negotiation styles', () => {
    it('fixed newstyle with GO: size, flags, block sizes, name and description', async () => {
      const client = await NbdClient.connect(target(), { exportName: 'disk' });
      assert.equal(client.sizeBytes, 64 * MiB);
      assert.equal(client.structuredReplies, true);
      assert.deepEqual(client.blockSizes, { minimum: 1, preferred: 4096, maximum: 32 * MiB });
      assert.equal(client.canonicalName, 'disk');
      assert.equal(client.description, 'test disk');
      const expected =
        TRANSMISSION_FLAG.HAS_FLAGS | TRANSMISSION_FLAG.SEND_FLUSH | TRANSMISSION_FLAG.SEND_FUA | TRANSMISSION_FLAG.SEND_TRIM |
        TRANSMISSION_FLAG.SEND_WRITE_ZEROES | TRANSMISSION_FLAG.SEND_DF | TRANSMISSION_FLAG.CAN_MULTI_CONN |
        TRANSMISSION_FLAG.SEND_CACHE | TRANSMISSION_FLAG.SEND_FAST_ZERO;
      assert.equal(client.transmissionFlags, expected, `flags 0x${client.transmissionFlags.toString(16)}`);
      await client.disconnect();
    });

    it('greets with FIXED_NEWSTYLE | NO_ZEROES', async () => {
      const raw = await RawConnection.connect(t.port);
      assert.equal(await raw.greet(), 3);
      raw.destroy();
    });

    it('plain newstyle (client flags 0): EXPORT_NAME with the 124 zero bytes, then transmission', async () => {
      const client = await NbdClient.connect(target(), { exportName: 'disk', clientFlags: 0 });
      assert.equal(client.sizeBytes, 64 * MiB);
      assert.equal(client.structuredReplies, false);
      // [NBD: Transmission flags] SEND_DF needs structured replies.
      assert.equal(client.transmissionFlags & TRANSMISSION_FLAG.SEND_DF, 0);
      await client.write(4096, Buffer.from('plain'));
      assert.equal((await client.read(4096, 5)).toString(), 'plain');
      await client.disconnect();
    });

    it('plain newstyle clients get ERR_INVALID for anything but EXPORT_NAME', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet(0);
      const [reply] = await raw.exchange(OPT.LIST);
      assert.equal(reply?.type, REP_ERR.INVALID);
      raw.destroy();
    });

    for (const [clientFlags, answerBytes] of [[3, 10], [1, 134]] as const) {
      it(`EXPORT_NAME answers with ${answerBytes} bytes for client flags ${clientFlags}`, async () => {
        const raw = await RawConnection.connect(t.port);
        await raw.greet(clientFlags);
        raw.option(OPT.EXPORT_NAME, Buffer.from('disk'));
        const answer = await raw.bytes(answerBytes);
        assert.equal(answer.readBigUInt64BE(0), BigInt(64 * MiB));
        assert.equal(answer.subarray(10).every((b) => b === 0), true);
        // Framing is exact: the next bytes are the reply to our first request.
        raw.send(encodeRequestHeader({ cookie: 77n, type: CMD.FLUSH, flags: 0, offset: 0, length: 0 }, false));
        const reply = await raw.bytes(16);
        assert.equal(reply.readUInt32BE(0), 0x67446698);
        assert.equal(reply.readBigUInt64BE(8), 77n);
        raw.destroy();
      });
    }

    it('falls back to EXPORT_NAME when asked (useExportName)', async () => {
      const client = await NbdClient.connect(target(), { exportName: 'ro', useExportName: true });
      assert.equal(client.sizeBytes, MiB);
      assert.equal(client.readOnly, true);
      assert.equal(client.blockSizes, undefined);
      await client.disconnect();
    });

    it('listens on a unix socket as well', async () => {
      const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-nbd-unix-'));
      const path = join(dir, 'nbd.sock');
      try {
        assert.deepEqual(await t.server.listen({ path }), { kind: 'unix', path });
        const client = await NbdClient.connect({ path }, { exportName: 'disk' });
        assert.equal(client.sizeBytes, 64 * MiB);
        await client.disconnect();
        const result = await run('nbdinfo', ['--size', `nbd+unix:///disk?socket=${path}`]);
        assert.equal(result.stdout.trim(), String(64 * MiB), result.stderr);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });

    it('long descriptions are cut to 4096 bytes rather than breaking LIST', async () => {
      const registry = t.registry;
      registry.add(new MemoryDevice({ name: 'wordy', description: 'x'.repeat(5000), sizeBytes: MiB }));
      try {
        const exports = await NbdClient.listExports(target());
        assert.equal(exports.find((e) => e.name === 'wordy')?.description.length, 4096);
      } finally {
        registry.remove('wordy');
      }
    });

    it('serves a client over an in-memory duplex pair too', async () => {
      const [serverSide, clientSide] = duplexPair();
      t.server.handleConnection(serverSide, 'memory-pair');
      const client = await NbdClient.over(clientSide, { exportName: 'disk', metaContexts: ['base:allocation'] });
      await client.write(MiB, Buffer.alloc(4096, 1));
      assert.equal((await client.read(MiB, 4096)).every((b) => b === 1), true);
      assert.equal((await client.blockStatus(MiB, 4096))[0]?.hole, false);
      await client.disconnect();
    });
  });

  describe('options', () => {
    it('an unknown option gets ERR_UNSUP and a GO on the same connection still succeeds', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const [unsup] = await raw.exchange(0x7777, Buffer.alloc(100, 1));
      assert.equal(unsup?.type, REP_ERR.UNSUP);
      assert.equal(unsup?.option, 0x7777);
      const peek = await raw.exchange(OPT.PEEK_EXPORT);
      assert.equal(peek[0]?.type, REP_ERR.UNSUP);
      const replies = await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []));
      assert.equal(replies.at(-1)?.type, REP.ACK);
      raw.destroy();
    });

    it('ABORT is acknowledged, then the server closes', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const [ack] = await raw.exchange(OPT.ABORT);
      assert.equal(ack?.type, REP.ACK);
      assert.equal(await raw.closedWithin(2000), true);
    });

    it('LIST sends one REP_SERVER per export with its description, then ACK; data is invalid', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const replies = await raw.exchange(OPT.LIST);
      assert.deepEqual(replies.map((r) => r.type), [REP.SERVER, REP.SERVER, REP.SERVER, REP.ACK]);
      assert.deepEqual(replies.slice(0, 3).map((r) => decodeRepServer(r.data)), [
        { name: 'disk', description: 'test disk' },
        { name: 'ro', description: 'read-only disk' },
        { name: 'aligned', description: '' },
      ]);
      const [invalid] = await raw.exchange(OPT.LIST, Buffer.from('x'));
      assert.equal(invalid?.type, REP_ERR.INVALID);
      raw.destroy();
      assert.deepEqual((await NbdClient.listExports(target())).map((e) => e.name), ['disk', 'ro', 'aligned']);
    });

    it('INFO returns every info type asked for, ignores unknown ones, and stays in haggling', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const replies = await raw.exchange(OPT.INFO, encodeInfoRequestData('aligned', [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE, 999, INFO.EXPORT]));
      assert.equal(replies.at(-1)?.type, REP.ACK);
      const infos = replies.slice(0, -1).map((r) => decodeRepInfo(r.data));
      assert.deepEqual(infos, [
        { type: INFO.EXPORT, sizeBytes: 4 * MiB, transmissionFlags: infos[0]?.type === INFO.EXPORT ? infos[0].transmissionFlags : -1 },
        { type: INFO.NAME, name: 'aligned' },
        // 'aligned' has no description: none is sent.
        { type: INFO.BLOCK_SIZE, minimum: 512, preferred: 4096, maximum: MiB },
      ]);
      const described = await raw.exchange(OPT.INFO, encodeInfoRequestData('ro', [INFO.DESCRIPTION]));
      assert.deepEqual(decodeRepInfo(described[1]!.data), { type: INFO.DESCRIPTION, description: 'read-only disk' });
      // The empty name is the default export; INFO_NAME gives its canonical name.
      const byDefault = await raw.exchange(OPT.INFO, encodeInfoRequestData('', [INFO.NAME]));
      assert.deepEqual(byDefault.map((r) => r.type), [REP.INFO, REP.INFO, REP.ACK]);
      assert.deepEqual(decodeRepInfo(byDefault[1]!.data), { type: INFO.NAME, name: 'disk' });
      const unknown = await raw.exchange(OPT.INFO, encodeInfoRequestData('nope', []));
      assert.deepEqual(unknown.map((r) => r.type), [REP_ERR.UNKNOWN]);
      const malformed = await raw.exchange(OPT.INFO, Buffer.from([0, 0, 0, 9, 1]));
      assert.deepEqual(malformed.map((r) => r.type), [REP_ERR.INVALID]);
      const go = await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []));
      assert.equal(go.at(-1)?.type, REP.ACK);
      raw.destroy();
    });

    it('GO for an unknown export is ERR_UNKNOWN and the client can try again', async () => {
      await assert.rejects(NbdClient.connect(target(), { exportName: 'missing' }), (error) => error instanceof NbdClientError && error.optionReply === REP_ERR.UNKNOWN);
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('missing', [])))[0]?.type, REP_ERR.UNKNOWN);
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('ro', []))).at(-1)?.type, REP.ACK);
      raw.destroy();
    });

    it('GO with the empty name opens the default export', async () => {
      const client = await NbdClient.connect(target(), { exportName: '' });
      assert.equal(client.canonicalName, 'disk');
      assert.equal(client.sizeBytes, 64 * MiB);
      await client.disconnect();
    });

    it('STRUCTURED_REPLY refuses data and repeats; EXTENDED_HEADERS takes precedence over it', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.STRUCTURED_REPLY, Buffer.from('x')))[0]?.type, REP_ERR.INVALID);
      assert.equal((await raw.exchange(OPT.STRUCTURED_REPLY))[0]?.type, REP.ACK);
      assert.equal((await raw.exchange(OPT.STRUCTURED_REPLY))[0]?.type, REP_ERR.INVALID);
      assert.equal((await raw.exchange(OPT.EXTENDED_HEADERS, Buffer.from('x')))[0]?.type, REP_ERR.INVALID);
      assert.equal((await raw.exchange(OPT.EXTENDED_HEADERS))[0]?.type, REP.ACK);
      assert.equal((await raw.exchange(OPT.EXTENDED_HEADERS))[0]?.type, REP_ERR.INVALID);
      raw.destroy();
      const raw2 = await RawConnection.connect(t.port);
      await raw2.greet();
      assert.equal((await raw2.exchange(OPT.EXTENDED_HEADERS))[0]?.type, REP.ACK);
      assert.equal((await raw2.exchange(OPT.STRUCTURED_REPLY))[0]?.type, REP_ERR.EXT_HEADER_REQD);
      raw2.destroy();
    });

    it('EXPORT_NAME after EXTENDED_HEADERS closes the connection with a log line', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      await raw.exchange(OPT.EXTENDED_HEADERS);
      raw.option(OPT.EXPORT_NAME, Buffer.from('disk'));
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(logged('EXPORT_NAME after EXTENDED_HEADERS'));
    });

    it('LIST_META_CONTEXT: all contexts for no query, `base:` lists base:allocation, unknown namespaces ignored', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const list = async (queries: string[]) => (await raw.exchange(OPT.LIST_META_CONTEXT, encodeMetaContextData('disk', queries)));
      for (const queries of [[], ['base:'], ['base:allocation'], ['qemu:dirty-bitmap:x', 'base:']]) {
        const replies = await list(queries);
        assert.deepEqual(replies.map((r) => r.type), [REP.META_CONTEXT, REP.ACK], JSON.stringify(queries));
        assert.deepEqual(decodeRepMetaContext(replies[0]!.data), { contextId: 0, name: 'base:allocation' });
      }
      assert.deepEqual((await list(['qemu:', 'x-foo:bar', 'base:nothing'])).map((r) => r.type), [REP.ACK]);
      assert.deepEqual((await raw.exchange(OPT.LIST_META_CONTEXT, Buffer.alloc(3))).map((r) => r.type), [REP_ERR.INVALID]);
      raw.destroy();
    });

    it('SET_META_CONTEXT needs structured replies first, selects base:allocation with an id, ignores the rest', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const set = (queries: string[]) => raw.exchange(OPT.SET_META_CONTEXT, encodeMetaContextData('disk', queries));
      assert.deepEqual((await set(['base:allocation'])).map((r) => r.type), [REP_ERR.INVALID]);
      await raw.exchange(OPT.STRUCTURED_REPLY);
      const selected = await set(['qemu:dirty-bitmap:x', 'base:allocation', 'base:']);
      assert.deepEqual(selected.map((r) => r.type), [REP.META_CONTEXT, REP.ACK]);
      const { contextId, name } = decodeRepMetaContext(selected[0]!.data);
      assert.equal(name, 'base:allocation');
      assert.notEqual(contextId, 0);
      assert.deepEqual((await set(['base:'])).map((r) => r.type), [REP.ACK], '`base:` selects nothing in SET');
      raw.destroy();

      const client = await NbdClient.connect(target(), { exportName: 'disk', metaContexts: ['base:allocation', 'x-unknown:thing'] });
      assert.deepEqual([...client.metaContexts.keys()], ['base:allocation']);
      await client.disconnect();
    });

    it('a context selected for another export does not carry over to the export opened', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      await raw.exchange(OPT.STRUCTURED_REPLY);
      const selected = await raw.exchange(OPT.SET_META_CONTEXT, encodeMetaContextData('ro', ['base:allocation']));
      assert.equal(selected[0]?.type, REP.META_CONTEXT);
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
      raw.send(encodeRequestHeader({ cookie: 5n, type: CMD.BLOCK_STATUS, flags: 0, offset: 0, length: 4096 }, false));
      const parser = new ReplyParser(raw.queue, { mode: 'structured', payloadBytesMax: 1 << 20, readLengthForCookie: () => 0 });
      const reply = await raw.read(() => parser.next());
      assert.equal(reply.payload?.readUInt32BE(0), ERRNO.EINVAL);
      raw.destroy();
    });

    it('read-only and single-connection exports advertise READ_ONLY, no TRIM/WRITE_ZEROES and no CAN_MULTI_CONN', async () => {
      const client = await NbdClient.connect(target(), { exportName: 'ro' });
      assert.equal(client.readOnly, true);
      assert.equal(client.canTrim, false);
      assert.equal(client.canWriteZeroes, false);
      assert.equal(client.canMultiConn, false);
      assert.equal(client.canFlush, true);
      await client.disconnect();
    });
  });

  describe('malformed handshakes close only their own connection, with a log line', () => {
    it('wrong option magic', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      raw.send(Buffer.from('NOTMAGIC\0\0\0\x07\0\0\0\0'));
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(logged('is not IHAVEOPT'));
      assert.ok(t.logger.lines.some((line) => line.includes('protocol violation') && line.includes('remote=127.0.0.1:')));
      await othersUnaffected();
    });

    it('unknown client flag bits', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet(0x10);
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(logged('client flags 0x10 include unknown bits'));
      await othersUnaffected();
    });

    it('oversized option data: refused from the header, before any data is buffered', async () => {
      const violations = t.server.stats().protocolViolations;
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const header = encodeOptionRequest(OPT.GO);
      header.writeUInt32BE(10 * MiB, 12);
      raw.send(header);
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(logged('more than the 65536 accepted'));
      assert.equal(t.server.stats().protocolViolations, violations + 1);
      await othersUnaffected();
    });

    it('truncated option data waits without harm; closing the socket frees the connection', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      const option = encodeOptionRequest(OPT.GO, encodeInfoRequestData('disk', []));
      raw.send(option.subarray(0, option.length - 3));
      assert.equal(await raw.closedWithin(200), false);
      await othersUnaffected();
      const open = t.server.stats().connectionsOpen;
      raw.destroy();
      await eventually(() => t.server.stats().connectionsOpen === open - 1, 2000, 'the connection to be freed');
    });

    it('an option after GO is read as a transmission request: bad magic, closed', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
      raw.option(OPT.LIST);
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(logged('request magic 0x49484156 is not 0x25609513'));
      await othersUnaffected();
    });

    it('EXPORT_NAME for an unknown export can only be answered by closing', async () => {
      await assert.rejects(NbdClient.connect(target(), { exportName: 'missing', useExportName: true }), (error) => isMirrorsanError(error, 'NBD_CLIENT'));
      assert.ok(logged('EXPORT_NAME for unknown export'));
      await othersUnaffected();
    });
  });
});

describe('NBD handshake limits', () => {
  it('closes a handshake that takes longer than handshakeTimeoutMs', async () => {
    const t = await startServer({ limits: { handshakeTimeoutMs: 150 } });
    try {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('handshake not finished within 150 ms')));
      // A client that finishes in time is not affected by the timer afterwards.
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal((await client.read(0, 512)).length, 512);
      await client.disconnect();
    } finally {
      await t.close();
    }
  });

  it('refuses connections beyond connectionsMax and counts them', async () => {
    const t = await startServer({ limits: { connectionsMax: 2 } });
    try {
      const a = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      const b = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', timeoutMs: 2000 }));
      assert.equal(t.server.stats().connectionsRefused, 1);
      assert.ok(t.logger.lines.some((line) => line.includes('connection refused') && line.includes('more than 2 connections')));
      await a.disconnect();
      await eventually(() => t.server.stats().connectionsOpen === 1, 2000, 'a slot to free up');
      const c = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      await Promise.all([b.disconnect(), c.disconnect()]);
    } finally {
      await t.close();
    }
  });
});
