// Proves the node's replication shell over real TCP on loopback: three shells with the same
// secret dial each other, route frames to their volume, and mirror a write made through one
// to the others, also when a volume opens on each node at a different time after the links came
// up; a node with another secret is refused and its volume never joins the stream.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VolumeRecord, VolumeSpec } from '../cluster/index.js';
import { createLogger } from '../util/log.js';
import type { ReplicatedVolume } from '../volume/replicated-volume.js';
import { NodeReplication, readClusterSecret } from './replication.js';

const SIZE_BYTES = 4 * 1024 * 1024;
const SECRET = Buffer.from('0123456789abcdef0123456789abcdef');
const SPEC: VolumeSpec = { name: 'vol', sizeBytes: SIZE_BYTES, replicas: 3, mode: 'sync', strict: false, regionSizeBytes: 1024 * 1024 };
const RECORD: VolumeRecord = { epoch: 1, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2', 'n3'], arbiter: 'n1', updatedAtMs: 0 };

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([promise, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms).unref())]);
}

async function readBytes(volume: ReplicatedVolume, offset: number, length: number): Promise<Buffer> {
  const pieces = await volume.read(offset, length);
  return Buffer.concat(pieces.map((piece) => (piece.kind === 'data' ? piece.data : Buffer.alloc(piece.length))));
}

async function startNodes(root: string, secrets: readonly Buffer[]): Promise<{ shells: NodeReplication[]; volumes: ReplicatedVolume[] }> {
  const logger = createLogger({ level: 'error' });
  const shells: NodeReplication[] = [];
  const volumes: ReplicatedVolume[] = [];
  for (const [index, secret] of secrets.entries()) {
    const self = `n${index + 1}`;
    const shell = new NodeReplication({
      self,
      clusterSecret: secret,
      peerEndpoint: { host: '127.0.0.1', port: 0 },
      logger: logger.child(self),
      timings: { reconnectMinMs: 20, reconnectMaxMs: 200 },
    });
    volumes.push(await shell.openVolume(SPEC, RECORD, path.join(root, self)));
    await shell.listen();
    shells.push(shell);
  }
  const peers = shells.map((shell, index) => ({ id: `n${index + 1}`, peer: shell.endpoint }));
  for (const shell of shells) shell.setPeers(peers);
  return { shells, volumes };
}

test('three shells mirror a write made through any of them', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'node-replication-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const { shells, volumes } = await startNodes(root, [SECRET, SECRET, SECRET]);
  try {
    await withTimeout(volumes[0]!.write(0, Buffer.alloc(8192, 0x5a), { fua: true }), 5000, 'write through n1');
    for (const volume of volumes) assert.equal((await readBytes(volume, 0, 8192)).every((x) => x === 0x5a), true, `${volume.self} has the write`);
    await withTimeout(volumes[2]!.write(4096, Buffer.alloc(4096, 0x33), { fua: false }), 5000, 'write through n3');
    await withTimeout(volumes[2]!.flush(), 5000, 'flush on n3');
    for (const volume of volumes) {
      const bytes = await readBytes(volume, 0, 8192);
      assert.equal(bytes[0], 0x5a);
      assert.equal(bytes[4096], 0x33, `${volume.self} has n3's write`);
    }
    const status = shells[0]!.status()[0] as { links: Record<string, { outbound: string; inbound: string }> };
    assert.deepEqual(status.links.n2, { ...status.links.n2, outbound: 'up', inbound: 'up' });
  } finally {
    for (const shell of shells) await shell.close();
  }
});

test('a volume opened after the links came up, on each node at a different time, still mirrors', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'node-replication-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const logger = createLogger({ level: 'error' });
  const shells: NodeReplication[] = [];
  try {
    for (const self of ['n1', 'n2', 'n3']) {
      const shell = new NodeReplication({ self, clusterSecret: SECRET, peerEndpoint: { host: '127.0.0.1', port: 0 }, logger: logger.child(self) });
      await shell.listen();
      shells.push(shell);
    }
    const peers = shells.map((shell, index) => ({ id: `n${index + 1}`, peer: shell.endpoint }));
    for (const shell of shells) shell.setPeers(peers);
    await new Promise((resolve) => setTimeout(resolve, 300)); // every link is up, no volume is open
    // n2 first: its targets' positioning ACKs reach n1 and n3 before they have the volume.
    const volumes: ReplicatedVolume[] = [];
    for (const index of [1, 0, 2]) {
      volumes[index] = await shells[index]!.openVolume(SPEC, RECORD, path.join(root, `n${index + 1}`));
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    for (const [index, volume] of volumes.entries()) {
      await withTimeout(volume.write(index * 4096, Buffer.alloc(4096, index + 1), { fua: false }), 5000, `write through n${index + 1}`);
    }
    for (const volume of volumes) {
      const bytes = await readBytes(volume, 0, 3 * 4096);
      assert.deepEqual([bytes[0], bytes[4096], bytes[8192]], [1, 2, 3], `${volume.self} has every write`);
    }
  } finally {
    for (const shell of shells) await shell.close();
  }
});

test('a node with another cluster secret is refused: writes wait for it and never complete', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'node-replication-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const { shells, volumes } = await startNodes(root, [SECRET, SECRET, Buffer.from('another-secret-of-another-cluster')]);
  try {
    let done = false;
    const write = volumes[0]!.write(0, Buffer.alloc(4096, 1), { fua: false }).then(
      () => (done = true),
      () => undefined,
    );
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(done, false, 'I1: not acknowledged without the in-sync member n3');
    assert.equal((await readBytes(volumes[2]!, 0, 4096))[0], 0, 'n3 got nothing over a refused link');
    const status = shells[0]!.status()[0] as { links: Record<string, { outbound: string }> };
    assert.equal(status.links.n3?.outbound, 'down');
    for (const shell of shells) await shell.close();
    await write; // failed by the close (NBD_SHUTDOWN)
    assert.equal(done, false);
  } finally {
    for (const shell of shells) await shell.close();
  }
});

test('the cluster secret file must hold at least 16 characters', (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'node-replication-'));
  t.after(() => fs.rmSync(root, { recursive: true, force: true }));
  const file = path.join(root, 'cluster.secret');
  fs.writeFileSync(file, 'short\n', { mode: 0o600 });
  assert.throws(() => readClusterSecret(file, createLogger({ level: 'error' })), /shorter than 16/);
  fs.writeFileSync(file, `${SECRET.toString()}\n`, { mode: 0o600 });
  assert.deepEqual(readClusterSecret(file, createLogger({ level: 'error' })), SECRET);
});
