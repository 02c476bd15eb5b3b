// Proves behaviour under a real network partition: three node processes, each in its own network namespace joined by veth pairs to a bridge where etcd listens; iptables cuts n3 off. The isolated minority stops acknowledging writes and serving reads, the majority removes it by an epoch change and keeps writing, and after healing the minority catches up: the majority's history is the one that survives everywhere, with no acknowledged write lost and the minority's unacknowledged write gone.
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createCoordinator, type Coordinator, type VolumeRecord } from '../src/cluster/index.js';
import { EtcdCluster } from '../src/cluster/etcd-process.js';
import { createLogger } from '../src/util/log.js';
import {
  CLI_PATH, ManagedProcess, NetnsLab, makeTempDir, netnsAvailable, removeDir, run, runOk, sleep, testServerKind, waitUntil,
} from './helpers/index.js';

const VOLUME = 'pvol';
const MiB = 1024 * 1024;
const NBD_PORT = 10809;
const LEASE_TTL_MS = 2000;
const FAILURE_TIMEOUT_MS = 1000;

const skip = testServerKind() !== 'mirrorsan' ? 'runs against mirrorsan only' : !netnsAvailable() ? 'needs root and ip netns' : false;

describe('a network partition isolates n3 from n1, n2 and the coordinator', { skip }, () => {
  let lab: NetnsLab;
  let etcd: EtcdCluster;
  let workDir: string;
  let coordinatorUrl: string;
  let coordinator: Coordinator;
  const nodes: ManagedProcess[] = [];
  const log = (): string => nodes.map((node, index) => `--- n${index + 1} ---\n${node.stderr.slice(-4000)}`).join('\n');
  const uri = (index: number): string => `nbd://${lab.hosts[index]!.address}:${NBD_PORT}/${VOLUME}`;
  const admin = (index: number): string => `http://${lab.hosts[index]!.address}:${NBD_PORT + 200}`;
  /** qemu-io run inside host `from`'s namespace against node `to`. */
  const qemuIo = (from: number, to: number, command: string, timeoutMs = 20_000) => {
    const [cmd, args] = lab.command(from, 'qemu-io', ['-f', 'raw', '-c', command, uri(to)]);
    return run(cmd, args, { timeoutMs });
  };
  const record = async (): Promise<VolumeRecord> => {
    const current = await coordinator.getVolumeRecord(VOLUME);
    assert.ok(current, 'the volume has a record');
    return current;
  };

  before(async () => {
    lab = NetnsLab.create(3);
    workDir = await makeTempDir('partition');
    etcd = new EtcdCluster(1, lab.bridgeAddress);
    await etcd.start();
    coordinatorUrl = `etcd://${etcd.endpoints[0]}/partition`;
    coordinator = await createCoordinator(coordinatorUrl, { logger: createLogger({ level: 'error' }) });
    const secretFile = path.join(workDir, 'cluster.secret');
    await writeFile(secretFile, 'partition-test-secret-0123456789\n', { mode: 0o600 });
    for (let index = 0; index < 3; index++) {
      const id = `n${index + 1}`;
      const host = lab.hosts[index]!.address;
      const configFile = path.join(workDir, `${id}.json`);
      await writeFile(configFile, JSON.stringify({
        id,
        dataDir: path.join(workDir, id),
        nbd: { host, port: NBD_PORT },
        peer: { host, port: NBD_PORT + 100 },
        admin: { host, port: NBD_PORT + 200 },
        volumes: [],
        coordinator: coordinatorUrl,
        tls: null,
        clusterSecretFile: secretFile,
        leaseTtlMs: LEASE_TTL_MS,
        failureTimeoutMs: FAILURE_TIMEOUT_MS,
      }, null, 2));
      const [cmd, args] = lab.command(index, process.execPath, [CLI_PATH, 'node', '--config', configFile, '--json']);
      const node = new ManagedProcess(cmd, args);
      nodes.push(node);
      await node.waitForLine((line) => line.startsWith('{'), { timeoutMs: 30_000, what: 'the JSON ready line' });
    }
    await waitUntil(async () => (await coordinator.liveNodes()).length === 3, { timeoutMs: 15_000, what: 'three live nodes' });
    await runOk(process.execPath, [CLI_PATH, 'volume', 'create', VOLUME, '--size', '64MiB', '--replicas', '3', '--coordinator', coordinatorUrl]);
    for (let index = 0; index < 3; index++) {
      await waitUntil(async () => (await qemuIo(index, index, 'read 0 4k', 5000)).code === 0, { timeoutMs: 20_000, what: `n${index + 1} to serve ${VOLUME}` });
    }
  });

  after(async () => {
    for (const node of nodes) await node.stop('SIGKILL').catch(() => undefined);
    await coordinator?.close().catch(() => undefined);
    await etcd?.stop().catch(() => undefined);
    lab?.destroy();
    if (workDir) await removeDir(workDir);
  });

  it('before the partition a write through n1 reads back through n2 and n3', async () => {
    const written = await qemuIo(0, 0, `write -P 0x11 0 1M`);
    assert.equal(written.code, 0, written.stderr + log());
    for (const index of [1, 2]) assert.equal((await qemuIo(index, index, 'read -P 0x11 0 1M')).code, 0, log());
  });

  it('isolated, n3 stops acknowledging and serving; n1 and n2 remove it by an epoch change and go on writing', async () => {
    const before = await record();
    lab.isolate(2);
    const isolatedAt = Date.now();
    // The majority: the write completes once n3's lease ran out and it left the in-sync set.
    const written = await qemuIo(0, 0, `write -P 0x22 ${2 * MiB} 1M`, 30_000);
    const writeMs = Date.now() - isolatedAt;
    assert.equal(written.code, 0, written.stderr + log());
    const after = await record();
    assert.ok(after.epoch > before.epoch, `epoch moved from ${before.epoch} to ${after.epoch}`);
    assert.deepEqual([...after.inSync].sort(), ['n1', 'n2']);
    process.stderr.write(`[partition] first write on the majority completed ${writeMs} ms after the partition\n`);
    assert.equal((await qemuIo(1, 1, `read -P 0x22 ${2 * MiB} 1M`)).code, 0, log());
    // The minority: n3 neither acknowledges a write nor serves what may be stale.
    const minorityWrite = await qemuIo(2, 2, `write -P 0x33 ${4 * MiB} 64k`, 8000);
    assert.notEqual(minorityWrite.code, 0, 'the isolated node acknowledged a write');
    const minorityRead = await qemuIo(2, 2, `read -P 0x22 ${2 * MiB} 1M`, 8000);
    assert.notEqual(minorityRead.code, 0, 'the isolated node served a read');
  });

  it('after healing, the majority history survives: n3 catches up, then serves the majority\'s writes and not its own unacknowledged one', async () => {
    lab.heal(2);
    for (const index of [0, 1]) {
      assert.equal((await qemuIo(index, index, 'read -P 0x11 0 1M')).code, 0, log());
      assert.equal((await qemuIo(index, index, `read -P 0x22 ${2 * MiB} 1M`)).code, 0, log());
      // The minority's unacknowledged write never reached the majority.
      assert.equal((await qemuIo(index, index, `read -P 0 ${4 * MiB} 64k`)).code, 0, log());
    }
    // n3 re-registers, joins as catching up, copies what differs, and is promoted.
    await waitUntil(async () => (await record()).inSync.includes('n3'), { timeoutMs: 60_000, what: 'n3 back in the in-sync set' });
    await waitUntil(async () => (await qemuIo(2, 2, 'read 0 4k', 5000)).code === 0, { timeoutMs: 20_000, what: 'n3 to serve again' });
    assert.equal((await qemuIo(2, 2, `read -P 0x22 ${2 * MiB} 1M`)).code, 0, `n3 serves the majority's write\n${log()}`);
    assert.equal((await qemuIo(2, 2, `read -P 0 ${4 * MiB} 64k`)).code, 0, `n3's own unacknowledged write is gone\n${log()}`);
    const status = (await (await fetch(`${admin(2)}/v1/status`)).json()) as { replicatedVolumes: { name: string; replicaState: string; catchUp: { state: string } | null }[] };
    const volume = status.replicatedVolumes.find((v) => v.name === VOLUME);
    assert.equal(volume?.replicaState, 'in-sync');
    assert.equal(volume?.catchUp?.state, 'done');
  });
});
