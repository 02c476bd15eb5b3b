// Proves the membership shell in one process over real TCP and a real embedded coordinator: volumes serve only once their node holds a lease and has rejoined under it (epoch + 1), a member whose links are down and whose lease is gone is removed by CAS (epoch + 1, inSync without it) so a write pending on it completes, and a node whose lease ends refuses I/O at once and serves again only after rejoining under a new lease.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createCoordinator, type Coordinator, type NodeSession, type VolumeRecord, type VolumeSpec } from '../cluster/index.js';
import { createLogger } from '../util/log.js';
import type { ReplicatedVolume } from '../volume/replicated-volume.js';
import { NodeReplication } from './replication.js';

const SIZE_BYTES = 4 * 1024 * 1024;
const SECRET = Buffer.from('0123456789abcdef0123456789abcdef');
const SPEC: VolumeSpec = { name: 'vol', sizeBytes: SIZE_BYTES, replicas: 3, mode: 'sync', strict: false, regionSizeBytes: 1024 * 1024 };
const FAILURE_TIMEOUT_MS = 200;
/** Long enough that a loaded machine never loses a lease by accident (the test revokes them itself). */
const LEASE_TTL_MS = 5000;

function withTimeout<T>(promise: Promise<T>, what: string, ms = 10_000): Promise<T> {
  return Promise.race([promise, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: not done in ${ms} ms`)), ms).unref())]);
}

async function waitFor(probe: () => boolean | Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

test('lease, rejoin, removal of a dead member and self-fencing', async (t) => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'node-membership-'));
  const logger = createLogger({ level: 'error' });
  const coordinators: Coordinator[] = [];
  const shells: NodeReplication[] = [];
  t.after(async () => {
    for (const shell of shells) await shell.close();
    for (const coordinator of coordinators) await coordinator.close();
    fs.rmSync(root, { recursive: true, force: true });
  });
  const url = `embedded://${path.join(root, 'coordinator')}`;
  const admin = await createCoordinator(url, { logger });
  coordinators.push(admin);
  await admin.putVolumeSpec(SPEC, { createOnly: true });
  const first: VolumeRecord = { epoch: 1, replicas: ['n1', 'n2', 'n3'], inSync: ['n1', 'n2', 'n3'], arbiter: 'n1', updatedAtMs: Date.now() };
  assert.deepEqual(await admin.casVolumeRecord('vol', null, first), { ok: true });

  // Each node: its own coordinator client (as separate processes would have), a shell, the volume.
  const volumes: ReplicatedVolume[] = [];
  const clients: Coordinator[] = [];
  for (const self of ['n1', 'n2', 'n3']) {
    const coordinator = await createCoordinator(url, { logger });
    coordinators.push(coordinator);
    clients.push(coordinator);
    const shell = new NodeReplication({
      self,
      clusterSecret: SECRET,
      peerEndpoint: { host: '127.0.0.1', port: 0 },
      logger: logger.child(self),
      timings: { reconnectMinMs: 20, reconnectMaxMs: 200 },
      failureTimeoutMs: FAILURE_TIMEOUT_MS,
    });
    await shell.listen();
    shell.watchPeers(coordinator);
    volumes.push(await shell.openVolume(SPEC, first, path.join(root, self), coordinator));
    shells.push(shell);
  }
  // Without a lease nothing is served.
  await assert.rejects(volumes[0]!.read(0, 4096), /no lease: n1 is not registered/);

  const register = (index: number): Promise<NodeSession> =>
    clients[index]!.registerNode({ id: `n${index + 1}`, nbd: { host: '127.0.0.1', port: 1 }, peer: shells[index]!.endpoint, admin: { host: '127.0.0.1', port: 1 } }, { leaseTtlMs: LEASE_TTL_MS });
  const sessions: NodeSession[] = [];
  for (let index = 0; index < 3; index++) {
    sessions.push(await register(index));
    await shells[index]!.setSession(sessions[index]);
  }
  const rejoined = (await admin.getVolumeRecord('vol'))!;
  assert.equal(rejoined.epoch, 4, 'each node rejoined under its lease: three epoch bumps');
  assert.deepEqual(rejoined.inSync, ['n1', 'n2', 'n3']);
  await waitFor(() => volumes.every((volume) => volume.epoch === 4 && volume.fenceReason === undefined), 'every volume to serve at epoch 4');
  await withTimeout(volumes[0]!.write(0, Buffer.alloc(4096, 0x11), { fua: true }), 'a write with every member in sync');

  // n3 dies: its lease is revoked (a clean stop) and its links go down with its shell.
  await sessions[2]!.revoke();
  await shells[2]!.close();
  await withTimeout(volumes[0]!.write(4096, Buffer.alloc(4096, 0x22), { fua: false }), 'a write through n1 once n3 is gone');
  const removed = (await admin.getVolumeRecord('vol'))!;
  assert.equal(removed.epoch, 5);
  assert.deepEqual(removed.inSync, ['n1', 'n2']);
  assert.equal(removed.arbiter, 'n1');
  await waitFor(() => volumes[1]!.epoch === 5, 'n2 to adopt epoch 5');
  assert.equal((await volumes[1]!.read(4096, 4096))[0]!.kind, 'data');
  const status = shells[0]!.status()[0] as { replicaStates: { node: string; state: string }[]; degraded: boolean };
  assert.deepEqual(status.replicaStates, [{ node: 'n1', state: 'in-sync' }, { node: 'n2', state: 'in-sync' }, { node: 'n3', state: 'out-of-sync' }]);
  assert.equal(status.degraded, true);

  // n1's lease ends: I/O is refused at once, before anything tells the shell.
  await sessions[0]!.revoke();
  await assert.rejects(volumes[0]!.read(0, 4096), /lease lost/);
  await shells[0]!.setSession(undefined);
  assert.match(volumes[0]!.fenceReason ?? '', /lease lost: n1 lost its coordinator lease/);
  // Registered again: n1 is still in sync (its links stayed up, so n2 did not remove it), so
  // it rejoins at a new epoch and serves again.
  sessions[0] = await register(0);
  await shells[0]!.setSession(sessions[0]);
  const back = (await admin.getVolumeRecord('vol'))!;
  assert.equal(back.epoch, 6);
  assert.deepEqual(back.inSync, ['n1', 'n2']);
  assert.equal(volumes[0]!.fenceReason, undefined);
  const bytes = (await volumes[0]!.read(4096, 4096))[0]!;
  assert.ok(bytes.kind === 'data' && bytes.data.every((byte) => byte === 0x22));
});
