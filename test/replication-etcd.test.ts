// Proves that a 3-node cluster runs on a real etcd as its coordinator: `up --coordinator etcd://...` starts, every node serves the volume, and writes through one node read back through the others.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { EtcdCluster } from '../src/cluster/etcd-process.js';
import { runOk, startUp, testServerKind, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

describe('3 nodes on etcd', { skip: testServerKind() !== 'mirrorsan' }, () => {
  const etcd = new EtcdCluster(1);
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';

  before(async () => {
    await etcd.start();
    cluster = await startUp({ nodes: 3, size: '32MiB', extraArgs: ['--coordinator', `etcd://${etcd.endpoints.join(',')}/ci-${process.pid}`] });
  });
  after(async () => {
    await cluster?.stop();
    await etcd.stop();
  });

  it('every node reports the etcd coordinator and the volume with 3 replicas', withServerLog(log, async () => {
    for (const node of cluster.nodes) {
      const status = (await (await fetch(`${node.admin}/v1/status`)).json()) as {
        coordinator: { url: string } | null;
        replicatedVolumes: { name: string; replicas: string[] }[];
      };
      assert.match(status.coordinator?.url ?? '', /^etcd:\/\//);
      assert.deepEqual(status.replicatedVolumes.map((volume) => [volume.name, volume.replicas.length]), [[cluster.volume, 3]]);
    }
  }));

  it('writes through n1 and n3 read back through every node', withServerLog(log, async () => {
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6e 0 1M', cluster.nodes[0]!.nbd]);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6f 1M 1M', cluster.nodes[2]!.nbd]);
    for (const node of cluster.nodes) {
      const result = await runOk('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x6e 0 1M', '-c', 'read -P 0x6f 1M 1M', node.nbd]);
      assert.doesNotMatch(result.stdout, /Pattern verification failed/);
    }
  }));
});
