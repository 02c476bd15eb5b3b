// Proves the server interoperates with the real NBD clients: nbdinfo (info, list, map, TLS), qemu-io, qemu-img map, qemu-nbd -L, nbdcopy, fio with verification, and libnbd's Python binding (no structured replies, plain newstyle, 64 requests in flight).
import assert from 'node:assert/strict';
import { cp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { MemoryDevice } from '../volume/memory-device.js';
import { makeCertificate, run, startServer, type TestServer } from './fixtures.js';

const MiB = 1 << 20;
const env = { ...process.env, LIBNBD_DEBUG: '0' };

describe('NBD interoperability with real clients', () => {
  let t: TestServer;
  let uri: string;
  before(async () => {
    t = await startServer({ extra: [new MemoryDevice({ name: 'second', description: 'another disk', sizeBytes: MiB })] });
    uri = `nbd://127.0.0.1:${t.port}/disk`;
  });
  after(() => t.close());

  it('nbdinfo --json reports size, flags, block sizes, description and base:allocation', async () => {
    const result = await run('nbdinfo', ['--json', uri], { env });
    assert.equal(result.code, 0, result.stderr);
    const info = JSON.parse(result.stdout);
    assert.equal(info.protocol, 'newstyle-fixed');
    assert.equal(info.structured, true);
    const [disk] = info.exports;
    assert.equal(disk['export-name'], 'disk');
    assert.equal(disk.description, 'test disk');
    assert.equal(disk['export-size'], 64 * MiB);
    assert.deepEqual(disk.contexts, ['base:allocation']);
    for (const flag of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
      assert.equal(disk[flag], true, flag);
    }
    assert.equal(disk.is_read_only, false);
    assert.equal(disk.block_size_minimum, 1);
    assert.equal(disk.block_size_preferred, 4096);
    assert.equal(disk.block_size_maximum, 32 * MiB);
  });

  it('nbdinfo --list lists every export', async () => {
    const result = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${t.port}/`], { env });
    assert.equal(result.code, 0, result.stderr);
    const names = JSON.parse(result.stdout).exports.map((e: { 'export-name': string }) => e['export-name']);
    assert.deepEqual(names, ['disk', 'second']);
  });

  it('qemu-io writes and reads back a pattern, discards and zeroes; qemu-img map and nbdinfo --map see it', async () => {
    const result = await run('qemu-io', [
      '-f', 'raw',
      '-c', 'write -P 0xab 0 64k',
      '-c', 'read -P 0xab 0 64k',
      '-c', 'write -P 0xcd 1M 128k',
      '-c', 'discard 1M 64k',
      '-c', 'write -z 2M 64k',
      '-c', 'flush',
      uri,
    ]);
    assert.equal(result.code, 0, result.stderr);
    assert.doesNotMatch(result.stdout + result.stderr, /Pattern verification failed|error/i);
    assert.equal(t.device.contents(0, 64 * 1024).every((b) => b === 0xab), true);
    assert.equal(t.device.contents(MiB + 64 * 1024, 64 * 1024).every((b) => b === 0xcd), true);

    const map = await run('qemu-img', ['map', '--output=json', '-f', 'raw', uri]);
    assert.equal(map.code, 0, map.stderr);
    const extents = JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    const at = (offset: number) => extents.find((e) => e.start <= offset && offset < e.start + e.length);
    assert.deepEqual([at(0)?.data, at(0)?.zero], [true, false]);
    assert.deepEqual([at(MiB)?.data, at(MiB)?.zero], [false, true], 'discarded range is a hole');
    assert.deepEqual([at(MiB + 64 * 1024)?.data, at(MiB + 64 * 1024)?.zero], [true, false]);
    assert.deepEqual([at(2 * MiB)?.zero], [true], 'write -z reads as zeros');
    assert.deepEqual([at(32 * MiB)?.data, at(32 * MiB)?.zero], [false, true]);

    const nbdMap = await run('nbdinfo', ['--map', uri], { env });
    assert.equal(nbdMap.code, 0, nbdMap.stderr);
    assert.match(nbdMap.stdout, /^\s+0\s+65536\s+0\s+data$/m);
  });

  it('qemu-nbd -L lists exports with their meta contexts', async () => {
    const result = await run('qemu-nbd', ['-L', '-b', '127.0.0.1', '-p', String(t.port)]);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /exports available: 2/);
    assert.match(result.stdout, /export: 'second'\s+description: another disk/);
    assert.match(result.stdout, /base:allocation/);
  });

  it('nbdcopy copies in (with --flush, multi-conn) and out byte for byte', async () => {
    const copyIn = await run('nbdcopy', ['--flush', '--', '[', 'nbdkit', 'pattern', '8M', ']', uri], { env });
    assert.equal(copyIn.code, 0, copyIn.stderr);
    const bytes = t.device.contents(0, 8 * MiB);
    for (let offset = 0; offset < 8 * MiB; offset += 8) assert.equal(bytes.readBigUInt64BE(offset), BigInt(offset), `pattern at ${offset}`);
    const copyOut = await run('sh', ['-c', `nbdcopy ${uri} - | head -c 8388608 | sha256sum; nbdcopy -- [ nbdkit pattern 8M ] - | sha256sum`], { env });
    const [ours, theirs] = copyOut.stdout.trim().split('\n').map((line) => line.split(' ')[0]);
    assert.equal(ours, theirs);
  });

  it('fio with ioengine=nbd writes 32 requests deep and verifies every block', async () => {
    const result = await run('fio', [
      '--name=verify', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
      '--size=8m', '--offset=16m', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--output-format=json',
    ]);
    assert.equal(result.code, 0, result.stderr);
    const jobs = JSON.parse(result.stdout.slice(result.stdout.indexOf('{'))).jobs;
    assert.equal(jobs[0].error, 0);
    assert.ok(jobs[0].write.io_bytes >= 8 * MiB);
  });

  it('libnbd (Python): plain newstyle, no structured replies, and 64 requests in flight', async () => {
    const script = `
import nbd, sys
uri = sys.argv[1]
h = nbd.NBD(); h.set_handshake_flags(0); h.connect_uri(uri)
assert h.get_protocol() == 'newstyle', h.get_protocol()
h.pwrite(b'plain newstyle', 4096); assert h.pread(14, 4096) == b'plain newstyle'
h.shutdown()
h = nbd.NBD(); h.set_request_structured_replies(False); h.connect_uri(uri)
assert not h.get_structured_replies_negotiated() and not h.can_df()
h.pwrite(b'simple replies', 8192); assert h.pread(14, 8192) == b'simple replies'
h.shutdown()
h = nbd.NBD(); h.connect_uri(uri)
base = 40 << 20
for i in range(64): h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 65536), base + i * 65536)
assert h.aio_in_flight() == 64, h.aio_in_flight()
while h.aio_in_flight() > 0: h.poll(-1)
buffers = [nbd.Buffer(65536) for _ in range(64)]
for i, b in enumerate(buffers): h.aio_pread(b, base + i * 65536)
assert h.aio_in_flight() == 64
while h.aio_in_flight() > 0: h.poll(-1)
assert all(b.to_bytearray() == bytearray([i]) * 65536 for i, b in enumerate(buffers))
h.flush(); h.shutdown()
print('ok')
`;
    const result = await run('/usr/bin/python3', ['-c', script, uri]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.trim(), 'ok');
    assert.equal(t.device.contents(40 * MiB + 63 * 65536, 1)[0], 63);
  });

  describe('over TLS', () => {
    let tlsServer: TestServer;
    let certificate: Awaited<ReturnType<typeof makeCertificate>>;
    before(async () => {
      certificate = await makeCertificate();
      // libnbd (GnuTLS) looks for the CA as ca-cert.pem in a directory.
      await cp(certificate.certPath, join(certificate.dir, 'ca-cert.pem'));
      tlsServer = await startServer({ tls: { cert: certificate.cert, key: certificate.key, required: true } });
    });
    after(async () => {
      await tlsServer.close();
      await rm(certificate.dir, { recursive: true, force: true });
    });

    it('nbdinfo connects with nbds:// and TLS-required mode refuses plain nbd://', async () => {
      const secure = await run('nbdinfo', [`nbds://localhost:${tlsServer.port}/disk?tls-certificates=${certificate.dir}`], { env });
      assert.equal(secure.code, 0, secure.stderr);
      assert.match(secure.stdout, /newstyle-fixed with TLS/);
      const plain = await run('nbdinfo', [`nbd://127.0.0.1:${tlsServer.port}/disk`], { env });
      assert.notEqual(plain.code, 0);
    });
  });
});
