// Proves active-active writes on real node processes (issue 4): fio with crc32c verify on every node at once, on disjoint ranges and on ranges interleaved inside the same regions (grants move under load), each node's data then verified through the other nodes; a qemu-io ping-pong between two nodes; every node writing the same range with random data; and byte-identical replica images at quiescence.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fioNbd, runOk, sha256File, startUp, testServerKind, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
const SIZE_BYTES = 64 * MiB;

interface PolicingStatus {
  epoch: number;
  counters: { releaseSyncs: number; grantsReceived: number };
  policing: { mode: string; regionSizeBytes: number; regionsHeldHere: number; waitingWrites: number; arbiter: { regionsHeld: Record<string, number>; waiters: number } | null };
}

async function replicatedStatus(cluster: UpCluster, index: number): Promise<PolicingStatus> {
  const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
  const status = (await response.json()) as { replicatedVolumes: (PolicingStatus & { name: string })[] };
  const volume = status.replicatedVolumes.find((v) => v.name === cluster.volume);
  assert.ok(volume, `node ${index + 1} reports no replicated volume`);
  return volume;
}

/** fio job arguments for a verified random write over [offset, offset+size) (a stride of zones when given). */
function verifiedWriteJob(name: string, offsetBytes: number, sizeBytes: number, stride?: { zoneBytes: number; skipBytes: number }): string[] {
  return [
    `--name=${name}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--offset=${offsetBytes}`, `--size=${sizeBytes}`,
    '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--randrepeat=1',
    ...(stride ? ['--zonemode=strided', `--zonesize=${stride.zoneBytes}`, `--zoneskip=${stride.skipBytes}`] : []),
  ];
}

/** The same job, reading back and checking what it wrote (through another node). */
function verifyOnly(job: string[]): string[] {
  return [...job, '--verify_only=1'];
}

/** SIGTERM every node, then every replica's image file must equal `expectedSha`. */
async function assertImagesIdentical(cluster: UpCluster, expectedSha: string): Promise<void> {
  for (let index = 0; index < cluster.nodes.length; index++) {
    const exit = await cluster.terminate(index);
    assert.equal(exit.forced, false, `node ${index + 1} stopped on SIGTERM`);
  }
  for (let index = 0; index < cluster.nodes.length; index++) {
    const id = `n${index + 1}`;
    const imageFile = path.join(cluster.dir, id, 'volumes', cluster.volume, 'volume.img');
    assert.equal(await sha256File(imageFile, SIZE_BYTES), expectedSha, `${id}'s image equals the volume`);
  }
}

async function volumeSha(cluster: UpCluster, index: number, name: string): Promise<string> {
  const out = path.join(cluster.workDir, name);
  await runOk('nbdcopy', [cluster.nodes[index]!.nbd, out]);
  return sha256File(out, SIZE_BYTES);
}

