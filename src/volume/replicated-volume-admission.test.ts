// Proves the admission fence of a replicated volume (issue 5, epoch fencing of replayed writes): a client write that waits for its grant is executed when the grant comes only if the node served throughout; if the node was fenced when the grant came, or was fenced at any moment while the write waited (a lease lost and regained), the write is refused as "not serving on this node" and no replica ever holds its bytes.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isMirrorsanError } from '../errors.js';
import { createLogger } from '../util/log.js';
import { LOOP_NODES, Loop, openLoopCluster, readBytes, withTimeout } from './replica-loop.js';
import { ReplicatedVolume } from './replicated-volume.js';

const SIZE_BYTES = 1024 * 1024;
const NODES = LOOP_NODES;

function openCluster(root: string): Promise<Loop> {
  return openLoopCluster(root, SIZE_BYTES);
}

/**
 * n3 writes while cut off from the arbiter n1, so its write waits for the grant; `meanwhile`
 * runs while it waits; then the link heals and the grant comes. Returns the write's outcome.
 */
async function writeWaitingForGrant(
  t: TestContext,
  meanwhile: (n3: ReplicatedVolume) => void,
  after: (n3: ReplicatedVolume) => void = () => {},
): Promise<{ outcome: PromiseSettledResult<void>; replicas: Buffer[]; loop: Loop }> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'replicated-admission-'));
  const loop = await openCluster(root);
  t.after(async () => {
    await loop.close();
    fs.rmSync(root, { recursive: true, force: true });
  });
  const n3 = loop.volumes.get('n3')!;
  const data = Buffer.alloc(8192, 0x5a);
  loop.sever('n3', 'n1');
  const write = n3.write(0, data, { fua: false });
  const settled = withTimeout(Promise.allSettled([write]), 10_000, 'the waiting write').then(([outcome]) => outcome!);
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal((n3.status() as { policing: { waitingWrites: number } }).policing.waitingWrites, 1, 'the write waits for its grant');
  meanwhile(n3);
  loop.heal('n3', 'n1');
  const outcome = await settled;
  after(n3);
  const replicas: Buffer[] = [];
  for (const node of NODES) replicas.push(await readBytes(loop.volumes.get(node)!, 0, data.length));
  return { outcome, replicas, loop };
}

test('control: a write that waited for its grant on a node that served throughout is executed on every replica', async (t) => {
  const { outcome, replicas } = await writeWaitingForGrant(t, () => {});
  assert.equal(outcome.status, 'fulfilled');
  for (const replica of replicas) assert.deepEqual(replica, Buffer.alloc(8192, 0x5a));
});

test('a write whose node was fenced for a moment while it waited for its grant is refused at admission, never executed', async (t) => {
  const { outcome, replicas, loop } = await writeWaitingForGrant(t, (n3) => {
    // The lease ran out and came back (SIGSTOP past the TTL, then SIGCONT and a new lease):
    // meanwhile the others may have removed n3 and a client replayed the write elsewhere.
    n3.setFence('lease lost: test');
    n3.setFence(undefined);
  });
  assert.equal(outcome.status, 'rejected');
  const error = (outcome as PromiseRejectedResult).reason as unknown;
  assert.ok(isMirrorsanError(error, 'NBD_EIO'), String(error));
  assert.match(error.message, /not serving on this node: it stopped serving while this write waited for its grant/);
  for (const replica of replicas) assert.deepEqual(replica, Buffer.alloc(8192), 'no replica holds the refused write');
  // The node serves again: a new write goes through (the grant it got is in use at once).
  await withTimeout(loop.volumes.get('n3')!.write(0, Buffer.alloc(4096, 0x77), { fua: false }), 5000, 'a new write through n3');
  assert.deepEqual(await readBytes(loop.volumes.get('n1')!, 0, 4096), Buffer.alloc(4096, 0x77));
});

test('a write whose grant arrives while its node is fenced is refused at admission, never executed', async (t) => {
  const { outcome, replicas } = await writeWaitingForGrant(
    t,
    (n3) => n3.setFence('no majority: test'),
    (n3) => n3.setFence(undefined), // to read its image below
  );
  assert.equal(outcome.status, 'rejected');
  const error = (outcome as PromiseRejectedResult).reason as unknown;
  assert.ok(isMirrorsanError(error, 'NBD_EIO'), String(error));
  assert.match(error.message, /not serving on this node: no majority: test/);
  for (const replica of replicas) assert.deepEqual(replica, Buffer.alloc(8192), 'no replica holds the refused write');
});
