// Proves that a volume whose write-ahead log is corrupt before its end is refused with JOURNAL_CORRUPT while the same node keeps serving its other volumes, with the failure visible in /v1/status.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { CLI_PATH, ManagedProcess, makeTempDir, pickBasePort, removeDir, runOk, testServerKind } from './helpers/index.js';

const MiB = 1024 * 1024;

function startNode(configPath: string): ManagedProcess {
  return new ManagedProcess(process.execPath, [CLI_PATH, 'node', '--config', configPath, '--json']);
}

describe('one corrupt volume does not take the node down', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let dir: string | undefined;
  const processes: ManagedProcess[] = [];
  after(async () => {
    for (const node of processes) if (node.running) await node.stop('SIGKILL');
    if (dir) await removeDir(dir);
  });

  it('serves the healthy volume and reports the corrupt one', async () => {
    dir = await makeTempDir('mirrorsan-isolation-');
    const base = await pickBasePort([0, 100, 200]);
    const configPath = path.join(dir, 'node.json');
    fs.writeFileSync(
      configPath,
      JSON.stringify({
        id: 'n1',
        dataDir: path.join(dir, 'n1'),
        nbd: { host: '127.0.0.1', port: base },
        peer: { host: '127.0.0.1', port: base + 100 },
        admin: { host: '127.0.0.1', port: base + 200 },
        volumes: [
          { name: 'broken', sizeBytes: 16 * MiB },
          { name: 'healthy', sizeBytes: 16 * MiB },
        ],
        checkpointIntervalMs: 600_000,
      }),
    );
    const uri = (name: string): string => `nbd://127.0.0.1:${base}/${name}`;
    const first = startNode(configPath);
    processes.push(first);
    await first.waitForLine((line) => line.startsWith('{"nodes"'), { what: 'the ready line' });
    // qemu-io writes with FUA by default: every entry is durable in the log before the kill.
    for (const [name, pattern] of [['broken', 0xa1], ['healthy', 0xb2]] as const) {
      const commands = [0, 1, 2, 3].flatMap((i) => ['-c', `write -P ${pattern + i} ${i * 4096} 4k`]);
      await runOk('qemu-io', ['-f', 'raw', ...commands, uri(name)]);
    }
    await first.stop('SIGKILL');

    // Flip one byte inside the payload of the first entry of the broken volume's log: a bad
    // entry followed by valid ones is corruption, never a torn tail to cut.
    const walDir = path.join(dir, 'n1', 'volumes', 'broken', 'wal');
    const segment = fs.readdirSync(walDir).sort().map((name) => path.join(walDir, name))[0]!;
    const bytes = fs.readFileSync(segment);
    const at = bytes.indexOf(Buffer.alloc(64, 0xa1));
    assert.ok(at > 0, 'the first write is in the log');
    bytes[at + 100] = bytes[at + 100]! ^ 0x01;
    fs.writeFileSync(segment, bytes);

    const second = startNode(configPath);
    processes.push(second);
    await second.waitForLine((line) => line.startsWith('{"nodes"'), { what: 'the ready line after restart' });
    assert.match(second.stderr, /volume failed to open; it is not exported code=JOURNAL_CORRUPT/);

    const list = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${base}`]);
    const exports = (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((entry) => entry['export-name']);
    assert.deepEqual(exports, ['healthy']);
    await runOk('qemu-io', ['-f', 'raw', '-r', ...[0, 1, 2, 3].flatMap((i) => ['-c', `read -P ${0xb2 + i} ${i * 4096} 4k`]), uri('healthy')]);

    const status = (await (await fetch(`http://127.0.0.1:${base + 200}/v1/status`)).json()) as {
      volumes: { name: string }[];
      failedVolumes: { name: string; code: string }[];
    };
    assert.deepEqual(status.volumes.map((volume) => volume.name), ['healthy']);
    assert.deepEqual(status.failedVolumes.map((volume) => [volume.name, volume.code]), [['broken', 'JOURNAL_CORRUPT']]);
    await second.stop('SIGTERM');
  });
});
