// Proves the replicated volume's shell over real stores: three replicas joined by an in-memory
// transport; a write through any node is readable through every other once acknowledged, the
// single-region grant moves between writers, FLUSH/FUA/ZERO/TRIM travel, a write waits while a
// member is unreachable and completes after the link comes back, and after close the three
// stores reopen with identical contents.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createLogger } from '../util/log.js';
import type { PeerMessage } from '../replication/peer-link.js';
import { ReplicatedVolume, type ReplicaTransport } from './replicated-volume.js';

const SIZE_BYTES = 4 * 1024 * 1024;
const NODES = ['n1', 'n2', 'n3'] as const;

/** FIFO delivery per ordered pair, one event-loop turn later; links can be cut and restored. */
class Loop {
  readonly volumes = new Map<string, ReplicatedVolume>();
  private readonly cut = new Set<string>();
  private timer: NodeJS.Timeout | undefined;

  transport(self: string): ReplicaTransport {
    const deliver = (to: string, message: PeerMessage): boolean => {
      if (this.cut.has(pairKey(self, to))) return false;
      setImmediate(() => {
        if (this.cut.has(pairKey(self, to))) return;
        this.volumes.get(to)?.receive(self, message);
      });
      return true;
    };
    return { sendToPeer: deliver, answerSource: deliver, resetInbound: () => undefined };
  }

  /** Both connections between every pair come up (dialer side first, as over TCP). */
  connectAll(): void {
    for (const a of NODES) for (const b of NODES) if (a !== b) this.up(a, b);
    this.timer = setInterval(() => {
      const now = Math.floor(performance.now());
      for (const volume of this.volumes.values()) volume.tick(now);
    }, 20);
  }

  /** `a`'s connection to `b` (a dialled) comes up. */
  up(a: string, b: string): void {
    this.volumes.get(a)!.outboundUp(b);
    this.volumes.get(b)!.inboundUp(a);
  }

  sever(a: string, b: string): void {
    this.cut.add(pairKey(a, b));
    this.cut.add(pairKey(b, a));
    this.volumes.get(a)!.outboundDown(b);
    this.volumes.get(b)!.outboundDown(a);
  }

  heal(a: string, b: string): void {
    this.cut.delete(pairKey(a, b));
    this.cut.delete(pairKey(b, a));
    this.up(a, b);
    this.up(b, a);
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    for (const volume of this.volumes.values()) await volume.close();
    this.volumes.clear();
  }
}

function pairKey(from: string, to: string): string {
  return `${from}>${to}`;
}

async function openCluster(root: string): Promise<Loop> {
  const loop = new Loop();
  const logger = createLogger({ level: 'error' });
  for (const self of NODES) {
    const volume = await ReplicatedVolume.open({
      name: 'vol',
      sizeBytes: SIZE_BYTES,
      dir: path.join(root, self),
      self,
      membership: { epoch: 1, replicas: [...NODES], inSync: [...NODES], arbiter: 'n1' },
      transport: loop.transport(self),
      logger: logger.child(self),
      sourceLimits: { checkpointIntervalMs: 200 },
    });
    loop.volumes.set(self, volume);
  }
  loop.connectAll();
  return loop;
}

async function readBytes(volume: ReplicatedVolume, offset: number, length: number): Promise<Buffer> {
  const pieces = await volume.read(offset, length);
  return Buffer.concat(pieces.map((piece) => (piece.kind === 'data' ? piece.data : Buffer.alloc(piece.length))));
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([promise, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms).unref())]);
}

test('a write through any replica is read back through every other; the grant moves between writers', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  let reference: Buffer = Buffer.alloc(0);
  try {
    const a = Buffer.alloc(65536, 0xa1);
    await withTimeout(v('n1').write(0, a, { fua: false }), 5000, 'write through n1');
    assert.deepEqual(await readBytes(v('n2'), 0, a.length), a);
    assert.deepEqual(await readBytes(v('n3'), 0, a.length), a);

    // n2 writes an overlapping range: the grant moves from n1 to n2 through the arbiter.
    const b = Buffer.alloc(4096, 0xb2);
    await withTimeout(v('n2').write(4096, b, { fua: true }), 5000, 'FUA write through n2');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 3 * 4096);
      assert.equal(bytes[0], 0xa1, `${id} keeps n1's first block`);
      assert.equal(bytes[4096], 0xb2, `${id} sees n2's block`);
      assert.equal(bytes[8191], 0xb2);
      assert.equal(bytes[8192], 0xa1);
    }
    const n2 = v('n2').status() as { grant: { heldHere: boolean } };
    assert.equal(n2.grant.heldHere, true, 'n2 holds the grant after its write');

    // Back to n1, with ZERO and TRIM, then a FLUSH on n3 (which wrote nothing) and on n1.
    await withTimeout(v('n1').writeZeroes(0, 4096, { fua: false, mayTrim: false, fastZero: false }), 5000, 'zero through n1');
    await withTimeout(v('n3').trim(8192, 4096, { fua: false }), 5000, 'trim through n3');
    await withTimeout(v('n3').flush(), 5000, 'flush on n3');
    await withTimeout(v('n1').flush(), 5000, 'flush on n1');
    for (const id of NODES) {
      const bytes = await readBytes(v(id), 0, 4 * 4096);
      assert.equal(bytes.subarray(0, 4096).every((x) => x === 0), true, `${id}: zeroed block`);
      assert.equal(bytes[4096], 0xb2);
      assert.equal(bytes.subarray(8192, 12288).every((x) => x === 0), true, `${id}: trimmed block`);
      assert.equal(bytes[12288], 0xa1);
    }

    // Many concurrent writes from two nodes: every replica ends with the same bytes.
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) {
      const writer = i % 2 === 0 ? 'n1' : 'n3';
      writes.push(v(writer).write((i % 16) * 4096, Buffer.alloc(4096, i + 1), { fua: false }));
    }
    await withTimeout(Promise.all(writes), 10_000, 'concurrent writes');
    reference = await readBytes(v('n1'), 0, 16 * 4096);
    assert.deepEqual(await readBytes(v('n2'), 0, reference.length), reference);
    assert.deepEqual(await readBytes(v('n3'), 0, reference.length), reference);
  } finally {
    await loop.close();
  }

  // Reopened (replay of what the close checkpointed): the three replicas agree.
  const reopened = await openCluster(root);
  try {
    const first = await readBytes(reopened.volumes.get('n1')!, 0, SIZE_BYTES);
    for (const id of ['n2', 'n3']) assert.deepEqual(await readBytes(reopened.volumes.get(id)!, 0, SIZE_BYTES), first, `${id} equals n1 after reopening`);
    assert.deepEqual(first.subarray(0, reference.length), reference, 'the last writes survived the reopen');
  } finally {
    await reopened.close();
  }
});

test('[I1] a write waits while a member is unreachable and completes once the link is back', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-volume-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const loop = await openCluster(root);
  const v = (id: string) => loop.volumes.get(id)!;
  try {
    await withTimeout(v('n1').write(0, Buffer.alloc(4096, 1), { fua: false }), 5000, 'first write');
    loop.sever('n1', 'n3');
    let done = false;
    const pending = v('n1').write(4096, Buffer.alloc(4096, 2), { fua: false }).then(() => (done = true));
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(done, false, 'not acknowledged without n3');
    loop.heal('n1', 'n3');
    await withTimeout(pending, 5000, 'write after heal');
    const bytes = await readBytes(v('n3'), 4096, 4096);
    assert.equal(bytes[0], 2);
  } finally {
    await loop.close();
  }
});
