// Proves, on 3 real node processes, that fio's verified random writes through node 2 succeed while another fio reads through node 3, and that a 256 MiB random image copied in through node 1 reads back identical through nodes 2 and 3, with byte-identical image files after a clean stop.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fioNbd, randomData, runOk, sha256, sha256File, startUp, testServerKind, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';
import { writeFile } from 'node:fs/promises';

const MiB = 1024 * 1024;

describe('3 nodes under load', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';
  const uri = (index: number): string => cluster.nodes[index]!.nbd;

  before(async () => {
    cluster = await startUp({ nodes: 3, size: '256MiB' });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('fio writes with crc32c verify through n2 while another fio reads through n3', withServerLog(log, async () => {
    const [writer, reader] = await Promise.all([
      fioNbd(uri(1), ['--name=writer', '--rw=randwrite', '--bs=4k', '--size=16M', '--iodepth=16', '--verify=crc32c', '--do_verify=1'], { cwd: cluster.workDir }),
      fioNbd(uri(2), ['--name=reader', '--rw=randread', '--bs=4k', '--size=256M', '--iodepth=16', '--time_based', '--runtime=4'], { cwd: cluster.workDir }),
    ]);
    assert.equal(writer.jobs[0]!.write.io_bytes, 16 * MiB, 'every write completed');
    assert.equal(writer.jobs[0]!.read.io_bytes, 16 * MiB, 'every written block was read back and verified');
    assert.ok(reader.jobs[0]!.read.io_bytes > 0, 'the reader made progress meanwhile');
  }));

  it('nbdcopy of a 256 MiB random image in through n1 reads back identical through n2 and n3', withServerLog(log, async () => {
    const image = randomData(256 * MiB);
    const imagePath = path.join(cluster.workDir, 'random.img');
    await writeFile(imagePath, image);
    await runOk('nbdcopy', ['--flush', imagePath, uri(0)], { timeoutMs: 120_000 });
    for (const index of [1, 2]) {
      const copyPath = path.join(cluster.workDir, `out-n${index + 1}.img`);
      await runOk('nbdcopy', [uri(index), copyPath], { timeoutMs: 120_000 });
      assert.equal(await sha256File(copyPath), sha256(image), `n${index + 1} returns the image`);
    }
  }));

  it('after a clean stop the three image files are byte-identical', withServerLog(log, async () => {
    for (let index = 0; index < 3; index++) {
      const exit = await cluster.terminate(index);
      assert.equal(exit.forced, false, `node ${index + 1} stopped on SIGTERM`);
    }
    const sums = await Promise.all(['n1', 'n2', 'n3'].map((id) => sha256File(path.join(cluster.dir, id, 'volumes', cluster.volume, 'volume.img'))));
    assert.equal(new Set(sums).size, 1, sums.join(' '));
  }));
});
