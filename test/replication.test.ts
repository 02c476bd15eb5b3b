// Proves synchronous mirroring across a 3-node `mirrorsan up` on one host: a write through any node is read back through the others (the write grant moves between nodes), nbdcopy in through one node and out through the others is byte-exact, a write made while a member is stopped completes once that member is removed from the in-sync set (it no longer waits for its return), the member restarts out of sync, refuses I/O while it catches up and then serves the writes it missed, and after a clean stop the three image files are identical.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CLI_PATH, randomData, run, runOk, sha256, sha256File, sleep, startUp, testServerKind, waitUntil, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';
import { writeFile } from 'node:fs/promises';

const MiB = 1024 * 1024;
const SIZE_BYTES = 64 * MiB;
const COPY_BYTES = 16 * MiB;

interface ReplicatedStatus {
  name: string;
  epoch: number;
  replicas: string[];
  inSync: string[];
  arbiter: string;
  policing: { mode: string; regionSizeBytes: number; regionsHeldHere: number; arbiter: { regionsHeld: Record<string, number>; awaitingDrained: string[] } | null };
  sources: Record<string, { lastAppliedSequence: number; partitionEntries: number }>;
}

describe('3 nodes mirror one volume synchronously', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const uri = (index: number): string => cluster.nodes[index]!.nbd;
  const log = (): string => cluster?.stderr ?? '';
  const qemuIo = (index: number, command: string) => runOk('qemu-io', ['-f', 'raw', '-c', command, uri(index)]);
  const replicated = async (index: number): Promise<ReplicatedStatus> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    const status = (await response.json()) as { replicatedVolumes: ReplicatedStatus[] };
    const volume = status.replicatedVolumes.find((v) => v.name === cluster.volume);
    assert.ok(volume, `node ${index + 1} reports no replicated volume ${cluster.volume}`);
    return volume;
  };

  before(async () => {
    cluster = await startUp({ nodes: 3, size: '64MiB' });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('every node serves the volume with 3 replicas in sync at one epoch, n1 arbitrating 1 MiB regions', withServerLog(log, async () => {
    assert.equal(cluster.nodes.length, 3);
    // Each node moves the record past the epoch it opened the volume at (a rejoin; opens at
    // the same epoch share one bump), and every node follows the record.
    let epochs: number[] = [];
    for (let attempt = 0; attempt < 100; attempt++) {
      epochs = await Promise.all([0, 1, 2].map(async (index) => (await replicated(index)).epoch));
      if (epochs[0]! >= 2 && epochs.every((epoch) => epoch === epochs[0])) break;
      await sleep(50);
    }
    assert.ok(epochs[0]! >= 2 && epochs.every((epoch) => epoch === epochs[0]), `epochs ${epochs.join(',')}`);
    for (let index = 0; index < 3; index++) {
      const status = await replicated(index);
      assert.equal(status.policing.mode, 'regions');
      assert.equal(status.policing.regionSizeBytes, MiB);
      // The same in Prometheus form.
      const metrics = await (await fetch(`${cluster.nodes[index]!.admin}/metrics`)).text();
      const labels = `{node="n${index + 1}",volume="${cluster.volume}"}`;
      assert.ok(metrics.includes(`mirrorsan_replicated_volume_in_sync_members${labels} 3\n`), metrics);
      assert.ok(metrics.includes(`mirrorsan_replicated_volume_epoch${labels} ${epochs[0]}\n`), metrics);
      assert.ok(metrics.includes(`mirrorsan_replicated_volume_in_sync_here${labels} 1\n`), metrics);
      assert.deepEqual([...status.replicas].sort(), ['n1', 'n2', 'n3']);
      assert.deepEqual([...status.inSync].sort(), ['n1', 'n2', 'n3']);
      assert.equal(status.arbiter, 'n1');
    }
  }));

  it('writes through n1 are read back through n2 and n3', withServerLog(log, async () => {
    await qemuIo(0, 'write -P 0xa1 0 1M');
    await qemuIo(0, `write -P 0xa2 ${8 * MiB} 256k`);
    for (const index of [1, 2]) {
      await qemuIo(index, 'read -P 0xa1 0 1M');
      await qemuIo(index, `read -P 0xa2 ${8 * MiB} 256k`);
      // Block status (base:allocation) through the other nodes: data where n1 wrote, holes elsewhere.
      const map = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri(index)])).stdout) as { start: number; length: number; data: boolean }[];
      const dataAt = (offset: number) => map.find((extent) => extent.start <= offset && offset < extent.start + extent.length)?.data;
      assert.equal(dataAt(0), true, JSON.stringify(map));
      assert.equal(dataAt(8 * MiB + 4096), true, JSON.stringify(map));
      assert.equal(dataAt(4 * MiB), false, JSON.stringify(map));
    }
  }));

  it('a write through n2 is read through n1 and n3: the write grant moved to n2', withServerLog(log, async () => {
    await qemuIo(1, `write -P 0xb2 ${MiB} 1M`);
    await qemuIo(0, `read -P 0xb2 ${MiB} 1M`);
    await qemuIo(2, `read -P 0xb2 ${MiB} 1M`);
    await qemuIo(2, 'read -P 0xa1 0 1M');
    const arbiter = await replicated(0);
    assert.ok((arbiter.policing.arbiter?.regionsHeld.n2 ?? 0) >= 1, `the arbiter (n1) sees n2 holding a region: ${JSON.stringify(arbiter.policing)}`);
    assert.ok((await replicated(1)).policing.regionsHeldHere >= 1);
    // n1 applied n2's stream: its per-source status counts it.
    assert.ok(arbiter.sources.n2!.lastAppliedSequence >= 1, JSON.stringify(arbiter.sources));
    // `mirrorsan status` shows the same as a table.
    const table = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', cluster.nodes[0]!.admin]);
    assert.match(table.stdout, new RegExp(`^${cluster.volume}\\s+64MiB\\s+\\d+\\s+n1,n2,n3\\s+n1\\s+1MiB\\s+n1:\\d+ n2:\\d+\\s`, 'm'), table.stdout);
  }));

  it('nbdcopy in through n1 and out through n2 and n3 gives identical sha256', withServerLog(log, async () => {
    const image = path.join(cluster.workDir, 'random.raw');
    const data = randomData(COPY_BYTES);
    await writeFile(image, data);
    await runOk('nbdcopy', ['--flush', image, uri(0)]);
    for (const index of [1, 2]) {
      const out = path.join(cluster.workDir, `out-${index + 1}.raw`);
      await runOk('nbdcopy', [uri(index), out]);
      assert.equal(await sha256File(out, COPY_BYTES), sha256(data), `node ${index + 1} returns the copied bytes`);
    }
  }));

  it('a write made while n3 is stopped completes once n3 (lease revoked, link down) leaves the in-sync set; restarted, n3 catches up and serves it', withServerLog(log, async () => {
    const before = await replicated(0);
    const exit = await cluster.terminate(2);
    assert.equal(exit.forced, false, 'n3 stopped on SIGTERM');
    // A clean stop revokes n3's lease; its links are down at once: the write completes after
    // the failure timeout (1 s by default), not when n3 returns.
    const startedMs = Date.now();
    await qemuIo(0, `write -P 0xc3 ${20 * MiB} 1M`);
    const waitedMs = Date.now() - startedMs;
    assert.ok(waitedMs < 10_000, `write completed in ${waitedMs} ms`);
    const after = await replicated(0);
    assert.ok(after.epoch > before.epoch, `epoch moved from ${before.epoch} to ${after.epoch}`);
    assert.deepEqual([...after.inSync].sort(), ['n1', 'n2']);
    await qemuIo(1, `read -P 0xc3 ${20 * MiB} 1M`);
    // Restarted, n3 knows it missed writes: it refuses I/O (I3) until it caught up, then it is
    // back in the in-sync set and serves what was written while it was away.
    await cluster.restart(2);
    await waitUntil(async () => (await replicated(2)).inSync.includes('n3'), { timeoutMs: 30_000, what: 'n3 to catch up' });
    await waitUntil(async () => ((await replicated(2)) as ReplicatedStatus & { fence: string | null }).fence === null, { timeoutMs: 10_000, what: 'n3 to serve again' });
    await qemuIo(2, `read -P 0xc3 ${20 * MiB} 1M`);
    const table = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', cluster.nodes[2]!.admin]);
    assert.match(table.stdout, /n3:in-sync/, table.stdout);
  }));

  it('after a clean stop the three image files are byte-identical and equal what NBD returned', withServerLog(log, async () => {
    const whole = path.join(cluster.workDir, 'whole.raw');
    await runOk('nbdcopy', [uri(2), whole]);
    const expected = await sha256File(whole, SIZE_BYTES);
    for (let index = 0; index < 3; index++) {
      const exit = await cluster.terminate(index);
      assert.equal(exit.forced, false, `node ${index + 1} stopped on SIGTERM`);
    }
    for (const id of ['n1', 'n2', 'n3']) {
      const imageFile = path.join(cluster.dir, id, 'volumes', cluster.volume, 'volume.img');
      assert.equal(await sha256File(imageFile, SIZE_BYTES), expected, `${id}'s image equals the volume`);
    }
  }));
});
