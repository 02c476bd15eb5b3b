// Proves mirrorsan handles libnbd's negotiation and command corners: simple replies only, handshake flags 0 (EXPORT_NAME), out-of-range errors, 64 requests in flight, base:allocation block status, DF/CACHE/FAST_ZERO/NO_HOLE and invalid flags.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { runPythonFixture, startUp, withServerLog } from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
/** Each case writes only inside its own 1 MiB scratch region. */
const CASES: Array<{ name: string; offsetBytes: number; what: string }> = [
  { name: 'no-structured-replies', offsetBytes: 1 * MiB, what: 'structured replies off: simple replies carry reads, writes and flush' },
  { name: 'handshake-flags-zero', offsetBytes: 3 * MiB, what: 'handshake flags 0: the old EXPORT_NAME path still serves data' },
  { name: 'out-of-range', offsetBytes: 5 * MiB, what: 'out-of-range requests get EINVAL (read, trim) and ENOSPC (write), connection survives' },
  { name: 'inflight-64', offsetBytes: 7 * MiB, what: '64 writes and 64 reads in flight on one connection all complete correctly' },
  { name: 'block-status', offsetBytes: 9 * MiB, what: 'block status with base:allocation: data, trimmed zeros, REQ_ONE' },
  { name: 'command-flags', offsetBytes: 11 * MiB, what: 'DF gives one chunk; CACHE, FAST_ZERO, NO_HOLE, FUA on READ accepted; bad flags and misalignment get EINVAL' },
];

describe('libnbd negotiation corners (python3-libnbd)', () => {
  let cluster: UpCluster;
  const log = (): string => cluster?.stderr ?? '';

  before(async () => {
    cluster = await startUp({ size: '64MiB' });
  });
  after(async () => {
    await cluster?.stop();
  });

  for (const testCase of CASES) {
    it(testCase.what, withServerLog(log, async () => {
      const result = await runPythonFixture('nbd_negotiation.py', [testCase.name, cluster.nodes[0]!.nbd, String(testCase.offsetBytes)]);
      assert.equal(result.code, 0, `${testCase.name}:\n${result.stdout}${result.stderr}`);
      assert.match(result.stdout, new RegExp(`^ok ${testCase.name}: `, 'm'));
    }));
  }
});
