// Proves failure handling with real processes (issue 5): on a 3-node `mirrorsan up`, SIGKILLing n3 while fio writes with verify through n1 stalls writes only until n3's lease has run out and it is removed from the in-sync set (record epoch + 1, inSync without n3, arbiter kept), after which every write completes and reads through n1 and n2 return the data; restarted, n3 catches up (copying only what differs) and returns to the in-sync set byte-identical; a strict volume refuses writes while a replica is out of sync; a node paused past its lease is removed, refuses reads the moment it resumes, then catches up; with two replicas the survivor of a SIGKILL goes on alone (the coordinator is the witness) and the other catches up on return.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createCoordinator, type Coordinator, type VolumeRecord } from '../src/cluster/index.js';
import { NbdClient } from '../src/nbd/index.js';
import { createLogger } from '../src/util/log.js';
import { CLI_PATH, fioNbd, run, runOk, sha256, sha256File, sleep, startUp, testServerKind, waitUntil, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
/** Short enough to keep the suite fast, long enough for a loaded 2-core machine to renew in time. */
const LEASE_TTL_MS = 2000;
const FAILURE_TIMEOUT_MS = 500;

interface ReplicatedStatus {
  name: string;
  epoch: number;
  inSync: string[];
  fence: string | null;
  degraded: boolean;
  replicaStates: { node: string; state: string }[];
}

describe('a node that dies leaves the in-sync set and the others go on', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  let coordinator: Coordinator;
  const log = (): string => cluster?.stderr ?? '';
  const uri = (index: number, volume?: string): string => (volume ? cluster.nodes[index]!.nbd.replace(/\/[^/]*$/, `/${volume}`) : cluster.nodes[index]!.nbd);
  const qemuIo = (index: number, command: string, volume?: string) => runOk('qemu-io', ['-f', 'raw', '-c', command, uri(index, volume)]);
  const replicated = async (index: number, name = cluster.volume): Promise<ReplicatedStatus | undefined> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    const status = (await response.json()) as { replicatedVolumes: ReplicatedStatus[] };
    return status.replicatedVolumes.find((v) => v.name === name);
  };
  const record = async (name = cluster.volume): Promise<VolumeRecord> => {
    const current = await coordinator.getVolumeRecord(name);
    assert.ok(current, `no record for ${name}`);
    return current;
  };
  /** Every node runs the volume at the record's epoch with all three in sync (the opening rejoins are done). */
  const settled = async (name = cluster.volume): Promise<VolumeRecord> => {
    await waitUntil(async () => {
      const current = await coordinator.getVolumeRecord(name);
      if (!current || current.inSync.length !== 3) return false;
      const views = await Promise.all([0, 1, 2].map((index) => replicated(index, name)));
      return views.every((view) => view?.epoch === current.epoch && view.fence === null);
    }, { timeoutMs: 15_000, what: `volume ${name} to settle on every node` });
    return record(name);
  };

  before(async () => {
    cluster = await startUp({ nodes: 3, size: '64MiB', extraArgs: ['--lease-ttl', String(LEASE_TTL_MS), '--failure-timeout', String(FAILURE_TIMEOUT_MS)] });
    coordinator = await createCoordinator(`embedded://${cluster.dir}/coordinator`, { logger: createLogger({ level: 'error' }) });
  });
  after(async () => {
    await coordinator?.close();
    await cluster?.stop();
  });

  it('SIGKILL n3 during fio writes through n1: writes complete once n3 is removed (epoch + 1), and n1 and n2 return the data', withServerLog(log, async (t) => {
    const start = await settled();
    await qemuIo(0, 'write -P 0xd1 0 1M');
    const port = Number(new URL(cluster.nodes[0]!.nbd).port);
    const client = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: cluster.volume });
    try {
      // fio writes 6 MiB at 3 MiB/s through n1 and verifies it at the end: it runs across the kill.
      const fio = fioNbd(cluster.nodes[0]!.nbd, [
        '--name=during-kill', '--rw=write', '--bs=64k', '--iodepth=4', `--offset=${32 * MiB}`, '--size=6M', '--rate=3m',
        '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
      ]);
      await sleep(500);
      const killedAtMs = performance.now();
      await cluster.kill(2);
      // A write submitted right after the kill: its completion is the first one that needed n3 gone.
      const probe = Buffer.alloc(64 * 1024, 0xd2);
      await client.write(2 * MiB, probe);
      const firstWriteMs = Math.round(performance.now() - killedAtMs);
      t.diagnostic(`kill -> first completed write: ${firstWriteMs} ms (lease TTL ${LEASE_TTL_MS} ms, failure timeout ${FAILURE_TIMEOUT_MS} ms)`);
      // Not before n3's lease could have run out: writes waited for n3 while it might still serve.
      assert.ok(firstWriteMs < 4 * LEASE_TTL_MS + 2000, `first write after ${firstWriteMs} ms`);
      const report = await fio;
      assert.equal(report.jobs[0]!.error, 0);

      const after = await record();
      assert.equal(after.epoch, start.epoch + 1, 'one epoch-incrementing CAS removed n3');
      assert.deepEqual(after.inSync, ['n1', 'n2']);
      assert.deepEqual(after.replicas, ['n1', 'n2', 'n3']);
      assert.equal(after.arbiter, start.arbiter, 'the arbiter stays while it is in sync');
      assert.match(log(), /removed a member from the in-sync set volume=vol0 member=n3 epoch=\d+ inSync=n1,n2 arbiter=n1 reason="n3 silent for \d+ ms \(failure timeout 500 ms\) and its lease is gone"/);

      await waitUntil(async () => (await replicated(1))?.epoch === after.epoch, { timeoutMs: 5000, what: 'n2 to adopt the new epoch' });
      for (const index of [0, 1]) {
        const view = (await replicated(index))!;
        assert.deepEqual(view.inSync, ['n1', 'n2']);
        assert.equal(view.degraded, true);
        assert.deepEqual(view.replicaStates.map((r) => `${r.node}:${r.state}`), ['n1:in-sync', 'n2:in-sync', 'n3:out-of-sync']);
        await qemuIo(index, 'read -P 0xd1 0 1M');
        await qemuIo(index, `read -P 0xd2 ${2 * MiB} 64k`);
      }
      // What fio wrote across the kill reads back the same through both survivors.
      const viaN1 = await client.read(32 * MiB, 6 * MiB);
      const n2 = await NbdClient.connect({ host: '127.0.0.1', port: Number(new URL(cluster.nodes[1]!.nbd).port) }, { exportName: cluster.volume });
      try {
        assert.equal(sha256(await n2.read(32 * MiB, 6 * MiB)), sha256(viaN1));
      } finally {
        await n2.disconnect();
      }
    } finally {
      await client.disconnect().catch(() => undefined);
    }
  }));

  it('restarted after the SIGKILL, n3 catches up (copying only what it missed) and returns to the in-sync set with the data written while it was away', withServerLog(log, async (t) => {
    const restartedAtMs = performance.now();
    await cluster.restart(2);
    await waitUntil(async () => (await record()).inSync.includes('n3'), { timeoutMs: 30_000, what: 'n3 back in the in-sync set' });
    t.diagnostic(`n3 restart -> in sync again: ${Math.round(performance.now() - restartedAtMs)} ms`);
    await waitUntil(async () => (await replicated(2))?.fence === null, { timeoutMs: 10_000, what: 'n3 to serve again' });
    const view = await replicated(2) as ReplicatedStatus & { catchUp: { state: string; mode: string; bytesCopied: number; bytesCompared: number } | null };
    assert.deepEqual(view.replicaStates.map((r) => `${r.node}:${r.state}`), ['n1:in-sync', 'n2:in-sync', 'n3:in-sync']);
    assert.equal(view.catchUp?.state, 'done');
    // Only the chunks n1 and n2 marked while n3 was away (fio's 6 MiB range, the probe, their
    // resend windows at the kill) were compared, not the 64 MiB volume.
    assert.equal(view.catchUp?.mode, 'dirty-regions');
    assert.ok((view.catchUp?.bytesCompared ?? 0) >= 1 * MiB && (view.catchUp?.bytesCompared ?? 0) <= 12 * MiB, `compared ${view.catchUp?.bytesCompared} bytes`);
    assert.ok((view.catchUp?.bytesCopied ?? 0) < 32 * MiB, `only what n3 missed was copied: ${view.catchUp?.bytesCopied} bytes`);
    assert.match(log(), /n3\/replication\/membership\] catching up: joined the volume's catching-up set/);
    assert.match(log(), /n3\/replication\/membership\] caught up: back in the in-sync set/);
    // Written while n3 was dead (the fio run and 0xd2), now read through n3 itself.
    await qemuIo(2, `read -P 0xd2 ${2 * MiB} 64k`);
    const viaN1 = path.join(cluster.workDir, 'vol-n1.raw');
    const viaN3 = path.join(cluster.workDir, 'vol-n3.raw');
    await runOk('nbdcopy', [uri(0), viaN1]);
    await runOk('nbdcopy', [uri(2), viaN3]);
    assert.equal(await sha256File(viaN3, 64 * MiB), await sha256File(viaN1, 64 * MiB), 'n3 returns the same volume as n1');
    // And it takes part again: a write through n3 reads back through n1 and n2.
    await qemuIo(2, `write -P 0xd3 ${4 * MiB} 64k`);
    await qemuIo(0, `read -P 0xd3 ${4 * MiB} 64k`);
    await qemuIo(1, `read -P 0xd3 ${4 * MiB} 64k`);
  }));

  it('a strict volume refuses writes while a replica is out of sync, with a clear error; the relaxed one goes on', withServerLog(log, async () => {
    await runOk(process.execPath, [CLI_PATH, 'volume', 'create', 'strict1', '--size', '16MiB', '--replicas', '3', '--strict', '--dir', cluster.dir]);
    await settled('strict1');
    await qemuIo(0, 'write -P 0xe1 0 64k', 'strict1');
    await cluster.kill(2);
    await waitUntil(async () => (await record('strict1')).inSync.length === 2, { timeoutMs: 10_000, what: 'n3 to leave the in-sync set of strict1' });
    await waitUntil(async () => (await replicated(0, 'strict1'))?.inSync.length === 2, { timeoutMs: 5000, what: 'n1 to adopt it' });
    const refused = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xe2 0 64k', uri(0, 'strict1')]);
    assert.notEqual(refused.code, 0, 'a strict volume refuses a write while n3 is out of sync');
    assert.match(refused.stdout + refused.stderr, /Operation not permitted/);
    // The reason travels in the NBD structured error reply.
    const client = await NbdClient.connect({ host: '127.0.0.1', port: Number(new URL(cluster.nodes[0]!.nbd).port) }, { exportName: 'strict1' });
    try {
      await assert.rejects(client.write(0, Buffer.alloc(4096, 0xe2)), /strict and only 2 of 3 replicas are in sync \(n1,n2\): writes are refused until every replica is back/);
    } finally {
      await client.disconnect();
    }
    const table = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', cluster.nodes[0]!.admin]);
    assert.match(table.stdout, /strict1: DEGRADED, out of sync: n3 \(strict: writes are refused until every replica is back\)/, table.stdout);
    // Reads still work, and the data written before is intact.
    await qemuIo(1, 'read -P 0xe1 0 64k', 'strict1');
    // vol0 (not strict) still takes writes with n3 gone again.
    await qemuIo(0, `write -P 0xd4 ${5 * MiB} 64k`);
  }));

  it('a paused node (SIGSTOP past its lease) is removed, and when it resumes it refuses reads at once instead of serving stale data', withServerLog(log, async (t) => {
    // n3 back (it catches up: n1 and n3 keep a majority of links while n2 is frozen).
    await cluster.restart(2);
    await settled();
    const n2Port = Number(new URL(cluster.nodes[1]!.nbd).port);
    const n2Client = await NbdClient.connect({ host: '127.0.0.1', port: n2Port }, { exportName: cluster.volume });
    try {
      await n2Client.read(0, 4096);
      const before = await record();
      assert.deepEqual([...before.inSync].sort(), ['n1', 'n2', 'n3']);
      process.kill(cluster.nodes[1]!.pid, 'SIGSTOP');
      const stoppedAtMs = performance.now();
      try {
        // Through n1 a write completes once n2's lease ran out and n2 was removed.
        await qemuIo(0, `write -P 0xf1 ${6 * MiB} 64k`);
        t.diagnostic(`SIGSTOP n2 -> write through n1 completed: ${Math.round(performance.now() - stoppedAtMs)} ms`);
        const after = await record();
        assert.ok(after.epoch > before.epoch, `epoch ${before.epoch} -> ${after.epoch}`);
        assert.ok(!after.inSync.includes('n2') && after.inSync.includes('n1'), `inSync ${after.inSync.join(',')}`);
        assert.equal(after.arbiter, 'n1');
      } finally {
        process.kill(cluster.nodes[1]!.pid, 'SIGCONT');
      }
      // The first request after the pause: the lease is over, so n2 must not answer from its
      // copy (which lacks 0xf1), even before its timers have run.
      await assert.rejects(n2Client.read(6 * MiB, 64 * 1024), 'n2 refuses a read right after resuming');
    } finally {
      await n2Client.disconnect().catch(() => undefined);
    }
    assert.match(log(), /lost the coordinator lease: fencing replicated volumes/);
    await qemuIo(0, `read -P 0xf1 ${6 * MiB} 64k`);
    // Re-registered, n2 catches up and then serves what was written while it was frozen.
    await waitUntil(async () => (await record()).inSync.includes('n2'), { timeoutMs: 30_000, what: 'n2 back in the in-sync set' });
    await waitUntil(async () => (await replicated(1))?.fence === null, { timeoutMs: 10_000, what: 'n2 to serve again' });
    await qemuIo(1, `read -P 0xf1 ${6 * MiB} 64k`);
  }));
});

