// Proves mirrorsan's NBD TLS (STARTTLS) works with libnbd clients and a test CA, verifies as that CA's certificate, carries data, and refuses plaintext in --tls-required mode.
import assert from 'node:assert/strict';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  makeTempDir, makeTlsFixture, makeSparseImage, removeDir, run, runOk, sha256File, startUp, tlsUri, withServerLog,
} from './helpers/index.js';
import type { TlsFixture, UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;

describe('TLS', () => {
  let certsDir: string;
  let fixture: TlsFixture;
  let strangerFixture: TlsFixture;

  before(async () => {
    certsDir = await makeTempDir('tls');
    await mkdir(path.join(certsDir, 'ours'));
    await mkdir(path.join(certsDir, 'stranger'));
    [fixture, strangerFixture] = await Promise.all([
      makeTlsFixture(path.join(certsDir, 'ours')),
      makeTlsFixture(path.join(certsDir, 'stranger')),
    ]);
  });
  after(async () => {
    if (certsDir) await removeDir(certsDir);
  });

  describe('with --tls-cert/--tls-key (TLS offered)', () => {
    let cluster: UpCluster;
    const log = (): string => cluster?.stderr ?? '';
    before(async () => {
      cluster = await startUp({ size: '16MiB', tls: { fixture } });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('nbdinfo over nbds:// trusting only the test CA negotiates TLS', withServerLog(log, async () => {
      const result = await runOk('nbdinfo', ['--json', tlsUri(cluster.nodes[0]!.nbd, fixture)]);
      const info = JSON.parse(result.stdout) as { TLS: boolean; exports: Array<{ 'export-size': number }> };
      assert.equal(info.TLS, true);
      assert.equal(info.exports[0]?.['export-size'], 16 * MiB);
    }));

    it('a client trusting another CA refuses the server certificate', withServerLog(log, async () => {
      const result = await run('nbdinfo', ['--size', tlsUri(cluster.nodes[0]!.nbd, strangerFixture)]);
      assert.notEqual(result.code, 0, result.stdout);
      assert.match(result.stderr, /certificate|verif/i);
    }));

    it('nbdcopy moves data in and out over TLS byte-exact', withServerLog(log, async () => {
      const source = path.join(cluster.workDir, 'tls-source.raw');
      const copy = path.join(cluster.workDir, 'tls-copy.raw');
      await makeSparseImage(source, 16 * MiB, [{ offset: 0, length: 3 * MiB }, { offset: 9 * MiB, length: MiB }]);
      const secureUri = tlsUri(cluster.nodes[0]!.nbd, fixture);
      await runOk('nbdcopy', ['--flush', source, secureUri]);
      await runOk('nbdcopy', [secureUri, copy]);
      assert.equal(await sha256File(copy), await sha256File(source));
    }));

    it('plaintext nbd:// is still served when TLS is not required', withServerLog(log, async () => {
      const result = await runOk('nbdinfo', ['--json', cluster.nodes[0]!.nbd]);
      assert.equal((JSON.parse(result.stdout) as { TLS: boolean }).TLS, false);
    }));
  });

  describe('with --tls-required', () => {
    let cluster: UpCluster;
    const log = (): string => cluster?.stderr ?? '';
    before(async () => {
      cluster = await startUp({ size: '16MiB', tls: { fixture, required: true } });
    });
    after(async () => {
      await cluster?.stop();
    });

    it('plaintext nbd:// is refused (nbdinfo and qemu-img)', withServerLog(log, async () => {
      const info = await run('nbdinfo', ['--size', cluster.nodes[0]!.nbd]);
      assert.notEqual(info.code, 0, `plaintext connect succeeded: ${info.stdout}`);
      const qemu = await run('qemu-img', ['info', '-f', 'raw', cluster.nodes[0]!.nbd]);
      assert.notEqual(qemu.code, 0, `qemu-img plaintext connect succeeded: ${qemu.stdout}`);
    }));

    it('nbds:// with the test CA works, and the server keeps serving after refusals', withServerLog(log, async () => {
      const result = await runOk('nbdinfo', ['--size', tlsUri(cluster.nodes[0]!.nbd, fixture)]);
      assert.equal(result.stdout.trim(), String(16 * MiB));
    }));
  });
});
