// Proves a node SIGKILLed under write load (a flushing libnbd writer of writes, trims and zeroes, plus fio) replays its log on restart and loses no request acknowledged before the last completed FLUSH, across two crashes in a row and a clean restart.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  FIO_NO_STATE_FILES, FIXTURES_DIR, ManagedProcess, PYTHON3, fioNbd, runPythonFixture, sleep, startUp, testServerKind, withServerLog,
} from './helpers/index.js';
import type { UpCluster } from './helpers/index.js';

const MiB = 1024 * 1024;
const WRITER = path.join(FIXTURES_DIR, 'crash_writer.py');
const BLOCKS = 4096; // 16 MiB of 4 KiB blocks per round
const BATCH = 16; // writes in flight between flushes
/** Kill once the writer has this many writes behind a completed FLUSH (over one full pass of the region). */
const FLUSHED_BEFORE_KILL = BLOCKS + BLOCKS / 2;
const FIO_REGION = ['--offset=48M', '--size=16M', '--bs=4k'];
const KILL_DELAY_MS_MIN = 20;
const KILL_DELAY_MS_SPREAD = 300;

interface Round {
  seed: number;
  offsetBytes: number;
  /** Writes the writer saw covered by a completed FLUSH before the crash. */
  flushed: number;
}

const lastFlushed = (stdout: string): number => {
  let flushed = 0;
  for (const line of stdout.split('\n')) {
    const match = /^\{"flushed": (\d+)\}$/.exec(line.trim());
    if (match) flushed = Number(match[1]);
  }
  return flushed;
};

const writerArgs = (round: Round): string[] => [
  '--offset', String(round.offsetBytes), '--blocks', String(BLOCKS), '--batch', String(BATCH), '--seed', String(round.seed),
];

