// Proves fault injection is test configuration only and does what it says: it is enabled by `faultInjection: true` or MIRRORSAN_FAULT_INJECTION=1 and by nothing else (the config field is validated and defaults to false), requests are validated (volume, target, errno), and a store hook fails writes of the named volume (or of every volume) with the named errno until the fault is cleared, counting them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isMirrorsanError } from '../errors.js';
import { parseNodeConfig } from './config.js';
import { FaultSwitch, faultInjectionEnabled, parseFaultRequest } from './faults.js';

const minimal = { id: 'n1', dataDir: '/tmp/n1', nbd: { port: 1 }, peer: { port: 2 }, admin: { port: 3 } };

test('enabled only by the config field or MIRRORSAN_FAULT_INJECTION=1', () => {
  const config = parseNodeConfig(minimal);
  assert.equal(config.faultInjection, false, 'off by default');
  assert.equal(faultInjectionEnabled(config, {}), false);
  assert.equal(faultInjectionEnabled(config, { MIRRORSAN_FAULT_INJECTION: '0' }), false);
  assert.equal(faultInjectionEnabled(config, { MIRRORSAN_FAULT_INJECTION: 'yes' }), false);
  assert.equal(faultInjectionEnabled(config, { MIRRORSAN_FAULT_INJECTION: '1' }), true);
  assert.equal(faultInjectionEnabled(parseNodeConfig({ ...minimal, faultInjection: true }), {}), true);
  assert.throws(() => parseNodeConfig({ ...minimal, faultInjection: 'true' }), (error: unknown) => isMirrorsanError(error, 'CONFIG_INVALID') && /faultInjection must be true or false/.test((error as Error).message));
});

test('a fault request is validated', () => {
  assert.deepEqual(parseFaultRequest({ errno: 'ENOSPC' }), { volume: null, target: 'image-writes', errno: 'ENOSPC' });
  assert.deepEqual(parseFaultRequest({}), { volume: null, target: 'image-writes', errno: 'EIO' });
  assert.deepEqual(parseFaultRequest({ volume: 'vol0', target: 'image-writes', errno: 'EIO' }), { volume: 'vol0', target: 'image-writes', errno: 'EIO' });
  for (const bad of [null, [], 'EIO', { errno: 'EPERM' }, { target: 'log-writes' }, { volume: '' }, { volume: 7 }, { errno: 'EIO', after: 3 }]) {
    assert.throws(() => parseFaultRequest(bad), (error: unknown) => isMirrorsanError(error, 'CONFIG_INVALID'), JSON.stringify(bad));
  }
});

test("a volume's hook fails its image writes with the fault's errno until cleared; a fault for every volume applies to all", () => {
  const faults = new FaultSwitch();
  const vol0 = faults.imageFaults('vol0').failImageWrites!;
  const vol1 = faults.imageFaults('vol1').failImageWrites!;
  assert.equal(vol0(), false);
  faults.set({ volume: 'vol0', target: 'image-writes', errno: 'ENOSPC' });
  assert.equal(vol0(), 'ENOSPC');
  assert.equal(vol1(), false, 'another volume is not touched');
  faults.set({ volume: null, target: 'image-writes', errno: 'EIO' });
  assert.equal(vol1(), 'EIO');
  assert.equal(vol0(), 'ENOSPC', "a volume's own fault wins");
  assert.equal(faults.injected, 3);
  faults.clear('vol0');
  assert.equal(vol0(), false, 'clearing a volume clears the fault for every volume too');
  assert.equal(vol1(), false);
  faults.set({ volume: 'vol1', target: 'image-writes', errno: 'EIO' });
  faults.clear();
  assert.deepEqual(faults.list(), []);
  assert.equal(vol1(), false);
});
