// Proves `mirrorsan status` (the CLI, on a real 3-node cluster) shows a returning replica's catch-up while it runs: a node killed while 8 MiB were written elsewhere restarts with its catch-up throttled to 1 MiB/s (node config catchUpRateBytesPerSec), and its status prints the CATCHING UP line with percent compared, bytes compared and copied, rate and ETA, the percent growing between samples; once the replica is back in sync the line is gone and the REPLICAS column says in-sync.
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { test } from 'node:test';
import { CLI_PATH, randomData, runOk, startUp, testServerKind, waitUntil, withServerLog } from './helpers/index.js';
import { NbdClient } from '../src/nbd/client.js';

const MiB = 1024 * 1024;
/** `vol0: n3 is CATCHING UP (copying): 37.5% compared (3.0MiB of 8.0MiB), 3.0MiB copied, 1.0MiB/s, ETA 5 s` */
const CATCHING_UP_LINE = /^(\S+): (\S+) is CATCHING UP \((\w[\w-]*)\): ([\d.]+)% compared \((\S+) of (\S+)\), (\S+) copied, (\S+)\/s, ETA (\d+ s|unknown)/m;

interface ReplicatedStatus {
  inSync: string[];
  fence: string | null;
  replicaState: string;
}

let serverLog = (): string => '';

test('mirrorsan status shows the CATCHING UP line (percent, bytes, rate, ETA) while a replica catches up, and drops it once in sync', { skip: testServerKind() !== 'mirrorsan', timeout: 90_000 }, withServerLog(() => serverLog(), async (t) => {
  // 64 KiB regions: catch-up compares 16 chunks of one region each per batch, and its progress
  // moves once per batch, so 8 MiB to copy at 1 MiB/s show 8 steps of about a second.
  const cluster = await startUp({ nodes: 3, size: '32MiB', extraArgs: ['--lease-ttl', '2000', '--failure-timeout', '500', '--region-size', '64KiB'] });
  t.after(() => cluster.stop());
  serverLog = () => cluster.stderr;
  const status = async (index: number): Promise<ReplicatedStatus> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    return ((await response.json()) as { replicatedVolumes: ReplicatedStatus[] }).replicatedVolumes[0]!;
  };
  await waitUntil(async () => (await Promise.all([0, 1, 2].map(status))).every((view) => view.inSync.length === 3 && view.fence === null), { timeoutMs: 15_000, what: 'the cluster to settle' });

  // n3 dies; 8 MiB (128 regions) are written through n1 while it is out of the in-sync set.
  await cluster.kill(2);
  await waitUntil(async () => !(await status(0)).inSync.includes('n3'), { timeoutMs: 15_000, what: 'n3 to leave the in-sync set' });
  const client = await NbdClient.connect({ host: '127.0.0.1', port: cluster.nbdPort(0) }, { exportName: cluster.volume });
  for (let offset = 0; offset < 8 * MiB; offset += MiB) await client.write(offset, randomData(MiB));
  await client.flush();
  client.close();

  // n3 comes back with its catch-up throttled to 1 MiB/s: about 8 s of copying.
  const configPath = cluster.nodes[2]!.config;
  const config = JSON.parse(await readFile(configPath, 'utf8')) as Record<string, unknown>;
  await writeFile(configPath, JSON.stringify({ ...config, catchUpRateBytesPerSec: MiB }, null, 2));
  await cluster.restart(2);
  const admin = cluster.nodes[2]!.admin;

  const samples: { percent: number; line: string }[] = [];
  let lastOutput = '';
  await waitUntil(async () => {
    const { stdout } = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', admin]);
    lastOutput = stdout;
    const match = CATCHING_UP_LINE.exec(stdout);
    if (match) {
      const [line, volume, node, , percent, compared, total, copied, rate, eta] = match;
      assert.equal(volume, cluster.volume);
      assert.equal(node, 'n3');
      assert.ok(Number(percent) >= 0 && Number(percent) <= 100, line);
      for (const size of [compared!, total!, copied!, rate!]) assert.match(size, /^\d+(\.\d)?(B|KiB|MiB|GiB)$/, `a size in ${line}`);
      assert.match(eta!, /^(\d+ s|unknown)$/);
      samples.push({ percent: Number(percent), line: line! });
    }
    // Enough to see progress: the line part-way, with a rate and an ETA, at two percents.
    const underWay = samples.filter((sample) => sample.percent > 0 && sample.percent < 100 && /, [1-9][\d.]*\S*\/s, ETA [1-9]\d* s/.test(sample.line));
    return underWay.length >= 2 && underWay[0]!.percent < underWay.at(-1)!.percent;
  }, { timeoutMs: 30_000, intervalMs: 200, what: 'the CATCHING UP line part-way, with a rate and an ETA, at two percents' }).catch((error: Error) => {
    error.message += `; lines seen:\n${samples.map((sample) => sample.line).join('\n')}\nlast output:\n${lastOutput}`;
    throw error;
  });
  t.diagnostic(`${samples.length} samples: ${samples.map((sample) => sample.percent).join('% ')}%`);
  t.diagnostic(`e.g. ${samples.find((sample) => sample.percent > 0 && sample.percent < 100)!.line}`);
  for (let i = 1; i < samples.length; i++) assert.ok(samples[i]!.percent >= samples[i - 1]!.percent, `the percent never goes back: ${samples.map((sample) => sample.percent).join(' ')}`);

  // In sync again: no CATCHING UP line; the REPLICAS column says so.
  await waitUntil(async () => (await status(2)).replicaState === 'in-sync' && (await status(2)).fence === null, { timeoutMs: 30_000, what: 'n3 back in sync' });
  const { stdout } = await runOk(process.execPath, [CLI_PATH, 'status', '--admin', admin]);
  assert.doesNotMatch(stdout, /CATCHING UP/);
  assert.match(stdout, /n3:in-sync/);
}));