describe('two writers on two nodes', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';
  const qemuIo = (index: number, command: string) => runOk('qemu-io', ['-f', 'raw', '-c', command, cluster.nodes[index]!.nbd]);

  before(async () => {
    cluster = await startUp({ nodes: 2, size: '64MiB', extraArgs: ['--region-size', '1MiB'] });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('fio with verify on each node, disjoint ranges: both verify, through their own node and the other', withServerLog(log, async () => {
    const jobs = [verifiedWriteJob('disjoint-n1', 0, 8 * MiB), verifiedWriteJob('disjoint-n2', 8 * MiB, 8 * MiB)];
    await Promise.all(jobs.map((job, index) => fioNbd(cluster.nodes[index]!.nbd, job)));
    await fioNbd(cluster.nodes[1]!.nbd, verifyOnly(jobs[0]!));
    await fioNbd(cluster.nodes[0]!.nbd, verifyOnly(jobs[1]!));
    // Disjoint regions: each node's grants stayed with it.
    const arbiter = await replicatedStatus(cluster, 0);
    assert.equal(arbiter.policing.mode, 'regions');
    assert.equal(arbiter.policing.arbiter?.regionsHeld.n1, 8, JSON.stringify(arbiter.policing));
    assert.equal(arbiter.policing.arbiter?.regionsHeld.n2, 8, JSON.stringify(arbiter.policing));
  }));

  it('fio with verify on each node, 64 KiB zones interleaved inside the same 1 MiB regions: grants move under load and nothing is lost', withServerLog(log, async () => {
    const stride = { zoneBytes: 64 * 1024, skipBytes: 64 * 1024 };
    const jobs = [verifiedWriteJob('interleaved-n1', 16 * MiB, 8 * MiB, stride), verifiedWriteJob('interleaved-n2', 16 * MiB + 64 * 1024, 8 * MiB, stride)];
    const before = await Promise.all([0, 1].map((index) => replicatedStatus(cluster, index)));
    await Promise.all(jobs.map((job, index) => fioNbd(cluster.nodes[index]!.nbd, job)));
    await fioNbd(cluster.nodes[1]!.nbd, verifyOnly(jobs[0]!));
    await fioNbd(cluster.nodes[0]!.nbd, verifyOnly(jobs[1]!));
    const afterStatus = await Promise.all([0, 1].map((index) => replicatedStatus(cluster, index)));
    const releases = afterStatus.reduce((sum, status, index) => sum + status.counters.releaseSyncs - before[index]!.counters.releaseSyncs, 0);
    assert.ok(releases >= 2, `the shared regions changed hands under load (${releases} releases)`);
  }));

  it('qemu-io ping-pong: n1 writes A, n2 reads A and writes B, n1 reads B, for 12 rounds', withServerLog(log, async () => {
    const offset = 40 * MiB + 4096;
    for (let round = 0; round < 12; round++) {
      const a = (2 * round + 1) & 0xff;
      const b = (2 * round + 2) & 0xff;
      await qemuIo(0, `write -P ${a} ${offset} 8k`);
      await qemuIo(1, `read -P ${a} ${offset} 8k`);
      await qemuIo(1, `write -P ${b} ${offset} 8k`);
      await qemuIo(0, `read -P ${b} ${offset} 8k`);
    }
  }));

  it('both nodes write random data over the same range at once; at quiescence both images are identical', withServerLog(log, async () => {
    const job = (name: string) => [`--name=${name}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--offset=${48 * MiB}`, `--size=${4 * MiB}`, '--randrepeat=0', '--io_size=8M'];
    await Promise.all([fioNbd(cluster.nodes[0]!.nbd, job('overlap-n1')), fioNbd(cluster.nodes[1]!.nbd, job('overlap-n2'))]);
    const [sha1, sha2] = [await volumeSha(cluster, 0, 'n1.raw'), await volumeSha(cluster, 1, 'n2.raw')];
    assert.equal(sha1, sha2, 'n1 and n2 return the same volume');
    await assertImagesIdentical(cluster, sha1);
  }));
});

describe('three writers on three nodes', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';

  before(async () => {
    cluster = await startUp({ nodes: 3, size: '64MiB', extraArgs: ['--region-size', '256KiB'] });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('fio with verify on each node on disjoint ranges, then all three on one overlapping range: every range verifies through every node and the images are identical', withServerLog(log, async () => {
    const jobs = [0, 1, 2].map((index) => verifiedWriteJob(`disjoint-n${index + 1}`, index * 8 * MiB, 8 * MiB));
    await Promise.all(jobs.map((job, index) => fioNbd(cluster.nodes[index]!.nbd, job)));
    for (let index = 0; index < 3; index++) await fioNbd(cluster.nodes[(index + 1) % 3]!.nbd, verifyOnly(jobs[index]!));

    const overlap = (name: string) => [`--name=${name}`, '--rw=randwrite', '--bs=4k', '--iodepth=8', `--offset=${32 * MiB}`, `--size=${2 * MiB}`, '--randrepeat=0', '--io_size=4M'];
    await Promise.all([0, 1, 2].map((index) => fioNbd(cluster.nodes[index]!.nbd, overlap(`overlap-n${index + 1}`))));
    const shas = [await volumeSha(cluster, 0, 'n1.raw'), await volumeSha(cluster, 1, 'n2.raw'), await volumeSha(cluster, 2, 'n3.raw')];
    assert.deepEqual(shas, [shas[0], shas[0], shas[0]], 'every node returns the same volume');
    // The disjoint ranges were not disturbed by the overlapping writers.
    for (let index = 0; index < 3; index++) await fioNbd(cluster.nodes[index]!.nbd, verifyOnly(jobs[index]!));
    await assertImagesIdentical(cluster, shas[0]!);
  }));
});
