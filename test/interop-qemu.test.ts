// Proves qemu's NBD client (qemu-img info/map/convert/compare, qemu-io) reads back exactly what it wrote to a mirrorsan volume, with holes kept as holes.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  allocatedBytes, makeSparseImage, nbdinfoMap, qemuImgMap, run, runOk, sha256File, startUp, withServerLog,
} from './helpers/index.js';
import type { ByteRange, UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
const SIZE_BYTES = 64 * MiB;
/** Data in the source image; everything else is a hole. Includes 4 KiB-aligned, sub-MiB runs. */
const DATA_RANGES: ByteRange[] = [
  { offset: 0, length: MiB },
  { offset: 4 * MiB, length: 64 * 1024 },
  { offset: 10 * MiB + 4096, length: 12 * 1024 },
  { offset: 33 * MiB, length: 3 * MiB },
  { offset: 63 * MiB, length: MiB },
];
/** Holes of the source, shrunk inward to whole MiB so any allocation granularity up to 1 MiB passes. */
const HOLE_RANGES: ByteRange[] = [
  { offset: 1 * MiB, length: 3 * MiB },
  { offset: 5 * MiB, length: 5 * MiB },
  { offset: 11 * MiB, length: 22 * MiB },
  { offset: 36 * MiB, length: 27 * MiB },
];

describe('qemu-img and qemu-io against mirrorsan', () => {
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

  it('qemu-img info reports a raw image of the volume size', withServerLog(log, async () => {
    const result = await runOk('qemu-img', ['info', '--output=json', '-f', 'raw', uri()]);
    const info = JSON.parse(result.stdout) as { 'virtual-size': number; format: string };
    assert.equal(info['virtual-size'], SIZE_BYTES);
    assert.equal(info.format, 'raw');
  }));

  it('qemu-img convert copies a sparse image in; compare says identical', withServerLog(log, async () => {
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', sourceImage, uri()]);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sourceImage, uri()]);
    assert.equal(compare.code, 0, `qemu-img compare: ${compare.stdout}${compare.stderr}`);
  }));

  it('qemu-img map and nbdinfo --map show the source holes as holes, the data as data', withServerLog(log, async () => {
    const qemuMap = await qemuImgMap(uri());
    for (const hole of HOLE_RANGES) {
      for (const entry of qemuMap.filter((e) => e.start < hole.offset + hole.length && e.start + e.length > hole.offset)) {
        assert.equal(entry.data, false, `qemu-img map: hole ${hole.offset}+${hole.length} has data: ${JSON.stringify(entry)}`);
      }
    }
    for (const data of DATA_RANGES) {
      for (const entry of qemuMap.filter((e) => e.start < data.offset + data.length && e.start + e.length > data.offset)) {
        assert.equal(entry.data, true, `qemu-img map: data ${data.offset}+${data.length} shown as hole: ${JSON.stringify(entry)}`);
      }
    }
    const extents = await nbdinfoMap(uri());
    for (const hole of HOLE_RANGES) {
      for (const extent of extents.filter((e) => e.offset < hole.offset + hole.length && e.offset + e.length > hole.offset)) {
        assert.equal(extent.type & 1, 1, `nbdinfo --map: hole ${hole.offset}+${hole.length} not a hole: ${JSON.stringify(extent)}`);
      }
    }
  }));

  it('qemu-img convert copies the volume out to a sparse file with the same bytes', withServerLog(log, async () => {
    const copy = path.join(cluster.workDir, 'copy-out.raw');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(), copy]);
    assert.equal(await sha256File(copy), await sha256File(sourceImage));
    const dataBytes = DATA_RANGES.reduce((sum, r) => sum + r.length, 0);
    const allocated = await allocatedBytes(copy);
    assert.ok(allocated < dataBytes + 8 * MiB, `copy is not sparse: ${allocated} bytes allocated for ${dataBytes} of data`);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', copy, uri()]);
    assert.equal(compare.code, 0, compare.stdout + compare.stderr);
  }));

  it('qemu-img compare notices a one-sector difference', withServerLog(log, async () => {
    // Guards the two tests above: compare must be able to fail.
    await runOk('qemu-io', ['-f', 'raw', uri(), '-c', `write -P 0x5c ${20 * MiB} 512`]);
    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sourceImage, uri()]);
    assert.equal(compare.code, 1, compare.stdout + compare.stderr);
    assert.match(compare.stdout, new RegExp(`Content mismatch at offset ${20 * MiB}`));
  }));

  it('qemu-io: pattern writes, FUA writes, write -z, discard and flush read back right', withServerLog(log, async () => {
    const base = 40 * MiB;
    const commands = [
      `write -P 0xa5 ${base} 256k`,
      `read -P 0xa5 ${base} 256k`,
      // Unaligned to 4 KiB but aligned to the 512-byte minimum.
      `write -P 0x3c ${base + 512} 1536`,
      `read -P 0xa5 ${base} 512`,
      `read -P 0x3c ${base + 512} 1536`,
      `read -P 0xa5 ${base + 2048} 2048`,
      // FUA write (qemu-io -f), then a flush.
      `write -f -P 0x77 ${base + 256 * 1024} 64k`,
      `flush`,
      `read -P 0x77 ${base + 256 * 1024} 64k`,
      // Write zeroes, with and without permission to unmap.
      `write -z ${base + 64 * 1024} 64k`,
      `read -P 0 ${base + 64 * 1024} 64k`,
      `write -z -u ${base + 128 * 1024} 64k`,
      `read -P 0 ${base + 128 * 1024} 64k`,
      `read -P 0xa5 ${base + 192 * 1024} 64k`,
      // Discard: the NBD spec lets a trimmed range read as anything; mirrorsan deallocates, so zeros.
      `discard ${base} 64k`,
      `flush`,
      `read -P 0 ${base} 64k`,
      // A large request near the 32 MiB maximum payload.
      `write -P 0x11 ${8 * MiB} 16M`,
      `read -P 0x11 ${8 * MiB} 16M`,
    ];
    const args = ['-f', 'raw', uri()];
    for (const command of commands) args.push('-c', command);
    const result = await run('qemu-io', args, { timeoutMs: 60_000 });
    const output = result.stdout + result.stderr;
    assert.doesNotMatch(output, /verification failed|error|failed/i, output);
    assert.equal(result.code, 0, output);
    assert.equal(output.match(/^read \d+\/\d+ bytes/gm)?.length, commands.filter((c) => c.startsWith('read')).length, output);
  }));

  it('qemu-io sees another connection\'s writes after flush', withServerLog(log, async () => {
    const offset = 50 * MiB;
    await runOk('qemu-io', ['-f', 'raw', uri(), '-c', `write -P 0x42 ${offset} 128k`, '-c', 'flush']);
    const read = await run('qemu-io', ['-f', 'raw', '-r', uri(), '-c', `read -P 0x42 ${offset} 128k`]);
    assert.equal(read.code, 0, read.stdout + read.stderr);
    assert.doesNotMatch(read.stdout, /verification failed/);
  }));
});
