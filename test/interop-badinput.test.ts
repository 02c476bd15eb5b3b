// Proves bad input on the NBD port (garbage, unknown flags, oversized options and requests, abrupt disconnects) closes only that connection and the server keeps serving real clients.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { processExists, runOk, startUp, withServerLog } from './helpers/index.js';
import { NBD, RawConnection, negotiateToTransmission, optionRequest, request } from './helpers/raw-socket.js';
import type { UpCluster } from './helpers/index.js';

const CLOSE_TIMEOUT_MS = 5000;

describe('bad input on the NBD port', () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';
  const port = (): number => cluster.nbdPort(0);
  const open: RawConnection[] = [];

  const connect = async (): Promise<RawConnection> => {
    const conn = await RawConnection.connect(port());
    open.push(conn);
    return conn;
  };

  /** The server must still answer a real client, with the right size. */
  const assertStillServing = async (): Promise<void> => {
    const result = await runOk('nbdinfo', ['--size', cluster.nodes[0]!.nbd], { timeoutMs: 10_000 });
    assert.equal(result.stdout.trim(), String(cluster.sizeBytes));
  };

  before(async () => {
    cluster = await startUp({ size: '16MiB' });
  });
  after(async () => {
    for (const conn of open) conn.destroy();
    await cluster?.stop();
  });

  it('random bytes instead of the client flags: closed', withServerLog(log, async () => {
    const conn = await connect();
    await conn.read(18); // greeting
    conn.write(randomBytes(1024));
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'connection left open after garbage');
    await assertStillServing();
  }));

  it('client flags with unknown bits set: closed ([NBD: client flags] the server MUST close)', withServerLog(log, async () => {
    const conn = await connect();
    await conn.read(18);
    conn.write(Buffer.from([0xff, 0xff, 0xff, 0xfc | NBD.CLIENT_FIXED_NEWSTYLE]));
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'connection left open after unknown client flags');
    await assertStillServing();
  }));

  it('an option with a bad magic: closed', withServerLog(log, async () => {
    const conn = await connect();
    await conn.read(18);
    conn.write(Buffer.from([0, 0, 0, NBD.CLIENT_FIXED_NEWSTYLE | NBD.CLIENT_NO_ZEROES]));
    const option = optionRequest(NBD.OPT_GO, Buffer.alloc(6));
    option.writeUInt32BE(0xdeadbeef, 0);
    conn.write(option);
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'connection left open after a bad option magic');
    await assertStillServing();
  }));

  it('an option claiming a 4 GiB payload is not buffered: the connection is closed', withServerLog(log, async () => {
    const conn = await connect();
    await conn.read(18);
    conn.write(Buffer.from([0, 0, 0, NBD.CLIENT_FIXED_NEWSTYLE | NBD.CLIENT_NO_ZEROES]));
    const header = optionRequest(NBD.OPT_GO, Buffer.alloc(0));
    header.writeUInt32BE(0xfffffff0, 12);
    conn.write(Buffer.concat([header, randomBytes(64 * 1024)]));
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'server kept waiting for a 4 GiB option');
    await assertStillServing();
  }));

  it('a request with a bad magic in transmission: closed, after a valid read was answered', withServerLog(log, async () => {
    const conn = await connect();
    const { sizeBytes } = await negotiateToTransmission(conn, cluster.volume);
    assert.equal(sizeBytes, BigInt(cluster.sizeBytes));
    // Sanity: the raw client speaks NBD well enough to get a simple READ reply.
    conn.write(request(NBD.CMD_READ, 0x1234n, 0n, 512));
    const reply = await conn.read(16 + 512);
    assert.equal(reply.readUInt32BE(0), NBD.SIMPLE_REPLY_MAGIC);
    assert.equal(reply.readUInt32BE(4), 0, 'read failed');
    assert.equal(reply.readBigUInt64BE(8), 0x1234n, 'cookie not echoed');
    conn.write(request(NBD.CMD_READ, 1n, 0n, 512, 0, 0x12345678));
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'connection left open after a bad request magic');
    await assertStillServing();
  }));

  it('a write claiming a payload over the 32 MiB maximum: refused or closed, never buffered', withServerLog(log, async () => {
    const conn = await connect();
    await negotiateToTransmission(conn, cluster.volume);
    const WRITE = 1;
    conn.write(request(WRITE, 7n, 0n, 0xfffffe00));
    conn.write(randomBytes(256 * 1024));
    // Either an error reply arrives and the connection closes, or it closes at once.
    assert.ok(await conn.closedWithin(CLOSE_TIMEOUT_MS), 'server kept reading a 4 GiB write payload');
    await assertStillServing();
  }));

  it('200 connections dropped at every handshake stage leave the server healthy', withServerLog(log, async () => {
    const stages = [
      async (c: RawConnection) => c.destroy(),
      async (c: RawConnection) => { await c.read(18); c.destroy(); },
      async (c: RawConnection) => { await c.read(18); c.write(Buffer.from([0, 0, 0, 3])); c.destroy(); },
      async (c: RawConnection) => {
        await c.read(18);
        c.write(Buffer.from([0, 0, 0, 3]));
        c.write(optionRequest(NBD.OPT_GO, Buffer.alloc(6)).subarray(0, 10)); // half an option
        c.destroy();
      },
      async (c: RawConnection) => {
        await negotiateToTransmission(c, cluster.volume);
        c.write(request(NBD.CMD_READ, 9n, 0n, 4096).subarray(0, 12)); // half a request
        c.destroy();
      },
    ];
    for (let round = 0; round < 4; round++) {
      await Promise.all(Array.from({ length: 50 }, async (_, i) => {
        const conn = await RawConnection.connect(port());
        try {
          await stages[i % stages.length]!(conn);
        } finally {
          conn.destroy();
        }
      }));
    }
    assert.ok(processExists(cluster.nodes[0]!.pid), 'server process died');
    await assertStillServing();
    await runOk('qemu-io', ['-f', 'raw', cluster.nodes[0]!.nbd, '-c', 'write -P 0x61 0 64k', '-c', 'read -P 0x61 0 64k']);
  }));
});