describe('crash: SIGKILL under write load, then restart from the log', () => {
  let cluster: UpCluster;
  const rounds: Round[] = [];
  const log = (): string => cluster?.stderr ?? '';
  const uri = (): string => cluster.nodes[0]!.nbd;

  before(async () => {
    cluster = await startUp({ size: '64MiB', persistent: true });
  });
  after(async () => {
    await cluster?.stop();
  });

  /** Runs the writer and fio, kills the node mid-stream, and returns what was durable. */
  const crashDuringWrites = async (round: Omit<Round, 'flushed'>): Promise<Round> => {
    const writer = new ManagedProcess(PYTHON3, [WRITER, 'write', uri(), ...writerArgs({ ...round, flushed: 0 }), '--max-seconds', '60']);
    const fio = new ManagedProcess('fio', [
      '--name=load', '--ioengine=nbd', `--uri=${uri()}`, '--rw=randwrite', ...FIO_REGION, '--iodepth=8', '--fsync=8',
      '--time_based', '--runtime=60', '--output-format=json', ...FIO_NO_STATE_FILES,
    ], { cwd: cluster.workDir });
    try {
      await writer.waitForLine((line) => lastFlushed(line) >= FLUSHED_BEFORE_KILL, { timeoutMs: 60_000, what: `${FLUSHED_BEFORE_KILL} flushed writes` });
      assert.ok(fio.running, `fio stopped before the crash:\n${fio.describeOutput()}`);
      // Land the kill at an arbitrary point of the write/flush cycle, not right after a flush.
      await sleep(KILL_DELAY_MS_MIN + Math.floor(Math.random() * KILL_DELAY_MS_SPREAD));
      await cluster.kill(0);
      // Both clients must notice the dead server and stop on their own.
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.all([writer.exited, fio.exited]),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error('clients did not notice the crash within 15 s')), 15_000);
        }),
      ]).finally(() => clearTimeout(timer));
    } finally {
      await writer.stop('SIGKILL', 1000);
      await fio.stop('SIGKILL', 1000);
    }
    assert.equal(writer.exitCode, 0, `writer failed:\n${writer.describeOutput()}`);
    assert.match(writer.stdout, /"stopped"/, 'the writer did not see its connection drop');
    assert.notEqual(fio.exitCode, 0, 'fio finished although the server was killed');
    const flushed = lastFlushed(writer.stdout);
    assert.ok(flushed >= FLUSHED_BEFORE_KILL);
    return { ...round, flushed };
  };

  const verifyRound = async (round: Round): Promise<Record<string, unknown>> => {
    const result = await runPythonFixture('crash_writer.py', ['verify', uri(), ...writerArgs(round), '--flushed', String(round.flushed)]);
    assert.equal(result.code, 0, `round seed=${round.seed}: acknowledged-and-flushed data lost or corrupt:\n${result.stdout}${result.stderr}`);
    const summary = JSON.parse(result.stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
    assert.equal(summary.problems, 0);
    assert.equal(summary.zeros_never_touched, 0, 'every block had a step before the last flush, so none may be untouched');
    assert.ok(Number(summary.zeros_expected) > 0, 'no TRIM/WRITE_ZEROES step was checked');
    return summary;
  };

  /** The restarted node must say it replayed its log; returns replayedEntries. */
  const assertReplayLogged = (): number | undefined => {
    if (testServerKind() !== 'mirrorsan') return undefined; // nbdkit has no log to replay
    const line = cluster.nodeStderr(0).split('\n').find((l) => l.includes('log replay'));
    assert.ok(line, `restarted node logged no "log replay" line:\n${cluster.nodeStderr(0).slice(-3000)}`);
    const match = /replayedEntries=(\d+)/.exec(line);
    assert.ok(match, `"log replay" line lacks replayedEntries=N: ${line}`);
    return Number(match[1]);
  };

  it('crash 1: restart replays the log; every write flushed before the kill reads back intact', withServerLog(log, async (t) => {
    rounds.push(await crashDuringWrites({ seed: 101, offsetBytes: 0 }));
    await cluster.restart(0);
    const replayed = assertReplayLogged();
    if (replayed !== undefined) assert.ok(replayed > 0, 'a node killed mid-write replayed 0 log entries');
    const summary = await verifyRound(rounds[0]!);
    t.diagnostic(`flushed before kill: ${rounds[0]!.flushed} writes; replayed ${replayed ?? 'n/a'} entries; blocks ${JSON.stringify(summary)}`);
  }));

  it('the recovered node takes new writes: fio write + crc32c verify', withServerLog(log, async () => {
    const verify = ['--rw=randwrite', ...FIO_REGION, '--iodepth=16', '--verify=crc32c', '--verify_fatal=1'];
    const report = await fioNbd(uri(), ['--name=after-crash', '--do_verify=1', ...verify]);
    assert.equal(report.jobs[0]!.write.io_bytes, 16 * MiB);
  }));

  it('crash 2 right after recovery: both rounds survive a second kill and replay', withServerLog(log, async (t) => {
    assert.equal(rounds.length, 1, 'crash 1 did not complete');
    rounds.push(await crashDuringWrites({ seed: 202, offsetBytes: 16 * MiB }));
    await cluster.restart(0);
    const replayed = assertReplayLogged();
    const summaries = [await verifyRound(rounds[0]!), await verifyRound(rounds[1]!)];
    t.diagnostic(`flushed before kill: ${rounds[1]!.flushed} writes; replayed ${replayed ?? 'n/a'} entries; blocks ${JSON.stringify(summaries)}`);
  }));

  it('clean SIGTERM checkpoints the log: exit 0, nothing left to replay, data intact', withServerLog(log, async () => {
    assert.equal(rounds.length, 2, 'crash 2 did not complete');
    const exit = await cluster.terminate(0);
    assert.equal(exit.forced, false, 'node ignored SIGTERM');
    assert.equal(exit.code, 0, `node exited ${exit.code ?? exit.signal} on SIGTERM`);
    await cluster.restart(0);
    if (testServerKind() === 'mirrorsan') {
      const line = cluster.nodeStderr(0).split('\n').find((l) => l.includes('log replay'));
      if (line) assert.match(line, /replayedEntries=0\b/, `log not checkpointed at clean shutdown: ${line}`);
    }
    for (const round of rounds) await verifyRound(round);
  }));
});
