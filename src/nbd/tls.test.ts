// Proves STARTTLS: TLS at the client's choice, TLS required (FORCEDTLS), no TLS configured, negotiation state reset by the upgrade, and failed TLS closing only that connection.
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { NbdClient, NbdClientError } from './client.js';
import { ReplyParser, encodeInfoRequestData, encodeRequestHeader } from './codec.js';
import { RawConnection, makeCertificate, startServer, type TestServer } from './fixtures.js';
import { CMD, OPT, REP, REP_ERR } from './protocol.js';

describe('NBD STARTTLS', () => {
  let certificate: Awaited<ReturnType<typeof makeCertificate>>;
  before(async () => {
    certificate = await makeCertificate();
  });
  after(() => rm(certificate.dir, { recursive: true, force: true }));

  const tlsClient = () => ({ ca: certificate.cert, servername: 'localhost' });

  describe('TLS at the client\'s choice', () => {
    let t: TestServer;
    before(async () => {
      t = await startServer({ tls: { cert: certificate.cert, key: certificate.key, required: false } });
    });
    after(() => t.close());

    it('serves clients with and without TLS', async () => {
      const secure = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', tls: tlsClient(), metaContexts: ['base:allocation'] });
      assert.equal(secure.tls, true);
      assert.equal(t.server.stats().connections.find((c) => c.phase === 'transmission')?.tls, true);
      await secure.write(0, Buffer.alloc(64 * 1024, 0x42));
      assert.equal((await secure.read(0, 64 * 1024)).every((b) => b === 0x42), true);
      assert.equal((await secure.blockStatus(0, 128 * 1024))[0]?.hole, false);
      const plain = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' });
      assert.equal(plain.tls, false);
      assert.equal((await plain.read(0, 1))[0], 0x42);
      await Promise.all([secure.disconnect(), plain.disconnect()]);
    });

    it('lists exports over TLS', async () => {
      const exports = await NbdClient.listExports({ host: '127.0.0.1', port: t.port }, { tls: tlsClient() });
      assert.deepEqual(exports, [{ name: 'disk', description: 'test disk' }]);
    });

    it('forgets STRUCTURED_REPLY negotiated before the upgrade; a second STARTTLS is ERR_INVALID', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.STRUCTURED_REPLY))[0]?.type, REP.ACK);
      assert.equal((await raw.exchange(OPT.STARTTLS, Buffer.from('x')))[0]?.type, REP_ERR.INVALID, 'STARTTLS carries no data');
      assert.equal((await raw.exchange(OPT.STARTTLS))[0]?.type, REP.ACK);
      await raw.upgrade(certificate.cert);
      assert.equal((await raw.exchange(OPT.STARTTLS))[0]?.type, REP_ERR.INVALID);
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
      raw.send(encodeRequestHeader({ cookie: 3n, type: CMD.READ, flags: 0, offset: 0, length: 512 }, false));
      // Structured replies were reset by the upgrade, so this READ gets a simple reply.
      const parser = new ReplyParser(raw.queue, { mode: 'simple', payloadBytesMax: 1 << 20, readLengthForCookie: () => 512 });
      const reply = await raw.read(() => parser.next());
      assert.equal(reply.kind, 'simple');
      assert.equal(reply.payload?.length, 512);
      raw.destroy();
    });

    it('a failed TLS handshake closes only that connection, with a log line', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.STARTTLS))[0]?.type, REP.ACK);
      raw.send(Buffer.from('this is not a TLS ClientHello at all, not even close......'));
      assert.equal(await raw.closedWithin(3000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('connection error')));
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', tls: tlsClient() });
      assert.equal((await client.read(0, 512)).length, 512);
      await client.disconnect();
    });

    it('a client that does not trust the certificate fails cleanly', async () => {
      await assert.rejects(
        NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', tls: { servername: 'localhost' } }),
        (error) => error instanceof NbdClientError && /TLS handshake failed/.test(error.message),
      );
    });
  });

  describe('TLS required', () => {
    let t: TestServer;
    before(async () => {
      t = await startServer({ tls: { cert: certificate.cert, key: certificate.key, required: true } });
    });
    after(() => t.close());

    it('refuses every option but STARTTLS and ABORT with ERR_TLS_REQD before the upgrade', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      for (const option of [OPT.LIST, OPT.STRUCTURED_REPLY, OPT.INFO, OPT.GO, OPT.LIST_META_CONTEXT, 0x4242]) {
        const data = option === OPT.INFO || option === OPT.GO ? encodeInfoRequestData('disk', []) : undefined;
        assert.deepEqual((await raw.exchange(option, data)).map((r) => r.type), [REP_ERR.TLS_REQD], `option ${option}`);
      }
      assert.equal((await raw.exchange(OPT.STARTTLS))[0]?.type, REP.ACK);
      await raw.upgrade(certificate.cert);
      assert.equal((await raw.exchange(OPT.LIST)).at(-1)?.type, REP.ACK);
      assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
      raw.destroy();
    });

    it('ABORT is still answered before TLS', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      assert.equal((await raw.exchange(OPT.ABORT))[0]?.type, REP.ACK);
      assert.equal(await raw.closedWithin(2000), true);
    });

    it('a client without TLS is told TLS_REQD; with TLS it works', async () => {
      await assert.rejects(
        NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk' }),
        (error) => error instanceof NbdClientError && error.optionReply === REP_ERR.TLS_REQD,
      );
      const client = await NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', tls: tlsClient() });
      await client.write(0, Buffer.from('secret'));
      assert.equal((await client.read(0, 6)).toString(), 'secret');
      await client.disconnect();
    });

    it('EXPORT_NAME before TLS, or a client without fixed newstyle, can only be closed', async () => {
      const raw = await RawConnection.connect(t.port);
      await raw.greet();
      raw.option(OPT.EXPORT_NAME, Buffer.from('disk'));
      assert.equal(await raw.closedWithin(2000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('EXPORT_NAME before STARTTLS while TLS is required')));
      const plain = await RawConnection.connect(t.port);
      await plain.greet(0);
      assert.equal(await plain.closedWithin(2000), true);
      assert.ok(t.logger.lines.some((line) => line.includes('did not negotiate fixed newstyle')));
    });
  });

  describe('no TLS configured', () => {
    it('answers STARTTLS with ERR_UNSUP and goes on without TLS', async () => {
      const t = await startServer();
      try {
        const raw = await RawConnection.connect(t.port);
        await raw.greet();
        assert.deepEqual((await raw.exchange(OPT.STARTTLS)).map((r) => r.type), [REP_ERR.UNSUP]);
        assert.equal((await raw.exchange(OPT.GO, encodeInfoRequestData('disk', []))).at(-1)?.type, REP.ACK);
        raw.destroy();
        await assert.rejects(
          NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', tls: tlsClient() }),
          (error) => error instanceof NbdClientError && error.optionReply === REP_ERR.UNSUP,
        );
      } finally {
        await t.close();
      }
    });
  });
});
