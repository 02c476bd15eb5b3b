// Proves MemoryDevice keeps bytes, holes and allocation exact per 4 KiB block, across slab and block boundaries.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import type { ReadPiece } from './device.js';
import { MEMORY_BLOCK_BYTES, MemoryDevice } from './memory-device.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const write = { fua: false };

function materialize(pieces: ReadPiece[]): Buffer {
  return Buffer.concat(pieces.map((piece) => (piece.kind === 'data' ? piece.data : Buffer.alloc(piece.length))));
}

function summary(pieces: ReadPiece[]): string[] {
  return pieces.map((piece) => `${piece.kind}@${piece.offset}+${piece.kind === 'data' ? piece.data.length : piece.length}`);
}

describe('MemoryDevice', () => {
  it('starts as one hole and reads zeros', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: 8 * MiB });
    assert.deepEqual(summary(await device.read(0, 8 * MiB)), ['zero@0+8388608']);
    assert.deepEqual(device.blockStatus(0, 8 * MiB), [{ offset: 0, length: 8 * MiB, hole: true, zero: true }]);
    assert.equal(device.allocatedBytes(), 0);
  });

  it('returns data and zero pieces that cover the range exactly, split at slab boundaries', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: 8 * MiB });
    const data = Buffer.alloc(2 * MiB, 0xab);
    await device.write(MiB - 4 * KiB, data, write);
    const pieces = await device.read(MiB - 8 * KiB, 2 * MiB + 8 * KiB);
    assert.deepEqual(summary(pieces), [
      'zero@1040384+4096',
      'data@1044480+4096', // the tail of slab 0
      'data@1048576+1048576', // all of slab 1
      'data@2097152+1044480', // the head of slab 2
      'zero@3141632+4096',
    ]);
    const bytes = materialize(pieces);
    assert.equal(bytes.subarray(4 * KiB, 4 * KiB + 2 * MiB).every((b) => b === 0xab), true);
    assert.equal(device.allocatedBytes(), 2 * MiB);
  });

  it('zeroes the rest of a block on a partial write into a hole that held old bytes', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: MiB });
    await device.write(0, Buffer.alloc(2 * MEMORY_BLOCK_BYTES, 0xff), write);
    await device.trim(0, MEMORY_BLOCK_BYTES, write); // block 0 is a hole again (its bytes stay in the slab)
    await device.write(100, Buffer.from('hello'), write);
    const expected = Buffer.alloc(MEMORY_BLOCK_BYTES);
    expected.write('hello', 100);
    assert.deepEqual(device.contents(0, MEMORY_BLOCK_BYTES), expected);
    assert.deepEqual(materialize(await device.read(0, MEMORY_BLOCK_BYTES)), expected);
  });

  it('reports allocated-but-zero blocks after a NO_HOLE zero, and holes after a trimming zero', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: MiB });
    await device.write(0, Buffer.alloc(64 * KiB, 7), write);
    await device.writeZeroes(0, 16 * KiB, { fua: false, mayTrim: false, fastZero: false });
    await device.writeZeroes(16 * KiB, 16 * KiB, { fua: false, mayTrim: true, fastZero: false });
    assert.deepEqual(device.blockStatus(0, MiB), [
      { offset: 0, length: 16 * KiB, hole: false, zero: true },
      { offset: 16 * KiB, length: 16 * KiB, hole: true, zero: true },
      { offset: 32 * KiB, length: 32 * KiB, hole: false, zero: false },
      { offset: 64 * KiB, length: MiB - 64 * KiB, hole: true, zero: true },
    ]);
    assert.equal(device.contents(0, 32 * KiB).every((b) => b === 0), true);
    assert.equal(device.contents(32 * KiB, 32 * KiB).every((b) => b === 7), true);
  });

  it('zeroes partial blocks in place and provisions holes under NO_HOLE', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: MiB });
    await device.write(0, Buffer.alloc(8 * KiB, 9), write);
    await device.writeZeroes(100, 200, { fua: false, mayTrim: true, fastZero: false });
    const bytes = device.contents(0, 8 * KiB);
    assert.equal(bytes.subarray(100, 300).every((b) => b === 0), true);
    assert.equal(bytes[99], 9);
    assert.equal(bytes[300], 9);
    await device.writeZeroes(64 * KiB + 10, 10, { fua: false, mayTrim: false, fastZero: false });
    assert.deepEqual(device.blockStatus(64 * KiB, 4 * KiB), [{ offset: 64 * KiB, length: 4 * KiB, hole: false, zero: true }]);
  });

  it('trims only whole blocks (rounding inward) and frees empty slabs', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: 4 * MiB });
    await device.write(0, Buffer.alloc(3 * MiB, 1), write);
    await device.trim(100, MiB, write);
    // Block 0 was only partly covered: it stays data; blocks 1..255 are holes; block 256 partial: stays.
    assert.deepEqual(device.blockStatus(0, 2 * MiB).map((e) => [e.offset, e.length, e.hole]), [
      [0, 4 * KiB, false],
      [4 * KiB, MiB - 4 * KiB, true],
      [MiB, MiB, false],
    ]);
    await device.trim(0, 3 * MiB, write);
    assert.equal(device.allocatedBytes(), 0);
  });

  it('treats the last partial block of an odd-sized device as whole when a range reaches the end', async () => {
    const size = MiB + 1000;
    const device = new MemoryDevice({ name: 'm', sizeBytes: size });
    await device.write(MiB, Buffer.alloc(1000, 5), write);
    assert.deepEqual(device.blockStatus(MiB, 1000), [{ offset: MiB, length: 1000, hole: false, zero: false }]);
    await device.trim(MiB, 1000, write);
    assert.deepEqual(device.blockStatus(MiB, 1000), [{ offset: MiB, length: 1000, hole: true, zero: true }]);
    assert.equal(device.allocatedBytes(), 0);
  });

  it('refuses writes on a read-only device with NBD_EPERM and slow fast-zeroes with NBD_ENOTSUP', async () => {
    const readOnly = new MemoryDevice({ name: 'ro', sizeBytes: MiB, readOnly: true });
    await assert.rejects(readOnly.write(0, Buffer.alloc(1), write), (error) => isMirrorsanError(error, 'NBD_EPERM'));
    await assert.rejects(readOnly.trim(0, 1, write), (error) => isMirrorsanError(error, 'NBD_EPERM'));
    const slow = new MemoryDevice({ name: 'slow', sizeBytes: MiB, fastZero: false });
    await slow.write(0, Buffer.alloc(4 * KiB, 1), write);
    await assert.rejects(slow.writeZeroes(0, 4 * KiB, { fua: false, mayTrim: true, fastZero: true }), (error) =>
      isMirrorsanError(error, 'NBD_ENOTSUP'),
    );
    assert.equal(slow.contents(0, 1)[0], 1, 'a refused fast zero must not change the data');
  });

  it('counts FUA and flushes so tests can see what the server passed through', async () => {
    const device = new MemoryDevice({ name: 'm', sizeBytes: MiB });
    await device.write(0, Buffer.alloc(1), { fua: true });
    await device.flush();
    assert.equal(device.counters.fuaWrites, 1);
    assert.equal(device.counters.flushes, 1);
  });

  it('rejects geometries the NBD spec forbids', () => {
    const bad = [
      { sizeBytes: MiB, blockSizeMin: 3 },
      { sizeBytes: MiB, blockSizeMin: 128 * KiB },
      { sizeBytes: MiB, blockSizePreferred: 256 },
      { sizeBytes: MiB, payloadMaxBytes: 1024 },
      { sizeBytes: MiB + 1, blockSizeMin: 512 },
    ];
    for (const options of bad) {
      assert.throws(() => new MemoryDevice({ name: 'bad', ...options }), (error) => isMirrorsanError(error, 'CONFIG_INVALID'), JSON.stringify(options));
    }
  });

  it('matches a byte-array model under random writes, zeroes and trims', async () => {
    const size = 3 * MiB + 12 * KiB;
    const device = new MemoryDevice({ name: 'm', sizeBytes: size });
    const model = Buffer.alloc(size);
    let seed = 12345;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    for (let step = 0; step < 400; step++) {
      const offset = random(size);
      const length = 1 + random(Math.min(size - offset, 300 * KiB));
      const operation = random(3);
      if (operation === 0) {
        const data = Buffer.alloc(length, 1 + random(255));
        await device.write(offset, data, write);
        data.copy(model, offset);
      } else if (operation === 1) {
        await device.writeZeroes(offset, length, { fua: false, mayTrim: random(2) === 0, fastZero: false });
        model.fill(0, offset, offset + length);
      } else {
        // Trim leaves contents undefined for the client; the model follows what this device does:
        // whole blocks (or the device's tail) become zeros.
        await device.trim(offset, length, write);
        const first = Math.ceil(offset / MEMORY_BLOCK_BYTES) * MEMORY_BLOCK_BYTES;
        const end = offset + length === size ? size : Math.floor((offset + length) / MEMORY_BLOCK_BYTES) * MEMORY_BLOCK_BYTES;
        if (end > first) model.fill(0, first, end);
      }
    }
    assert.deepEqual(materialize(await device.read(0, size)), model);
    // Block status agrees with the bytes: data extents are exactly the blocks allocated as data.
    for (const extent of device.blockStatus(0, size)) {
      if (extent.zero) assert.equal(model.subarray(extent.offset, extent.offset + extent.length).every((b) => b === 0), true);
    }
  });
});
