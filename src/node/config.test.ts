// Proves that node configs are validated once with clear CONFIG_INVALID errors, defaults filled in, and frozen.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import { parseNodeConfig, portsForNode } from './config.js';

const valid = {
  id: 'n1',
  dataDir: '/tmp/x/n1',
  nbd: { host: '127.0.0.1', port: 10809 },
  peer: { host: '127.0.0.1', port: 10909 },
  admin: { host: '127.0.0.1', port: 11009 },
  volumes: [{ name: 'vol0', sizeBytes: '1GiB' }],
};

const isConfigInvalid = (error: unknown): boolean => isMirrorsanError(error, 'CONFIG_INVALID');

test('a valid config gets defaults and is frozen', () => {
  const config = parseNodeConfig(valid);
  assert.equal(config.volumes[0]?.sizeBytes, 1024 ** 3);
  assert.equal(config.volumes[0]?.readOnly, false);
  assert.equal(config.tls, null);
  assert.equal(config.threadPoolSize, 16);
  assert.equal(config.failureTimeoutMs, 1000);
  assert.equal(parseNodeConfig({ ...valid, failureTimeoutMs: 300 }).failureTimeoutMs, 300);
  assert.ok(Object.isFrozen(config));
  assert.ok(Object.isFrozen(config.nbd));
});

test('bad values are refused with CONFIG_INVALID naming the field', () => {
  const cases: [string, unknown][] = [
    ['id', { ...valid, id: 'bad id' }],
    ['nbd.port', { ...valid, nbd: { port: 70000 } }],
    ['volume name', { ...valid, volumes: [{ name: '../etc', sizeBytes: 4096 * 1024 }] }],
    ['size', { ...valid, volumes: [{ name: 'v', sizeBytes: 1000 }] }],
    ['duplicate', { ...valid, volumes: [{ name: 'v', sizeBytes: '1MiB' }, { name: 'v', sizeBytes: '1MiB' }] }],
    ['tls', { ...valid, tls: { certFile: 'c' } }],
    ['not an object', 'hello'],
    ['failureTimeoutMs', { ...valid, failureTimeoutMs: 50 }],
    ['failureTimeoutMs type', { ...valid, failureTimeoutMs: '1s' }],
  ];
  for (const [what, raw] of cases) {
    assert.throws(() => parseNodeConfig(raw), isConfigInvalid, what);
  }
});

test('ports follow the documented layout', () => {
  assert.deepEqual(portsForNode(10809, 0), { nbd: 10809, peer: 10909, admin: 11009 });
  assert.deepEqual(portsForNode(10809, 2), { nbd: 10811, peer: 10911, admin: 11011 });
});
