// Proves `mirrorsan attach` lets real NBD clients (fio, qemu-io, nbdinfo) ride through a SIGKILL and restart of the node: fio's verified random writes finish with exit 0, and attach logs one failover with its pause.
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { CLI_PATH, ManagedProcess, fioNbd, runOk, sleep, startUp, testServerKind } from './helpers/index.js';

test('fio through mirrorsan attach survives a SIGKILL and restart of the node', { timeout: 60_000 }, async (t) => {
  const cluster = await startUp({ size: '64MiB', persistent: true });
  t.after(() => cluster.stop());
  const socketPath = path.join(cluster.workDir, 'attach.sock');
  const attach = new ManagedProcess(process.execPath, [
    CLI_PATH,
    'attach',
    cluster.volume,
    '--listen',
    `unix:${socketPath}`,
    '--nodes',
    cluster.nodes.map((node) => node.nbd).join(','),
    '--failover-timeout',
    '20s',
    '--json',
  ]);
  t.after(() => attach.stop('SIGKILL'));
  const ready = JSON.parse(await attach.waitForLine((line) => line.startsWith('{'), { what: 'the attach ready line' })) as { listen: string; nbd: string };
  assert.deepEqual(ready, { listen: `unix:${socketPath}`, nbd: `nbd+unix:///${cluster.volume}?socket=${socketPath}` });

  // ~2048 writes at 1500 per second: the node dies about a third of the way in.
  const fio = fioNbd(
    ready.nbd,
    ['--name=attach', '--rw=randwrite', '--bs=4k', '--size=8M', '--iodepth=8', '--verify=crc32c', '--do_verify=1', '--rate_iops=5000,1500'],
    { cwd: cluster.workDir, timeoutMs: 45_000 },
  );
  fio.catch(() => {}); // awaited below; do not let an early rejection go unhandled
  await sleep(500);
  await cluster.kill(0);
  const killedAtMs = Date.now();
  await sleep(1_000);
  await cluster.restart(0);
  const restartedAfterMs = Date.now() - killedAtMs;
  const report = await fio;
  const job = report.jobs[0]!;
  assert.equal(job.error, 0);
  assert.equal(job.write.io_bytes, 8 * 1024 * 1024, 'every write completed');
  assert.equal(job.read.io_bytes, 8 * 1024 * 1024, 'every block was read back and verified');

  const failovers = attach.stderr.split('\n').filter((line) => / failover /.test(line));
  assert.equal(failovers.length, 1, attach.stderr);
  const pauseMs = Number(/pauseMs=(\d+)/.exec(failovers[0]!)?.[1]);
  assert.ok(pauseMs >= 1_000 && pauseMs < 20_000, `pause of ${pauseMs} ms`);
  t.diagnostic(`client-visible pause: ${pauseMs} ms (${/replayed=\d+/.exec(failovers[0]!)?.[0]}) for a node killed, restarted after 1 s and ready ${restartedAfterMs} ms after the kill`);

  // Other clients through the same endpoint, after the failover.
  const info = JSON.parse((await runOk('nbdinfo', ['--json', ready.nbd], { timeoutMs: 15_000 })).stdout) as { exports: Array<{ 'export-size': number }> };
  assert.equal(info.exports[0]?.['export-size'], cluster.sizeBytes);
  const qemu = await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 64k', '-c', 'read -P 0x5a 1M 64k', ready.nbd], { timeoutMs: 15_000 });
  assert.doesNotMatch(qemu.stdout + qemu.stderr, /Pattern verification failed|error/i);

  const exit = await attach.stop('SIGTERM');
  assert.equal(exit.code, 0, attach.stderr);
  if (testServerKind() === 'nbdkit') t.diagnostic('ran against nbdkit instead of mirrorsan');
});
