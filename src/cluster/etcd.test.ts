// Proves the etcd coordinator against the coordinator conformance suite on a real etcd
// (Debian's etcd-server, loopback, temporary directory, killed to test loss), and that over a
// three-member cluster it rides out the crash of the leader without losing leases or CAS.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import { createLogger } from '../util/log.js';
import type { LogLevel } from '../util/log.js';
import { runCoordinatorConformance } from './conformance.js';
import type { LeaseLostReason, VolumeRecord } from './coordinator.js';
import { EtcdCluster } from './etcd-process.js';
import { createCoordinator } from './index.js';

const single = new EtcdCluster(1);
let clusters = 0;

runCoordinatorConformance('etcd', {
  leaseTtlMs: 1000,
  setUp: () => single.start(),
  tearDown: () => single.stop(),
  // Every test gets its own key prefix on the one server.
  freshUrl: async () => `etcd://${single.endpoints.join(',')}/t${++clusters}-${randomBytes(4).toString('hex')}`,
  disrupt: () => single.kill(0),
  restore: () => single.restart(0),
});

describe('etcd coordinator over a three-member cluster', () => {
  const cluster = new EtcdCluster(3);
  before(() => cluster.start());
  after(() => cluster.stop());

  test('the crash of the leader costs no lease and no CAS; the coordinator fails over', async () => {
    const logger = createLogger({ level: (process.env.MIRRORSAN_LOG_LEVEL ?? 'error') as LogLevel });
    const url = `etcd://${cluster.endpoints.join(',')}/failover`;
    const coordinator = await createCoordinator(url, { logger });
    try {
      const endpoint = { host: '127.0.0.1', port: 1 };
      // 2 s: room for one election (500 ms timeout) between two renewals.
      const session = await coordinator.registerNode({ id: 'n1', nbd: endpoint, peer: endpoint, admin: endpoint }, { leaseTtlMs: 2000 });
      const lost: LeaseLostReason[] = [];
      session.onLost((reason) => lost.push(reason));
      await coordinator.putVolumeSpec(
        { name: 'v', sizeBytes: 1 << 20, replicas: 1, mode: 'sync', strict: false, regionSizeBytes: 1 << 20 },
        { createOnly: true },
      );
      const record = (epoch: number): VolumeRecord => ({ epoch, replicas: ['n1'], inSync: ['n1'], updatedAtMs: epoch });
      assert.deepEqual(await coordinator.casVolumeRecord('v', null, record(1)), { ok: true });

      const leader = await cluster.leaderIndex();
      await cluster.kill(leader);
      // Keep advancing the epoch through the election. A call that fails is "outcome unknown":
      // re-read, as the membership logic will.
      let epoch = 1;
      let unknownOutcomes = 0;
      const untilMs = Date.now() + 3000;
      while (Date.now() < untilMs) {
        try {
          const result = await coordinator.casVolumeRecord('v', epoch, record(epoch + 1));
          if (result.ok) epoch += 1;
          else epoch = result.current?.epoch ?? assert.fail('the record vanished');
        } catch (error) {
          assert.ok(isMirrorsanError(error, 'COORD_UNAVAILABLE'), String(error));
          unknownOutcomes += 1;
          epoch = (await coordinator.getVolumeRecord('v').catch(() => undefined))?.epoch ?? epoch;
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
      }
      assert.ok(epoch > 20, `the epoch advanced during the failover (to ${epoch}, ${unknownOutcomes} unknown outcomes)`);
      assert.equal((await coordinator.getVolumeRecord('v'))?.epoch, epoch);
      assert.deepEqual(lost, [], 'the lease survived the election');
      assert.ok(session.isValid());
      assert.deepEqual((await coordinator.liveNodes()).map((n) => n.leaseId), [session.leaseId]);
      await cluster.restart(leader);
    } finally {
      await coordinator.close();
    }
  });
});
