// Proves the admin API's actions: without fault-injection handlers (a node not started with the test setting) every /v1/faults method answers 403 FAULT_INJECTION_DISABLED naming the setting; with them a POST's JSON body reaches the handler, a malformed or oversized body is refused with 400/500 before it, and DELETE passes its volume; POST /v1/volumes/NAME/reattach reaches the re-attach handler (GET refused with 405, an unknown path 404); the read-only endpoints still answer GET only.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { createMemoryLogger } from '../util/log.js';
import { AdminServer, type AdminHandlers } from './http.js';

async function serve(handlers: AdminHandlers, t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const server = new AdminServer(handlers, createMemoryLogger());
  const address: AddressInfo = await server.listen(0, '127.0.0.1');
  t.after(() => server.close());
  return `http://127.0.0.1:${address.port}`;
}

const readOnly: AdminHandlers = { status: () => ({ ok: true }), metrics: () => 'm 1\n', dashboardHtml: () => '<html></html>' };

test('fault injection is refused without the test setting, whatever the method', async (t) => {
  const base = await serve(readOnly, t);
  for (const method of ['GET', 'POST', 'DELETE', 'PUT']) {
    const response = await fetch(`${base}/v1/faults`, { method, ...(method === 'POST' || method === 'PUT' ? { body: '{"errno":"EIO"}' } : {}) });
    assert.equal(response.status, 403, method);
    const body = (await response.json()) as { code: string; error: string };
    assert.equal(body.code, 'FAULT_INJECTION_DISABLED');
    assert.match(body.error, /test configuration only: faultInjection: true in the node config, or MIRRORSAN_FAULT_INJECTION=1/);
  }
  assert.equal((await fetch(`${base}/v1/status`)).status, 200);
  assert.equal((await fetch(`${base}/v1/status`, { method: 'POST' })).status, 405, 'the read-only endpoints stay read-only');
  assert.equal((await fetch(`${base}/v1/volumes/vol0/reattach`, { method: 'POST' })).status, 404, 'no re-attach handler: nothing to re-attach');
});

test('with fault injection enabled the handlers get the parsed body and the volume to clear', async (t) => {
  const seen: unknown[] = [];
  const base = await serve(
    {
      ...readOnly,
      faults: {
        set: (body) => (seen.push(['set', body]), { status: 200, body: { set: true } }),
        clear: (volume) => (seen.push(['clear', volume]), { status: 200, body: { cleared: volume ?? 'all' } }),
        list: () => ({ status: 200, body: { faults: [] } }),
      },
    },
    t,
  );
  assert.deepEqual(await (await fetch(`${base}/v1/faults`, { method: 'POST', body: '{"volume":"vol0","errno":"ENOSPC"}' })).json(), { set: true });
  assert.deepEqual(await (await fetch(`${base}/v1/faults?volume=vol0`, { method: 'DELETE' })).json(), { cleared: 'vol0' });
  assert.deepEqual(await (await fetch(`${base}/v1/faults`, { method: 'DELETE' })).json(), { cleared: 'all' });
  assert.deepEqual(await (await fetch(`${base}/v1/faults`)).json(), { faults: [] });
  const malformed = await fetch(`${base}/v1/faults`, { method: 'POST', body: '{not json' });
  assert.equal(malformed.status, 400);
  assert.equal(((await malformed.json()) as { code: string }).code, 'CONFIG_INVALID');
  const oversized = await fetch(`${base}/v1/faults`, { method: 'POST', body: 'x'.repeat(100 * 1024) }).catch((error: unknown) => error as Error);
  assert.ok(oversized instanceof Error || oversized.status >= 400, 'an oversized body is not taken');
  assert.deepEqual(seen, [['set', { volume: 'vol0', errno: 'ENOSPC' }], ['clear', 'vol0'], ['clear', undefined]]);
});

test('POST /v1/volumes/NAME/reattach reaches the handler with the name; other methods and names are refused', async (t) => {
  const asked: string[] = [];
  const base = await serve({ ...readOnly, reattach: async (volume) => (asked.push(volume), { status: 200, body: { volume, mode: 'reattaching' } }) }, t);
  const response = await fetch(`${base}/v1/volumes/vol0/reattach`, { method: 'POST' });
  assert.equal(response.status, 200);
  assert.deepEqual(await response.json(), { volume: 'vol0', mode: 'reattaching' });
  assert.equal((await fetch(`${base}/v1/volumes/vol0/reattach`)).status, 405);
  assert.equal((await fetch(`${base}/v1/volumes/..%2Fx/reattach`, { method: 'POST' })).status, 405, 'not a volume name: not this route');
  assert.deepEqual(asked, ['vol0']);
});
