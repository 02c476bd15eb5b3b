// Proves the switch-over to diskless mode over real replica stores, in one process: three replicated volumes joined by an in-memory transport, n1's export wrapped in a DisklessVolume; an injected EIO on n1's image refuses the write in flight (never acknowledged) and every later request with VOLUME_DISKLESS inside, while the client of the export sees no error: its requests wait until n1's peers made n1's acknowledged writes durable (SYNC), n1 left the in-sync set (epoch + 1, arbiter moved) and its replica closed, then go to n2's real NBD export; the data is on n2 and n3; a re-attach whose store cannot open leaves it diskless and says why.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { leaveDiskless } from '../cluster/catch-up-record.js';
import type { VolumeRecord } from '../cluster/coordinator.js';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { StaticExportRegistry } from '../nbd/registry.js';
import { NbdServer } from '../nbd/server.js';
import { createMemoryLogger } from '../util/log.js';
import { DisklessVolume } from './diskless-volume.js';
import { LOOP_NODES, openLoopCluster, readBytes, withTimeout } from './replica-loop.js';
import { ReplicatedVolume } from './replicated-volume.js';

const SIZE_BYTES = 4 * 1024 * 1024;
const NODES = LOOP_NODES;
const BLOCK_BYTES = 64 * 1024;

function pattern(seed: number, lengthBytes = BLOCK_BYTES): Buffer {
  const data = Buffer.alloc(lengthBytes);
  for (let i = 0; i < lengthBytes; i += 4) data.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return data;
}



