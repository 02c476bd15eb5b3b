// Proves the image file shell: sparse creation, positional vectored writes and reads,
// freeing space by punching holes (large aligned ranges) or writing zeros (small ranges, or
// when the fallocate tool is missing, said once in the log), injected write faults, and large
// writes split into concurrent pieces.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { isMirrorsanError } from '../errors.js';
import { createMemoryLogger } from '../util/log.js';
import { ImageFile, WRITE_PIECE_BYTES, type ImageFaults } from './image.js';

const MiB = 1024 * 1024;

async function tempImage(t: { after: (fn: () => Promise<void>) => void }, faults?: ImageFaults, writePieceBytes?: number) {
  const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'mirrorsan-img-'));
  const logger = createMemoryLogger();
  const file = path.join(dir, 'volume.img');
  const image = await ImageFile.open({ path: file, sizeBytes: 16 * MiB, blockSizeBytes: 4096, create: true, logger, ...(faults ? { faults } : {}), ...(writePieceBytes !== undefined ? { writePieceBytes } : {}) });
  t.after(async () => {
    await image.close();
    await fs.promises.rm(dir, { recursive: true, force: true });
  });
  return { image, file, logger };
}

async function readBack(image: ImageFile, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  await image.read(offset, out);
  return out;
}

test('a new image is sparse and has the volume size; vectored writes land back to back', async (t) => {
  const { image, file } = await tempImage(t);
  const stat = fs.statSync(file);
  assert.equal(stat.size, 16 * MiB);
  assert.ok(stat.blocks * 512 < MiB, 'never preallocated');
  await image.write(4000, [Buffer.from('abc'), Buffer.from('defg')]);
  assert.equal((await readBack(image, 3998, 11)).toString('latin1'), '\0\0abcdefg\0\0');
  await assert.rejects(ImageFile.open({ path: file, sizeBytes: 8 * MiB, blockSizeBytes: 4096, create: false, logger: createMemoryLogger() }), (e: unknown) =>
    isMirrorsanError(e, 'STORE_IO'),
  );
});

test('deallocate punches large aligned ranges and zero-writes small ones', async (t) => {
  const { image, file } = await tempImage(t);
  await image.write(0, [Buffer.alloc(8 * MiB, 0x77)]);
  await image.datasync();
  const before = fs.statSync(file).blocks * 512;
  assert.equal(await image.deallocate(MiB, 4 * MiB), 'punched');
  assert.ok(before - fs.statSync(file).blocks * 512 >= 4 * MiB, 'space was freed');
  assert.equal(await image.deallocate(6 * MiB, 8192), 'zeroed');
  assert.equal(await image.deallocate(7 * MiB + 512, 2 * MiB - 4096), 'zeroed', 'unaligned: zeros');
  assert.ok((await readBack(image, MiB, 4 * MiB)).equals(Buffer.alloc(4 * MiB)));
  assert.ok((await readBack(image, 6 * MiB, 8192)).equals(Buffer.alloc(8192)));
  assert.equal((await readBack(image, MiB - 1, 1))[0], 0x77);
  assert.equal((await readBack(image, 5 * MiB, 1))[0], 0x77);
  assert.deepEqual(image.stats().punchedBytes, 4 * MiB);
});

test('without the fallocate tool, freeing writes zeros and says so once', async (t) => {
  const { image, logger } = await tempImage(t);
  await image.write(0, [Buffer.alloc(4 * MiB, 1)]);
  const savedPath = process.env.PATH;
  process.env.PATH = '/nonexistent';
  try {
    assert.equal(await image.deallocate(0, 2 * MiB), 'zeroed');
    assert.equal(await image.deallocate(2 * MiB, 2 * MiB), 'zeroed');
  } finally {
    process.env.PATH = savedPath;
  }
  assert.ok((await readBack(image, 0, 4 * MiB)).equals(Buffer.alloc(4 * MiB)));
  assert.equal(logger.lines.filter((line) => line.includes('cannot punch holes')).length, 1);
  assert.equal(image.punchHoleAvailable, false);
});

test('an injected fault fails image writes with STORE_IO (EIO) and nothing else', async (t) => {
  let fail = false;
  const { image } = await tempImage(t, { failImageWrites: () => fail });
  await image.write(0, [Buffer.alloc(4096, 1)]);
  fail = true;
  await assert.rejects(image.write(0, [Buffer.alloc(4096, 2)]), (e: unknown) => isMirrorsanError(e, 'STORE_IO') && /EIO/.test(e.message));
  await assert.rejects(image.writeZeros(0, 4096), (e: unknown) => isMirrorsanError(e, 'STORE_IO'));
  assert.equal((await readBack(image, 0, 1))[0], 1, 'reads still work');
});

test('an injected ENOSPC fault names ENOSPC in the STORE_IO error, and clearing it lets writes through again', async (t) => {
  let fault: 'ENOSPC' | undefined = 'ENOSPC';
  const { image } = await tempImage(t, { failImageWrites: () => fault ?? false });
  await assert.rejects(image.write(8192, [Buffer.alloc(4096, 3)]), (e: unknown) => isMirrorsanError(e, 'STORE_IO') && /ENOSPC/.test(e.message) && !/EIO/.test(e.message));
  assert.equal((await readBack(image, 8192, 1))[0], 0, 'the failed write left nothing in the file');
  fault = undefined;
  await image.write(8192, [Buffer.alloc(4096, 3)]);
  assert.equal((await readBack(image, 8192, 1))[0], 3);
});

test('with writePieceBytes, a larger write lands whole, in concurrent pieces, at any offset', async (t) => {
  const { image } = await tempImage(t, undefined, WRITE_PIECE_BYTES);
  const length = 5 * WRITE_PIECE_BYTES + 1234;
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i++) data[i] = (i * 131 + 17) & 0xff;
  await image.write(3 * MiB + 777, [data]);
  assert.deepEqual(await readBack(image, 3 * MiB + 777, length), data);
  assert.deepEqual(await readBack(image, 3 * MiB + 770, 7), Buffer.alloc(7), 'nothing before it');
  assert.deepEqual(await readBack(image, 3 * MiB + 777 + length, 9), Buffer.alloc(9), 'nothing after it');
});
