// Proves that the mirrorsan command refuses bad input with one clear line and its error code, that `status` reads a running node, and that a second process on a node's data directory is refused.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { CLI_PATH, makeTempDir, removeDir, run, startUp, testServerKind, type UpCluster } from './helpers/index.js';

const mirrorsan = (args: string[]) => run(process.execPath, [CLI_PATH, ...args], { timeoutMs: 30_000 });

describe('mirrorsan command line', { skip: testServerKind() !== 'mirrorsan' }, () => {
  let dir: string;
  before(async () => {
    dir = await makeTempDir('mirrorsan-cli-');
  });
  after(async () => {
    await removeDir(dir);
  });

  const refusals: [string, string[], RegExp][] = [
    ['an unparsable size', ['up', '--dir', 'D', '--size', '12XB'], /cannot parse size "12XB".*\(SIZE_INVALID\)/],
    ['a size that is not a multiple of 4096', ['up', '--dir', 'D', '--size', '1050000'], /multiple of 4096.*\(CONFIG_INVALID\)/],
    ['a bad volume name', ['up', '--dir', 'D', '--volume', '../x'], /volume name.*\(CONFIG_INVALID\)/],
    ['more nodes than this version runs', ['up', '--dir', 'D', '--nodes', '6'], /--nodes 6.*\(CONFIG_INVALID\)/],
    ['a base port out of range', ['up', '--dir', 'D', '--base-port', '70000'], /--base-port.*\(CONFIG_INVALID\)/],
    ['a TLS key without a certificate', ['up', '--dir', 'D', '--tls-key', 'k.pem'], /--tls-cert and --tls-key go together.*\(CONFIG_INVALID\)/],
    ['a missing config file', ['node', '--config', '/nonexistent/node.json'], /cannot read config.*\(CONFIG_INVALID\)/],
  ];
  for (const [what, args, message] of refusals) {
    it(`refuses ${what} with exit code 1 and one line`, async () => {
      const result = await mirrorsan(args.map((arg) => (arg === 'D' ? `${dir}/data` : arg)));
      assert.equal(result.code, 1, result.stderr);
      assert.match(result.stderr, message);
      assert.equal(result.stderr.trim().split('\n').length, 1, `one line, got:\n${result.stderr}`);
    });
  }

  describe('against a running node', () => {
    let cluster: UpCluster;
    before(async () => {
      cluster = await startUp({ size: '16MiB' });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('status prints the volume table, and --json the raw status', async () => {
      const admin = cluster.nodes[0]!.admin;
      const table = await mirrorsan(['status', '--admin', admin]);
      assert.equal(table.code, 0, table.stderr);
      assert.match(table.stdout, /^node n1 {2}epoch 0$/m);
      assert.match(table.stdout, new RegExp(`^${cluster.volume}\\s+16MiB\\s+n1\\s`, 'm'));
      const json = await mirrorsan(['status', '--admin', admin, '--json']);
      const status = JSON.parse(json.stdout) as { volumes: { name: string; sizeBytes: number }[] };
      assert.equal(status.volumes[0]?.sizeBytes, 16 * 1024 * 1024);
    });

    it('status against nothing listening fails with a clear error', async () => {
      const result = await mirrorsan(['status', '--admin', 'http://127.0.0.1:1']);
      assert.equal(result.code, 1);
      assert.match(result.stderr, /cannot read status from http:\/\/127\.0\.0\.1:1\/v1\/status/);
    });

    it('a second node process on the same data directory is refused', async () => {
      const result = await mirrorsan(['node', '--config', cluster.nodes[0]!.config]);
      assert.equal(result.code, 1, result.stderr);
      assert.match(result.stderr, /another node process \(pid \d+\) is running/);
    });
  });
});