test('a disk failure under load: the export forwards to an in-sync peer after n1 synced its stream on the peers and left the in-sync set', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'diskless-volume-'));
  const log = createMemoryLogger();
  let record: VolumeRecord = { epoch: 1, replicas: [...NODES], inSync: [...NODES], arbiter: 'n1', updatedAtMs: 0 };
  let failImage = false;
  const disklessCalls: MirrorsanError[] = [];
  let frontEnd: DisklessVolume | undefined;
  const loop = await openLoopCluster(
    root,
    SIZE_BYTES,
    (self, cluster) => ({
      membership: record,
      regionSizeBytes: 1024 * 1024,
      ...(self === 'n1'
        ? {
            faults: { failImageWrites: () => (failImage ? 'EIO' : false) },
            onDiskFailure: (failure: MirrorsanError) => {
              disklessCalls.push(failure);
              const n1 = cluster.volumes.get('n1');
              if (n1) frontEnd?.diskFailed(n1, failure);
            },
          }
        : {}),
    }),
    log,
  );
  const n1 = loop.volumes.get('n1')!;
  const n2 = loop.volumes.get('n2')!;
  const n3 = loop.volumes.get('n3')!;
  // n2's export, as its node serves it: the peer n1 forwards to.
  const socketPath = path.join(root, 'n2.sock');
  const n2Server = new NbdServer({ registry: new StaticExportRegistry([n2]), logger: log.child('n2-nbd') });
  await n2Server.listen({ path: socketPath });
  let left = 0;
  let detached: ReplicatedVolume | undefined;
  frontEnd = new DisklessVolume({
    volume: n1,
    logger: log.child('n1-export'),
    host: {
      // The coordinator's CAS, and the watch that hands the new record to every member.
      leave: async () => {
        const next = leaveDiskless(record, 'n1', Date.now());
        if (!next) return 'last-in-sync';
        record = next;
        left++;
        for (const volume of loop.volumes.values()) volume.changeMembership(record);
        return 'out';
      },
      detach: async (volume) => {
        detached = volume;
        loop.volumes.delete('n1');
        await volume.close();
      },
      reopen: async () => {
        throw new MirrorsanError('STORE_IO', 'the disk is still gone');
      },
      forwardTargets: () => (record.inSync.includes('n2') ? [{ node: 'n2', target: { path: socketPath } }] : []),
    },
  });
  t.after(async () => {
    frontEnd?.close();
    await n2Server.close({ graceMs: 50 });
    await loop.close();
    fs.rmSync(root, { recursive: true, force: true });
  });

  // Acknowledged while n1's disk works (not flushed: only in the peers' memory so far).
  await withTimeout(frontEnd.write(0, pattern(1), { fua: false }), 5000, 'a write before the fault');
  assert.equal(frontEnd.mode, 'attached');

  failImage = true;
  const faultAtMs = performance.now();
  const writes = Array.from({ length: 8 }, (_, i) => frontEnd!.write((i + 1) * BLOCK_BYTES, pattern(10 + i), { fua: false }));
  const flush = frontEnd.flush();
  await withTimeout(Promise.all([...writes, flush]), 10_000, 'writes and a flush across the disk failure');
  t.diagnostic(`fault -> 8 writes and a flush answered: ${Math.round(performance.now() - faultAtMs)} ms; failure -> forwarding ${frontEnd.status()?.failureToForwardingMs} ms`);
  assert.equal(frontEnd.mode, 'diskless');
  assert.equal(disklessCalls.length, 1, 'the volume told the export once');
  assert.ok(isMirrorsanError(disklessCalls[0], 'VOLUME_DISKLESS'));
  assert.match(disklessCalls[0]!.message, /the disk of n1 failed \(local (apply of entry \d+|log sync): image write failed .*\(EIO\)/);
  // The failed replica itself serves nothing any more (closed by now).
  await assert.rejects(n1.read(0, 4096), (error: unknown) => isMirrorsanError(error, 'VOLUME_DISKLESS') || isMirrorsanError(error, 'NBD_SHUTDOWN'));

  const status = frontEnd.status()!;
  assert.equal(status.mode, 'diskless');
  assert.equal(status.peersSynced, true, "n1's stream was made durable on its peers before it left");
  assert.equal(status.leaveOutcome, 'out');
  assert.equal(status.forwardingTo, 'n2');
  assert.ok(status.reroutedRequests >= 1, `rerouted ${status.reroutedRequests}`);
  assert.equal(status.forwarder?.failedRequests, 0);
  assert.equal(left, 1);
  assert.equal(detached, n1, 'the failed replica was closed');
  assert.deepEqual(record.inSync, ['n2', 'n3']);
  assert.equal(record.arbiter, 'n2', 'the arbiter moved off the failed node');
  // What n1 acknowledged before the fault is durable on the peers (their SYNC_ACK for its stream).
  const fromN1 = (n2.status() as { sources: Record<string, { durableSequence: number }> }).sources.n1!;
  assert.ok(fromN1.durableSequence >= 1, `n2 holds n1's stream durably through ${fromN1.durableSequence}`);

  // Every write is on the in-sync replicas, and reads through the export come from them.
  for (const volume of [n2, n3]) {
    assert.deepEqual(await readBytes(volume, 0, BLOCK_BYTES), pattern(1));
    for (let i = 0; i < 8; i++) assert.deepEqual(await readBytes(volume, (i + 1) * BLOCK_BYTES, BLOCK_BYTES), pattern(10 + i));
  }
  assert.deepEqual(await readBytes(frontEnd, 3 * BLOCK_BYTES, BLOCK_BYTES), pattern(12));
  assert.deepEqual(frontEnd.blockStatus(0, 4096), [{ offset: 0, length: 4096, hole: false, zero: false }]);
  assert.equal(frontEnd.stats().diskless, 1);

  // A re-attach while the disk is still gone fails and leaves the export forwarding.
  await assert.rejects(frontEnd.reattach(), /the disk is still gone/);
  assert.equal(frontEnd.mode, 'diskless');
  assert.equal(frontEnd.status()!.reattachError, 'the disk is still gone');
  await withTimeout(frontEnd.write(0, pattern(2), { fua: true }), 5000, 'a FUA write while diskless');
  assert.deepEqual(await readBytes(n3, 0, BLOCK_BYTES), pattern(2));
  assert.ok(log.lines.some((line) => /error .*\[mirrorsan\/n1\] disk failed: detaching it \(diskless mode\)/.test(line)), log.lines.join('\n'));
  assert.ok(log.lines.some((line) => /warn .*\[mirrorsan\/n1-export\] diskless: forwarding this node's requests to in-sync peers peersSynced=true leave=out/.test(line)));
});
