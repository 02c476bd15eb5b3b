// Proves libnbd's bulk clients work against mirrorsan: nbdcopy in and out (multi-conn, sparse, byte-exact) and fio's nbd engine with crc32c verification.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  FIO_NO_STATE_FILES, allocatedBytes, fioNbd, makeSparseImage, nbdinfoMap, run, runOk, sha256File, startUp, withServerLog,
} from './helpers/index.js';
import type { ByteRange, UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
const SIZE_BYTES = 64 * MiB;
const DATA_RANGES: ByteRange[] = [
  { offset: 0, length: 2 * MiB },
  { offset: 7 * MiB + 8192, length: 300 * 1024 },
  { offset: 20 * MiB, length: 5 * MiB },
  { offset: 62 * MiB, length: 2 * MiB },
];
/** Source holes shrunk to whole MiB (any allocation granularity up to 1 MiB passes). */
const HOLE_RANGES: ByteRange[] = [
  { offset: 2 * MiB, length: 5 * MiB },
  { offset: 8 * MiB, length: 12 * MiB },
  { offset: 25 * MiB, length: 37 * MiB },
];

describe('nbdcopy and fio against mirrorsan', () => {
  let cluster: UpCluster;
  let sourceImage: string;
  const uri = (): string => cluster.nodes[0]!.nbd;
  const log = (): string => cluster?.stderr ?? '';

  before(async () => {
    cluster = await startUp({ size: '64MiB' });
    sourceImage = path.join(cluster.workDir, 'source.raw');
    await makeSparseImage(sourceImage, SIZE_BYTES, DATA_RANGES);
  });
  after(async () => {
    await cluster?.stop();
  });

  it('nbdcopy copies a sparse file in over 4 connections with --flush; holes stay holes', withServerLog(log, async () => {
    // Dirty the volume first, so the copy must actively zero the holes rather than skip them.
    await runOk('qemu-io', ['-f', 'raw', uri(), '-c', `write -P 0xee ${30 * MiB} 2M`]);
    await runOk('nbdcopy', ['--connections=4', '--flush', sourceImage, uri()]);
    const extents = await nbdinfoMap(uri());
    for (const hole of HOLE_RANGES) {
      for (const extent of extents.filter((e) => e.offset < hole.offset + hole.length && e.offset + e.length > hole.offset)) {
        assert.ok((extent.type & 2) === 2, `hole ${hole.offset}+${hole.length} does not read as zero: ${JSON.stringify(extent)}`);
        assert.ok((extent.type & 1) === 1, `hole ${hole.offset}+${hole.length} is allocated: ${JSON.stringify(extent)}`);
      }
    }
    for (const data of DATA_RANGES) {
      for (const extent of extents.filter((e) => e.offset < data.offset + data.length && e.offset + e.length > data.offset)) {
        assert.equal(extent.type, 0, `data ${data.offset}+${data.length} reported as ${extent.description}`);
      }
    }
  }));

  it('nbdcopy copies the volume out: same sha256, and the file stays sparse', withServerLog(log, async () => {
    const copy = path.join(cluster.workDir, 'copy-out.raw');
    await runOk('nbdcopy', [uri(), copy]);
    assert.equal(await sha256File(copy), await sha256File(sourceImage));
    const dataBytes = DATA_RANGES.reduce((sum, r) => sum + r.length, 0);
    const allocated = await allocatedBytes(copy);
    assert.ok(allocated <= dataBytes + 4 * MiB, `copy-out not sparse: ${allocated} bytes allocated for ${dataBytes} of data`);
  }));

  it('nbdcopy to a second file through a pipe gives the same bytes (a full read, holes included)', withServerLog(log, async () => {
    const result = await run('sh', ['-c', `nbdcopy --no-extents '${uri()}' - | sha256sum`]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.split(' ')[0], await sha256File(sourceImage));
  }));

  const fioRegion = ['--offset=40M', '--size=8M', '--bs=4k', '--iodepth=16', '--verify=crc32c', '--verify_fatal=1', '--randrepeat=1'];

  it('fio randwrite QD16 with crc32c, then a separate verify-only read, finds every block intact', withServerLog(log, async () => {
    const write = await fioNbd(uri(), ['--name=randwrite', '--rw=randwrite', '--do_verify=1', ...fioRegion]);
    assert.equal(write.jobs[0]!.write.io_bytes, 8 * MiB);
    const verify = await fioNbd(uri(), ['--name=randwrite', '--rw=randwrite', '--verify_only', ...fioRegion]);
    assert.equal(verify.jobs[0]!.read.io_bytes, 8 * MiB, 'verify pass did not read the whole region');
  }));

  it('fio: 4 jobs on 4 connections write and verify their own regions concurrently', withServerLog(log, async () => {
    const report = await fioNbd(uri(), [
      '--name=parallel', '--rw=randwrite', '--bs=16k', '--iodepth=8', '--numjobs=4', '--offset=48M', '--size=4M', '--offset_increment=4M',
      '--verify=crc32c', '--verify_fatal=1', '--do_verify=1',
    ]);
    assert.equal(report.jobs.length, 4);
    for (const job of report.jobs) {
      assert.equal(job.write.io_bytes, 4 * MiB, `job ${job.jobname} wrote ${job.write.io_bytes}`);
      assert.equal(job.read.io_bytes, 4 * MiB, `job ${job.jobname} verified ${job.read.io_bytes}`);
    }
  }));

  it('fio verify fails once a block is overwritten behind its back (the check is live)', withServerLog(log, async () => {
    await runOk('qemu-io', ['-f', 'raw', uri(), '-c', `write -P 0x00 ${40 * MiB + 5 * 4096} 4k`]);
    const args = ['--ioengine=nbd', `--uri=${uri()}`, ...FIO_NO_STATE_FILES, '--name=randwrite', '--rw=randwrite', '--verify_only', ...fioRegion];
    const result = await run('fio', args, { timeoutMs: 60_000, cwd: cluster.workDir });
    assert.notEqual(result.code, 0, `fio verify passed over a corrupted block:\n${result.stdout}`);
    assert.match(result.stdout + result.stderr, /verify|bad/i);
  }));
});
