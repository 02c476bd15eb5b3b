// Proves the dashboard summarises replicated volumes (replica states, grant holders, catch-up progress, fence, a diskless node and where it forwards) with every status string escaped, and shows no summary without replicated volumes.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { renderDashboard, replicatedSummaryHtml } from './dashboard.js';

test('one row per replicated volume, with states, holders, catch-up and fence', () => {
  const html = replicatedSummaryHtml([
    {
      name: 'vol0',
      epoch: 9,
      replicaStates: [{ node: 'n1', state: 'in-sync' }, { node: 'n3', state: 'catching-up' }],
      fence: 'n3 is not in the in-sync set of epoch 9',
      degraded: true,
      policing: { arbiter: { regionsHeld: { n1: 12, n2: 3 } } },
      catchUp: { state: 'copying', percent: 42.5 },
    },
  ]);
  assert.match(html, /<td>vol0<\/td><td>9<\/td>/);
  assert.match(html, /n1: in-sync<\/span> · <span style="color:#9a6700">n3: catching-up/);
  assert.match(html, /<td>n1: 12, n2: 3<\/td><td>copying 42.5%<\/td><td>degraded; fenced: n3 is not in the in-sync set of epoch 9<\/td>/);
});

test('status strings are escaped, and a node without replicated volumes shows no summary', () => {
  assert.match(replicatedSummaryHtml([{ name: '<script>', fence: 'a "quoted" & <b>' }]), /&#60;script&#62;.*a &#34;quoted&#34; &#38; &#60;b&#62;/s);
  assert.doesNotMatch(renderDashboard({ node: { id: 'n1' }, replicatedVolumes: [] }), /Replicated volumes/);
  assert.match(renderDashboard({ replicatedVolumes: [{ name: 'v' }] }), /Replicated volumes/);
});

test('a diskless node is shown in its own colour, with the disk error and the peer it forwards to (escaped)', () => {
  const html = replicatedSummaryHtml([
    {
      name: 'vol0',
      epoch: 12,
      replicaStates: [{ node: 'n1', state: 'diskless' }, { node: 'n2', state: 'in-sync' }],
      degraded: true,
      diskless: { mode: 'diskless', forwardingTo: 'n2', error: { code: 'STORE_IO', message: 'image write failed (EIO) <x>' } },
    },
  ]);
  assert.match(html, /<span style="color:#8250df">n1: diskless<\/span>/);
  assert.match(html, /diskless \(diskless\): forwarding to n2; disk error STORE_IO: image write failed \(EIO\) &#60;x&#62;<\/span>; degraded/);
});
