// Proves PayloadCopier: buffers their creator handed over are kept as they are, anything else (views of larger buffers, buffers never handed over) is copied into memory of its own, small copies share slabs without overlapping, large ones get their own allocation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PayloadCopier, SLAB_COPY_MAX_BYTES, handOver, isHandedOver } from './payload-copy.js';

test('handed-over buffers are kept; views and unmarked buffers are copied, and the copy survives changes to the source', () => {
  const copier = new PayloadCopier();
  const own = handOver(Buffer.alloc(8192, 1));
  assert.equal(copier.owned(own), own);
  // A handed-over buffer that is a view of a larger one would pin it: copied anyway.
  const chunk = Buffer.alloc(65536, 2);
  const view = handOver(chunk.subarray(4096, 8192));
  assert.ok(!isHandedOver(view));
  const unmarked = Buffer.alloc(4096, 3);
  for (const source of [view, unmarked]) {
    const copy = copier.owned(source);
    assert.notEqual(copy.buffer, source.buffer);
    const before = Buffer.from(copy);
    source.fill(0xff); // the socket chunk is reused
    assert.deepEqual(copy, before);
  }
  assert.equal(copier.owned(Buffer.alloc(0)).length, 0);
  assert.equal(copier.stats().copies, 2);
});

test('small copies share slabs without overlapping; large ones are separate', () => {
  const copier = new PayloadCopier(256 * 1024);
  const copies: Buffer[] = [];
  for (let i = 0; i < 200; i++) copies.push(copier.copy(Buffer.alloc(1 + ((i * 997) % 5000), i & 0xff)));
  const slabs = new Set(copies.map((copy) => copy.buffer));
  assert.ok(slabs.size > 1 && slabs.size < 10, `${slabs.size} slabs for 200 copies`);
  // Within a slab, no two copies share a byte, and every copy kept its own bytes.
  for (const slab of slabs) {
    const ranges = copies.filter((copy) => copy.buffer === slab).map((copy) => [copy.byteOffset, copy.byteOffset + copy.length] as const).sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < ranges.length; i++) assert.ok(ranges[i]![0] >= ranges[i - 1]![1], 'copies overlap');
  }
  copies.forEach((copy, i) => assert.ok(copy.every((byte) => byte === (i & 0xff)), `copy ${i} intact`));
  const large = copier.copy(Buffer.alloc(SLAB_COPY_MAX_BYTES + 1, 7));
  assert.equal(large.byteLength, large.buffer.byteLength);
  assert.throws(() => new PayloadCopier(1024));
});