describe('two replicas: the survivor goes on alone (the coordinator is the witness) and the other catches up', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';
  const status = async (index: number): Promise<ReplicatedStatus & { replicaState: string }> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    return ((await response.json()) as { replicatedVolumes: (ReplicatedStatus & { replicaState: string })[] }).replicatedVolumes[0]!;
  };

  before(async () => {
    cluster = await startUp({ nodes: 2, size: '32MiB', extraArgs: ['--lease-ttl', String(LEASE_TTL_MS), '--failure-timeout', String(FAILURE_TIMEOUT_MS)] });
    await waitUntil(async () => (await status(0)).fence === null && (await status(1)).fence === null, { timeoutMs: 15_000, what: 'both nodes serving' });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('SIGKILL n2: writes through n1 complete once n2 is removed; n2 restarts, catches up and serves them', withServerLog(log, async (t) => {
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 1M', cluster.nodes[0]!.nbd]);
    await cluster.kill(1);
    const killedAtMs = performance.now();
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x22 ${MiB} 1M`, cluster.nodes[0]!.nbd]);
    t.diagnostic(`2 replicas, SIGKILL n2 -> write through n1 completed: ${Math.round(performance.now() - killedAtMs)} ms`);
    assert.deepEqual((await status(0)).inSync, ['n1']);
    await cluster.restart(1);
    await waitUntil(async () => (await status(1)).replicaState === 'in-sync', { timeoutMs: 30_000, what: 'n2 back in sync' });
    await waitUntil(async () => (await status(1)).fence === null, { timeoutMs: 10_000, what: 'n2 serving' });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x21 0 1M', '-c', `read -P 0x22 ${MiB} 1M`, cluster.nodes[1]!.nbd]);
  }));
});
