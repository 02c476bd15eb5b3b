// Proves issue 5's end-to-end failover on a 3-node cluster: fio with crc32c verify through `mirrorsan attach` rides through a SIGKILL of the node it is connected to (attach replays the unanswered requests on the next node), the survivors remove the dead node and go on, the killed node restarts, catches up and rejoins the in-sync set, and at quiescence the three image files are byte-identical.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { CLI_PATH, ManagedProcess, fioNbd, sha256File, startUp, testServerKind, waitUntil } from './helpers/index.js';

const MiB = 1024 * 1024;

test('fio through attach survives a SIGKILL of its node; the node catches up and the replicas end identical', { skip: testServerKind() !== 'mirrorsan', timeout: 120_000 }, async (t) => {
  const cluster = await startUp({ nodes: 3, size: '32MiB', extraArgs: ['--lease-ttl', '2000', '--failure-timeout', '500'] });
  t.after(() => cluster.stop());
  const status = async (index: number): Promise<{ inSync: string[]; fence: string | null; replicaState: string }> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    return ((await response.json()) as { replicatedVolumes: { inSync: string[]; fence: string | null; replicaState: string }[] }).replicatedVolumes[0]!;
  };
  await waitUntil(async () => (await Promise.all([0, 1, 2].map(status))).every((view) => view.inSync.length === 3 && view.fence === null), { timeoutMs: 15_000, what: 'the cluster to settle' });

  const socketPath = path.join(cluster.workDir, 'attach.sock');
  const attach = new ManagedProcess(process.execPath, [
    CLI_PATH, 'attach', cluster.volume, '--listen', `unix:${socketPath}`,
    '--nodes', cluster.nodes.map((node) => node.nbd).join(','), '--failover-timeout', '30s', '--json',
  ]);
  t.after(() => attach.stop('SIGKILL'));
  const ready = JSON.parse(await attach.waitForLine((line) => line.startsWith('{'), { what: 'the attach ready line' })) as { nbd: string };

  // ~2048 verified writes at 1000 per second: n1 (attach's node) dies about a quarter in.
  const fio = fioNbd(
    ready.nbd,
    ['--name=failover', '--rw=randwrite', '--bs=4k', '--size=8M', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--rate_iops=5000,1000'],
    { cwd: cluster.workDir, timeoutMs: 90_000 },
  );
  fio.catch(() => {}); // awaited below
  await new Promise((resolve) => setTimeout(resolve, 500));
  await cluster.kill(0);
  const report = await fio;
  const job = report.jobs[0]!;
  assert.equal(job.error, 0);
  assert.equal(job.write.io_bytes, 8 * MiB, 'every write completed');
  assert.equal(job.read.io_bytes, 8 * MiB, 'every block was read back and verified');
  const failover = attach.stderr.split('\n').find((line) => / failover /.test(line));
  assert.ok(failover, attach.stderr);
  t.diagnostic(`attach: ${failover.replace(/^.*failover/, 'failover')}`);
  assert.ok(!(await status(1)).inSync.includes('n1'), 'the survivors removed n1');

  // n1 comes back, catches up, and serves again.
  await cluster.restart(0);
  await waitUntil(async () => (await status(0)).replicaState === 'in-sync' && (await status(0)).fence === null, { timeoutMs: 30_000, what: 'n1 back in sync' });
  await fioNbd(cluster.nodes[0]!.nbd, ['--name=failover', '--rw=randwrite', '--bs=4k', '--size=8M', '--verify=crc32c', '--verify_only=1', '--randrepeat=1'], { cwd: cluster.workDir });

  // Quiescence: the three images are the same bytes.
  await attach.stop('SIGTERM');
  for (let index = 0; index < 3; index++) {
    const exit = await cluster.terminate(index);
    assert.equal(exit.forced, false, `node ${index + 1} stopped on SIGTERM`);
  }
  const images = await Promise.all(['n1', 'n2', 'n3'].map((id) => sha256File(path.join(cluster.dir, id, 'volumes', cluster.volume, 'volume.img'), 32 * MiB)));
  assert.deepEqual(images, [images[0], images[0], images[0]], 'byte-identical replicas');
});
