// Proves that `mirrorsan volume create|list|delete` changes a running cluster: a created volume becomes an NBD export that real clients write and read, a deleted one disappears with its data, and bad requests get one clear error.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { CLI_PATH, run, runOk, startUp, testServerKind, waitUntil, type UpCluster } from './helpers/index.js';

describe('volume management on a running cluster', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const mirrorsan = (...args: string[]) => run(process.execPath, [CLI_PATH, ...args, '--dir', cluster.dir], { timeoutMs: 30_000 });
  /** The export names, or undefined while the list is changing (nbdinfo lists, then opens each export). */
  const exportsOf = async (): Promise<string[] | undefined> => {
    const port = new URL(cluster.nodes[0]!.nbd).port;
    const list = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${port}`]);
    if (list.code !== 0) return undefined;
    return (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((entry) => entry['export-name']).sort();
  };

  before(async () => {
    cluster = await startUp({ size: '16MiB' });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('the ready line names the volume `up` created', () => {
    assert.ok(cluster.nodes[0]!.nbd.endsWith(`/${cluster.volume}`), cluster.nodes[0]!.nbd);
  });

  it('create: the new volume is exported within seconds and holds data', async () => {
    const created = await mirrorsan('volume', 'create', 'extra', '--size', '8MiB');
    assert.equal(created.code, 0, created.stderr);
    assert.match(created.stdout, /created volume extra \(8MiB, sync\)/);
    await waitUntil(async () => (await exportsOf())?.includes('extra') === true, { timeoutMs: 10_000, what: 'the export of volume extra' });
    const uri = cluster.nodes[0]!.nbd.replace(/\/[^/]*$/, '/extra');
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 1M', '-c', 'read -P 0x3c 0 1M', uri]);
    const info = await runOk('nbdinfo', ['--size', uri]);
    assert.equal(info.stdout.trim(), String(8 * 1024 * 1024));
  });

  it('list shows every volume, as a table and as JSON', async () => {
    const table = await mirrorsan('volume', 'list');
    assert.match(table.stdout, /^extra\s+8MiB\s+1\s+sync\s+no$/m);
    assert.match(table.stdout, new RegExp(`^${cluster.volume}\\s+16MiB\\s`, 'm'));
    const json = JSON.parse((await mirrorsan('volume', 'list', '--json')).stdout) as { name: string }[];
    assert.deepEqual(json.map((spec) => spec.name).sort(), [cluster.volume, 'extra'].sort());
  });

  it('bad requests are refused with one line and a code', async () => {
    const cases: [string[], RegExp][] = [
      [['volume', 'create', 'extra', '--size', '8MiB'], /volume extra already exists \(CONFIG_INVALID\)/],
      [['volume', 'create', 'x', '--size', '8MiB', '--replicas', '3'], /--replicas 3: only 1 live node.*\(CONFIG_INVALID\)/],
      [['volume', 'create', 'x', '--size', 'big'], /cannot parse size "big".*\(SIZE_INVALID\)/],
      [['volume', 'create', 'x', '--size', '8MiB', '--mode', 'eventual'], /--mode must be sync or async.*\(CONFIG_INVALID\)/],
      [['volume', 'delete', 'missing'], /no volume named missing \(VOLUME_NOT_FOUND\)/],
    ];
    for (const [args, message] of cases) {
      const result = await mirrorsan(...args);
      assert.equal(result.code, 1, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, message);
      assert.equal(result.stderr.trim().split('\n').length, 1, result.stderr);
    }
  });

  it('delete: the export disappears and its data is removed; the other volume keeps serving', async () => {
    const deleted = await mirrorsan('volume', 'delete', 'extra');
    assert.equal(deleted.code, 0, deleted.stderr);
    await waitUntil(async () => (await exportsOf())?.includes('extra') === false, { timeoutMs: 10_000, what: 'the export of extra to go' });
    await waitUntil(() => !fs.existsSync(path.join(cluster.dir, 'n1', 'volumes', 'extra')), { timeoutMs: 10_000, what: 'the data of extra to go' });
    assert.deepEqual(await exportsOf(), [cluster.volume]);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'read -P 0x11 0 64k', cluster.nodes[0]!.nbd]);
  });
});
