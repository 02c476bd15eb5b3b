// Proves that a node does not load the etcd client unless it uses etcd: its gRPC stack installs async hooks that halved 1 MiB NBD throughput in a node that merely imported it.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { test } from 'node:test';

test('the node and the CLI load no etcd or gRPC module at import time', async () => {
  await import('./node.js');
  await import('../cli/up-command.js');
  await import('../cli/volume-command.js');
  await import('../cluster/index.js');
  const loaded = Object.keys(createRequire(import.meta.url).cache).filter((file) => /[\\/](etcd3|@grpc)[\\/]/.test(file));
  assert.deepEqual(loaded, []);
});
