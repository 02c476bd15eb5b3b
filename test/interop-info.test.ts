// Proves `mirrorsan up --nodes 1` advertises what the contract promises, as nbdinfo and qemu-nbd -L see it, serves its admin API, and exits 0 on SIGTERM.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { nbdinfoCan, nbdinfoMap, run, runOk, startUp, testServerKind, withServerLog } from './helpers/index.js';
import type { NbdinfoFeature, UpCluster } from './helpers/index.js';

const VOLUME = 'vol0';
const SIZE_BYTES = 64 * 1024 * 1024;

describe('mirrorsan up: what clients are told', () => {
  let cluster: UpCluster;
  const uri = (): string => cluster.nodes[0]!.nbd;
  const log = (): string => cluster?.stderr ?? '';

  before(async () => {
    cluster = await startUp({ volume: VOLUME, size: '64MiB' });
  });
  after(async () => {
    await cluster?.stop();
  });

  it('prints a ready line whose URI names the volume on the NBD port', () => {
    const node = cluster.nodes[0]!;
    assert.equal(node.id, 'n1');
    assert.equal(node.nbd, `nbd://127.0.0.1:${cluster.nbdPort(0)}/${VOLUME}`);
    assert.ok(node.pid > 0);
  });

  it('nbdinfo --list shows the volume with its size and base:allocation', withServerLog(log, async () => {
    const result = await runOk('nbdinfo', ['--list', '--json', uri()]);
    const listing = JSON.parse(result.stdout) as { protocol: string; exports: Array<Record<string, unknown>> };
    assert.equal(listing.exports.length, 1, result.stdout);
    const exported = listing.exports[0]!;
    assert.equal(exported['export-name'], VOLUME);
    assert.equal(exported['export-size'], SIZE_BYTES);
    assert.deepEqual(exported.contexts, ['base:allocation']);
    assert.match(listing.protocol, /newstyle-fixed/);
    // Block sizes the contract fixes: min 512, preferred 4096, max 32 MiB.
    assert.equal(exported['block_size_minimum'], 512, result.stdout);
    assert.equal(exported['block_size_preferred'], 4096);
    assert.equal(exported['block_size_maximum'], 32 * 1024 * 1024);
  }));

  const features: NbdinfoFeature[] = ['connect', 'structured-reply', 'flush', 'fua', 'trim', 'zero', 'df', 'cache', 'fast-zero', 'multi-conn'];
  for (const feature of features) {
    it(`nbdinfo --can ${feature} exits 0`, withServerLog(log, async () => {
      assert.equal(await nbdinfoCan(feature, uri()), true, `server cannot ${feature}`);
    }));
  }

  it('an unknown export name is refused', withServerLog(log, async () => {
    const result = await run('nbdinfo', [`nbd://127.0.0.1:${cluster.nbdPort(0)}/no-such-volume`]);
    assert.notEqual(result.code, 0, result.stdout);
  }));

  it('nbdinfo --map of a fresh volume is one hole that reads as zero', withServerLog(log, async () => {
    const extents = await nbdinfoMap(uri());
    const total = extents.reduce((sum, e) => sum + e.length, 0);
    assert.equal(total, SIZE_BYTES);
    for (const extent of extents) assert.equal(extent.type, 3, `extent ${JSON.stringify(extent)} is not hole,zero`);
  }));

  it('qemu-nbd -L lists the export, its flags and base:allocation over TCP', withServerLog(log, async () => {
    const result = await runOk('qemu-nbd', ['-L', '-b', '127.0.0.1', '-p', String(cluster.nbdPort(0))]);
    assert.match(result.stdout, /exports available: 1/);
    assert.match(result.stdout, new RegExp(`export: '${VOLUME}'`));
    assert.match(result.stdout, new RegExp(`size:\\s+${SIZE_BYTES}\\b`));
    const flags = /flags: 0x[0-9a-f]+ \(([^)]*)\)/.exec(result.stdout)?.[1]?.trim().split(/\s+/) ?? [];
    for (const flag of ['flush', 'fua', 'trim', 'zeroes', 'df', 'multi', 'cache', 'fast-zero']) {
      assert.ok(flags.includes(flag), `qemu-nbd -L flags lack ${flag}: ${result.stdout}`);
    }
    assert.ok(!flags.includes('readonly'), 'export is read-only');
    assert.match(result.stdout, /base:allocation/);
  }));

  // The nbdkit stand-in (MIRRORSAN_TEST_SERVER=nbdkit) has no admin API.
  it('admin HTTP serves /v1/status JSON and /metrics text', { skip: testServerKind() !== 'mirrorsan' }, withServerLog(log, async () => {
    const admin = cluster.nodes[0]!.admin;
    const status = await fetch(`${admin}/v1/status`);
    assert.equal(status.status, 200);
    assert.match(status.headers.get('content-type') ?? '', /json/);
    const body = await status.text();
    const parsed = JSON.parse(body) as unknown;
    assert.ok(body.includes('"n1"'), `status does not name node n1: ${body}`);
    assert.ok(body.includes(VOLUME), `status does not list ${VOLUME}: ${body}`);
    assert.equal(typeof parsed, 'object');
    const metrics = await fetch(`${admin}/metrics`);
    assert.equal(metrics.status, 200);
    const text = await metrics.text();
    const samples = text.split('\n').filter((line) => line !== '' && !line.startsWith('#'));
    assert.ok(samples.length > 0, 'no metric samples');
    for (const sample of samples) {
      assert.match(sample, /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEInfNa]+( \d+)?$/, `not Prometheus text: ${sample}`);
    }
  }));

  it('exits 0 on SIGTERM, promptly', withServerLog(log, async () => {
    const exits = await cluster.stop();
    for (const exit of exits) {
      assert.equal(exit.forced, false, `${exit.command} ignored SIGTERM`);
      assert.equal(exit.code, 0, `${exit.command} exited ${exit.code ?? exit.signal}`);
    }
  }));
});
