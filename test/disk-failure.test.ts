// Proves disk failure handling with real processes (issue 5 item 4): on a 3-node `mirrorsan up` with fault injection enabled, EIO injected on n1's image writes while fio (verify=crc32c) writes through n1 makes n1 diskless (its requests, the refused in-flight ones included, are forwarded to an in-sync peer) and fio finishes with no error and verified data; the record leaves n1 out of the in-sync set by one epoch-incrementing CAS (the arbiter moves off it) and the other nodes see it out; status, `mirrorsan status` and /metrics say diskless, with the error and the peer; once the fault is cleared, `mirrorsan volume reattach --wait` reopens n1's replica, it catches up (with what was written while it was diskless), is back in sync and serves locally, the data reads the same through every node and the three image files are byte-identical; ENOSPC on n2 during a qemu-io write does the same; and fault injection is refused (403) on a node started without the test setting.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createCoordinator, type Coordinator, type VolumeRecord } from '../src/cluster/index.js';
import { NbdClient } from '../src/nbd/index.js';
import { createLogger } from '../src/util/log.js';
import { CLI_PATH, fioNbd, runOk, sha256, sha256File, sleep, startUp, testServerKind, waitUntil, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
const LEASE_TTL_MS = 2000;
const FAILURE_TIMEOUT_MS = 500;
const FAULT_ENV = 'MIRRORSAN_FAULT_INJECTION';

interface DisklessStatus {
  mode: string;
  error: { code: string; message: string };
  forwardingTo: string | null;
  failureToForwardingMs: number | null;
  peersSynced: boolean | null;
  leaveOutcome: string | null;
  reroutedRequests: number;
  forwarder: { forwardedRequests: number; failedRequests: number } | null;
}

interface ReplicatedStatus {
  name: string;
  epoch: number;
  inSync: string[];
  arbiter: string;
  fence: string | null;
  replicaState: string;
  replicaStates: { node: string; state: string }[];
  diskless: DisklessStatus | null;
}

describe('a node whose disk fails goes diskless, serves its clients through a peer, and catches up once re-attached', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  let coordinator: Coordinator;
  const savedEnv = process.env[FAULT_ENV];
  const log = (): string => cluster?.stderr ?? '';
  const port = (index: number): number => Number(new URL(cluster.nodes[index]!.nbd).port);
  const admin = (index: number): string => cluster.nodes[index]!.admin;
  const status = async (index: number): Promise<ReplicatedStatus> => {
    const response = await fetch(`${admin(index)}/v1/status`);
    const body = (await response.json()) as { replicatedVolumes: ReplicatedStatus[] };
    return body.replicatedVolumes.find((volume) => volume.name === cluster.volume)!;
  };
  const record = async (): Promise<VolumeRecord> => (await coordinator.getVolumeRecord(cluster.volume))!;
  const faults = async (index: number, method: 'POST' | 'DELETE', body?: object): Promise<Response> =>
    fetch(`${admin(index)}/v1/faults`, { method, ...(body ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}) });
  const readVia = async (index: number, offset: number, length: number): Promise<Buffer> => {
    const client = await NbdClient.connect({ host: '127.0.0.1', port: port(index) }, { exportName: cluster.volume });
    try {
      // In pieces: one READ carries at most 32 MiB.
      const pieces: Buffer[] = [];
      for (let at = offset; at < offset + length; at += 16 * MiB) pieces.push(await client.read(at, Math.min(16 * MiB, offset + length - at)));
      return Buffer.concat(pieces);
    } finally {
      await client.disconnect();
    }
  };
  const images = (): string[] => ['n1', 'n2', 'n3'].map((node) => path.join(cluster.dir, node, 'volumes', cluster.volume, 'volume.img'));
  /** Every node serves at the record's epoch with all three in sync. */
  const settled = async (): Promise<VolumeRecord> => {
    await waitUntil(async () => {
      const current = await record();
      if (current.inSync.length !== 3) return false;
      const views = await Promise.all([0, 1, 2].map(status));
      return views.every((view) => view.epoch === current.epoch && view.fence === null && view.diskless === null);
    }, { timeoutMs: 20_000, what: 'the volume to settle with three in-sync replicas' });
    return record();
  };
  /** At quiescence every replica's image file holds the same bytes (remote applies may trail an answer by a moment). */
  const imagesIdentical = async (): Promise<string> => {
    let hashes: string[] = [];
    await waitUntil(async () => {
      hashes = await Promise.all(images().map((file) => sha256File(file, cluster.sizeBytes)));
      return hashes.every((hash) => hash === hashes[0]);
    }, { timeoutMs: 10_000, what: 'the three image files to be byte-identical' });
    return hashes[0]!;
  };

  before(async () => {
    // The nodes inherit it: test configuration only (src/node/faults.ts).
    process.env[FAULT_ENV] = '1';
    cluster = await startUp({ nodes: 3, size: '64MiB', extraArgs: ['--lease-ttl', String(LEASE_TTL_MS), '--failure-timeout', String(FAILURE_TIMEOUT_MS)] });
    coordinator = await createCoordinator(`embedded://${cluster.dir}/coordinator`, { logger: createLogger({ level: 'error' }) });
  });
  after(async () => {
    if (savedEnv === undefined) delete process.env[FAULT_ENV];
    else process.env[FAULT_ENV] = savedEnv;
    await coordinator?.close();
    await cluster?.stop();
  });

  it('EIO on n1\'s image writes mid-run: fio through n1 finishes without an error, n1 is diskless and out of the in-sync set', withServerLog(log, async (t) => {
    const start = await settled();
    // Usually n1 arbitrates; a node slow to start may have been removed and caught up already,
    // which moves the arbiter: either way it must not be n1 once n1 is out.
    t.diagnostic(`arbiter at start: ${start.arbiter}`);
    // fio writes 12 MiB at 6 MiB/s through n1, then reads it back through n1 and verifies it.
    const fio = fioNbd(cluster.nodes[0]!.nbd, [
      '--name=during-fault', '--rw=write', '--bs=64k', '--iodepth=8', `--offset=${16 * MiB}`, '--size=12M', '--rate=6m',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
    ]);
    await sleep(700);
    const faultAtMs = performance.now();
    const injected = await faults(0, 'POST', { volume: cluster.volume, errno: 'EIO' });
    assert.equal(injected.status, 200, await injected.clone().text());
    await waitUntil(async () => (await status(0)).replicaState === 'diskless', { timeoutMs: 5000, intervalMs: 20, what: 'n1 to go diskless' });
    t.diagnostic(`fault injected -> status diskless: ${Math.round(performance.now() - faultAtMs)} ms`);
    const report = await fio;
    assert.equal(report.jobs[0]!.error, 0, 'fio saw no error and verified everything');
    assert.equal(report.jobs[0]!.read.io_bytes, 12 * MiB, 'the verify pass read everything back (through the forwarder)');

    // One epoch-incrementing CAS: n1 in neither set, the arbiter moved to an in-sync member.
    const after = await record();
    assert.equal(after.epoch, start.epoch + 1);
    assert.deepEqual([...after.inSync].sort(), ['n2', 'n3']);
    assert.equal(after.catchingUp, undefined);
    assert.ok(after.arbiter !== undefined && after.inSync.includes(after.arbiter), `the arbiter (${after.arbiter}) is an in-sync member, not n1`);
    if (start.arbiter === 'n1') assert.equal(after.arbiter, after.inSync[0], 'the arbiter moved to the first remaining in-sync member');
    for (const index of [1, 2]) {
      await waitUntil(async () => (await status(index)).epoch === after.epoch, { timeoutMs: 5000, what: `n${index + 1} to adopt the new epoch` });
      const view = await status(index);
      assert.deepEqual(view.replicaStates.map((r) => `${r.node}:${r.state}`), ['n1:out-of-sync', 'n2:in-sync', 'n3:in-sync']);
    }

    const n1 = await status(0);
    assert.equal(n1.replicaState, 'diskless');
    assert.deepEqual(n1.replicaStates.map((r) => `${r.node}:${r.state}`), ['n1:diskless', 'n2:in-sync', 'n3:in-sync']);
    const diskless = n1.diskless!;
    assert.equal(diskless.mode, 'diskless');
    assert.equal(diskless.error.code, 'STORE_IO');
    assert.match(diskless.error.message, /image (zero )?write failed at offset \d+ length \d+ \(EIO\)/);
    assert.ok(diskless.forwardingTo === 'n2' || diskless.forwardingTo === 'n3', `forwarding to ${diskless.forwardingTo}`);
    assert.equal(diskless.peersSynced, true, "the peers made n1's acknowledged writes durable before it left");
    assert.equal(diskless.leaveOutcome, 'out');
    assert.ok(diskless.reroutedRequests >= 1, 'the write that met the fault (and any in flight with it) went to the forwarder');
    assert.ok((diskless.forwarder?.forwardedRequests ?? 0) > 0);
    assert.equal(diskless.forwarder?.failedRequests, 0);
    t.diagnostic(`disk failure -> forwarding: ${diskless.failureToForwardingMs} ms; requests rerouted: ${diskless.reroutedRequests}, forwarded: ${diskless.forwarder?.forwardedRequests}`);
    assert.ok((diskless.failureToForwardingMs ?? Infinity) < 5000, `failure to forwarding took ${diskless.failureToForwardingMs} ms`);
    assert.match(log(), /n1\/replication\/volume vol0\] disk failed: detaching it \(diskless mode\) what="local apply of entry \d+" code=STORE_IO/);
    assert.match(log(), /n1\/replication\/membership\] disk failed: left the in-sync set \(diskless\) volume=vol0 epoch=\d+/);
    assert.match(log(), /n1\/replication\/volume vol0\/forward\] forwarding to in-sync peer peer=n[23]/);

    const table = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', admin(0)]);
    assert.match(table.stdout, /vol0: n1 is DISKLESS \(diskless\) since \S+: disk error STORE_IO: image .*\(EIO\).*; I\/O is forwarded to n[23], \d+ requests forwarded, 0 pending, 0 failed; re-attach with: mirrorsan volume reattach vol0/, table.stdout);
    assert.match(table.stdout, /n1:diskless n2:in-sync n3:in-sync/);
    const metrics = await (await fetch(`${admin(0)}/metrics`)).text();
    assert.match(metrics, /mirrorsan_replicated_volume_diskless\{node="n1",volume="vol0"\} 1/);
    assert.match(metrics, /mirrorsan_replicated_volume_forwarded_requests\{node="n1",volume="vol0"\} [1-9]\d*/);
    const dashboard = await (await fetch(`${admin(0)}/`)).text();
    assert.match(dashboard, /n1: diskless<\/span>/);

    // What fio wrote reads the same through every node (n1 forwards).
    const viaN1 = await readVia(0, 16 * MiB, 12 * MiB);
    assert.equal(sha256(await readVia(1, 16 * MiB, 12 * MiB)), sha256(viaN1));
    assert.equal(sha256(await readVia(2, 16 * MiB, 12 * MiB)), sha256(viaN1));
  }));

  it('re-attached once the fault is cleared, n1 catches up, is back in sync and serves locally; every image is byte-identical', withServerLog(log, async (t) => {
    // Written while n1 is diskless: through n2, and through n1 itself (forwarded).
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${40 * MiB} 1M`, cluster.nodes[1]!.nbd]);
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x5b ${42 * MiB} 1M`, cluster.nodes[0]!.nbd]);
    // A re-attach with the fault still there fails: the node stays diskless.
    const refused = await fetch(`${admin(0)}/v1/volumes/${cluster.volume}/reattach`, { method: 'POST' });
    const afterRefused = await status(0);
    t.diagnostic(`re-attach onto the still-faulty disk: HTTP ${refused.status} (${(await refused.clone().text()).replace(/\s+/g, ' ').slice(0, 200)})`);
    if (refused.status === 200) {
      // The store may open (nothing to replay onto the image) and fail at its first write instead.
      await waitUntil(async () => (await status(0)).diskless?.mode === 'diskless', { timeoutMs: 10_000, what: 'n1 to be diskless again after a re-attach onto the faulty disk' });
    } else {
      assert.equal(refused.status, 503);
      assert.equal(afterRefused.replicaState, 'diskless');
    }
    assert.equal((await faults(0, 'DELETE')).status, 200);
    const reattachAtMs = performance.now();
    const reattached = await runOk(process.execPath, [CLI_PATH, 'volume', 'reattach', cluster.volume, '--node', 'n1', '--dir', cluster.dir, '--wait', '--timeout', '30']);
    t.diagnostic(`re-attach -> in sync and serving locally: ${Math.round(performance.now() - reattachAtMs)} ms`);
    assert.match(reattached.stdout, /vol0 on n1: re-attaching: the local replica reopened and catches up/);
    assert.match(reattached.stdout, /vol0 on n1: in sync; served from the local replica again/);

    const back = await record();
    assert.deepEqual([...back.inSync].sort(), ['n1', 'n2', 'n3']);
    const n1 = await status(0);
    assert.equal(n1.replicaState, 'in-sync');
    assert.equal(n1.diskless, null);
    assert.equal(n1.fence, null);
    assert.match(log(), /n1\/replication\/membership\] catching up: joined the volume's catching-up set/);
    assert.match(log(), /n1\/replication\/volume vol0\] disk re-attached: the local replica is in sync and serves again disklessForMs=\d+/);
    const metrics = await (await fetch(`${admin(0)}/metrics`)).text();
    assert.match(metrics, /mirrorsan_replicated_volume_diskless\{node="n1",volume="vol0"\} 0/);

    // n1 serves from its own replica again: what was written while it was diskless is there,
    // and a write through it reaches the others.
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x5a ${40 * MiB} 1M`, '-c', `read -P 0x5b ${42 * MiB} 1M`, cluster.nodes[0]!.nbd]);
    await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x5c ${44 * MiB} 1M`, '-c', 'flush', cluster.nodes[0]!.nbd]);
    for (const index of [1, 2]) await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x5c ${44 * MiB} 1M`, '-c', `read -P 0x5b ${42 * MiB} 1M`, cluster.nodes[index]!.nbd]);
    const image = await imagesIdentical();
    for (const index of [0, 1, 2]) assert.equal(sha256(await readVia(index, 0, cluster.sizeBytes)), image, `n${index + 1} serves what the image files hold`);
  }));

  it('ENOSPC on n2 during a write through n2: the client sees no error, n2 goes diskless, and catches up once re-attached', withServerLog(log, async (t) => {
    const start = await settled();
    assert.equal((await faults(1, 'POST', { errno: 'ENOSPC' })).status, 200); // every volume of n2
    const writeAtMs = performance.now();
    // Eight 64 KiB writes in flight together, in one 1 MiB chunk: several meet the fault at once
    // (their frames reached the peers, their entries never reached n2's log), and the catch-up
    // has a single chunk to copy for all of them.
    const aio = Array.from({ length: 8 }, (_, i) => ['-c', `aio_write -P 0x77 ${48 * MiB + i * 64 * 1024} 64k`]).flat();
    await runOk('qemu-io', ['-f', 'raw', ...aio, '-c', 'aio_flush', '-c', `write -P 0x77 ${48 * MiB + 512 * 1024} 1536k`, '-c', 'flush', cluster.nodes[1]!.nbd]);
    t.diagnostic(`ENOSPC: 2 MiB of writes through n2 completed in ${Math.round(performance.now() - writeAtMs)} ms (via the forwarder)`);
    const n2 = await status(1);
    assert.equal(n2.replicaState, 'diskless');
    assert.match(n2.diskless!.error.message, /\(ENOSPC\)/);
    t.diagnostic(`ENOSPC: requests rerouted from the failed replica: ${n2.diskless!.reroutedRequests}`);
    const out = await record();
    assert.ok(out.epoch > start.epoch && !out.inSync.includes('n2') && !(out.catchingUp ?? []).includes('n2'), `record ${JSON.stringify(out)}`);
    for (const index of [0, 2]) await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x77 ${48 * MiB} 2M`, cluster.nodes[index]!.nbd]);

    assert.equal((await faults(1, 'DELETE')).status, 200);
    const reattach = await fetch(`${admin(1)}/v1/volumes/${cluster.volume}/reattach`, { method: 'POST' });
    assert.equal(reattach.status, 200);
    assert.deepEqual(await reattach.json(), { node: 'n2', volume: 'vol0', mode: 'reattaching', changed: true });
    const reattachAtMs = performance.now();
    await waitUntil(async () => (await status(1)).replicaState === 'in-sync' && (await status(1)).diskless === null, { timeoutMs: 30_000, what: 'n2 back in sync, serving locally' });
    t.diagnostic(`ENOSPC: re-attach -> in sync and serving locally: ${Math.round(performance.now() - reattachAtMs)} ms`);
    await runOk('qemu-io', ['-f', 'raw', '-c', `read -P 0x77 ${48 * MiB} 2M`, cluster.nodes[1]!.nbd]);
    await imagesIdentical();
  }));
});

describe('fault injection is refused without the test setting', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const savedEnv = process.env[FAULT_ENV];
  before(async () => {
    delete process.env[FAULT_ENV];
    cluster = await startUp({ nodes: 1, size: '16MiB' });
  });
  after(async () => {
    if (savedEnv !== undefined) process.env[FAULT_ENV] = savedEnv;
    await cluster?.stop();
  });

  it('POST, GET and DELETE /v1/faults answer 403 FAULT_INJECTION_DISABLED, and the volume keeps working', async () => {
    for (const method of ['POST', 'GET', 'DELETE']) {
      const response = await fetch(`${cluster.nodes[0]!.admin}/v1/faults`, { method, ...(method === 'POST' ? { body: '{"errno":"EIO"}' } : {}) });
      assert.equal(response.status, 403, method);
      const body = (await response.json()) as { code: string; error: string };
      assert.equal(body.code, 'FAULT_INJECTION_DISABLED');
      assert.match(body.error, /MIRRORSAN_FAULT_INJECTION=1/);
    }
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'read -P 0x11 0 64k', cluster.nodes[0]!.nbd]);
    assert.doesNotMatch(cluster.stderr, /fault injection is ENABLED/);
  });
});
