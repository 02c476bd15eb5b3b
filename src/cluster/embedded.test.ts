// Proves the embedded coordinator (a directory shared by the nodes of one host) against the
// coordinator conformance suite, plus what only a file-based backend can get wrong.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rename, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { runCoordinatorConformance } from './conformance.js';
import { EmbeddedCoordinator, RECORD_HISTORY } from './embedded.js';
import { parseCoordinatorUrl } from './index.js';
import type { LeaseLostReason } from './coordinator.js';

const scratch: string[] = [];
async function freshDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-coord-'));
  scratch.push(dir);
  return join(dir, 'coordinator');
}
after(async () => {
  for (const dir of scratch) await rm(dir, { recursive: true, force: true });
});

runCoordinatorConformance('embedded', {
  leaseTtlMs: 1000,
  setUp: async () => {},
  tearDown: async () => {},
  freshUrl: async () => `embedded://${await freshDir()}`,
  disrupt: async (url) => {
    const { dir } = parseCoordinatorUrl(url) as { dir: string };
    await rename(dir, `${dir}.away`);
  },
  restore: async (url) => {
    const { dir } = parseCoordinatorUrl(url) as { dir: string };
    await rename(`${dir}.away`, dir);
  },
});

describe('embedded coordinator: file-level behaviour', () => {
  const endpoint = { host: '127.0.0.1', port: 1 };
  const registration = (id: string) => ({ id, nbd: endpoint, peer: endpoint, admin: endpoint });

  test('removing a node\'s registration directory ends its session at the next renewal', async () => {
    const dir = await freshDir();
    const coordinator = await EmbeddedCoordinator.open({ dir });
    try {
      const session = await coordinator.registerNode(registration('n1'), { leaseTtlMs: 1500 });
      const lost = new Promise<LeaseLostReason>((resolve) => session.onLost(resolve));
      const removedMs = Date.now();
      await rm(join(dir, 'nodes', 'n1'), { recursive: true });
      assert.equal(await lost, 'rejected');
      assert.ok(Date.now() - removedMs < 1000, 'noticed at the next renewal, not at expiry');
    } finally {
      await coordinator.close();
    }
  });

  test('lease and record chains stay bounded', async () => {
    const dir = await freshDir();
    const coordinator = await EmbeddedCoordinator.open({ dir });
    try {
      const session = await coordinator.registerNode(registration('n1'), { leaseTtlMs: 600 }); // renews every 200 ms
      await coordinator.putVolumeSpec(
        { name: 'v', sizeBytes: 1 << 20, replicas: 1, mode: 'sync', strict: false, regionSizeBytes: 1 << 20 },
        { createOnly: true },
      );
      const record = (epoch: number) => ({ epoch, replicas: ['n1'], inSync: ['n1'], updatedAtMs: epoch });
      assert.deepEqual(await coordinator.casVolumeRecord('v', null, record(1)), { ok: true });
      for (let epoch = 1; epoch < RECORD_HISTORY + 20; epoch++) {
        assert.deepEqual(await coordinator.casVolumeRecord('v', epoch, record(epoch + 1)), { ok: true });
      }
      await new Promise((resolve) => setTimeout(resolve, 2000)); // ≥ 10 renewals
      assert.ok(session.isValid());
      await coordinator.close(); // resolves once nothing touches the directory
      const [incarnation] = await readdir(join(dir, 'incarnations'));
      assert.ok(incarnation);
      assert.equal((await readdir(join(dir, 'incarnations', incarnation, 'records'))).length, RECORD_HISTORY);
      assert.ok((await readdir(join(dir, 'nodes', 'n1'))).length <= 8);
      assert.deepEqual(await readdir(join(dir, 'tmp')), [], 'no temporary file is left behind');
    } finally {
      await coordinator.close();
    }
  });

  test('open() removes temporary files that a killed writer left behind, but not fresh ones', async () => {
    const dir = await freshDir();
    (await EmbeddedCoordinator.open({ dir })).close();
    await writeFile(join(dir, 'tmp', 'old.json'), '{');
    await writeFile(join(dir, 'tmp', 'new.json'), '{');
    const hourAgo = new Date(Date.now() - 3600_000);
    await utimes(join(dir, 'tmp', 'old.json'), hourAgo, hourAgo);
    const coordinator = await EmbeddedCoordinator.open({ dir });
    await coordinator.close();
    assert.deepEqual(await readdir(join(dir, 'tmp')), ['new.json']);
  });
});

describe('coordinator URLs', () => {
  test('embedded and etcd URLs parse; anything else is refused', () => {
    assert.deepEqual(parseCoordinatorUrl('embedded:///var/lib/mirrorsan/coordinator'), { backend: 'embedded', dir: '/var/lib/mirrorsan/coordinator' });
    assert.deepEqual(parseCoordinatorUrl('embedded:///tmp/a%20b'), { backend: 'embedded', dir: '/tmp/a b' });
    assert.deepEqual(parseCoordinatorUrl('etcd://10.0.0.1:2379,10.0.0.2:2379/prod'), {
      backend: 'etcd',
      hosts: ['10.0.0.1:2379', '10.0.0.2:2379'],
      clusterId: 'prod',
    });
    assert.deepEqual(parseCoordinatorUrl('etcd://localhost:2379'), { backend: 'etcd', hosts: ['localhost:2379'], clusterId: 'default' });
    for (const bad of ['embedded://relative', 'embedded:///', 'etcd://host', 'etcd://h:99999', 'etcd://h:1/a/b', 'etcd://h:1/..', 'zk://h:1']) {
      assert.throws(() => parseCoordinatorUrl(bad), /CONFIG_INVALID|coordinator URL/, bad);
    }
  });
});
