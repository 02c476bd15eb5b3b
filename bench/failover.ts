// Failover benchmark: the client-visible I/O pause when the node behind `mirrorsan attach` is
// SIGKILLed and restarted at once (single-node cluster: the "other node" is the restarted
// one). A QD1 write+read loop runs through attach; the pause is the longest gap between two
// completed requests around the kill, and attach's own logged pauseMs. Median of N runs.
// `npm run build && node dist/bench/failover.js [--runs 5]`
import path from 'node:path';
import { CLI_PATH, ManagedProcess, startUp } from '../test/helpers/index.js';
import { NbdClient } from '../src/nbd/client.js';

interface RunResult {
  clientGapMs: number;
  attachPauseMs: number;
  replayed: number;
  restartReadyMs: number;
}

async function oneRun(): Promise<RunResult> {
  const cluster = await startUp({ size: '64MiB', persistent: true });
  const socketPath = path.join(cluster.workDir, 'attach.sock');
  const attach = new ManagedProcess(process.execPath, [
    CLI_PATH, 'attach', cluster.volume, '--listen', `unix:${socketPath}`, '--nodes', cluster.nodes[0]!.nbd, '--json',
  ]);
  try {
    await attach.waitForLine((line) => line.startsWith('{'), { what: 'attach ready' });
    const client = await NbdClient.connect({ path: socketPath }, { exportName: cluster.volume });
    const block = Buffer.alloc(4096, 0x5a);
    let lastDoneMs = performance.now();
    let maxGapMs = 0;
    let stop = false;
    const loop = (async () => {
      for (let i = 0; !stop; i++) {
        const offset = (i % 4096) * 4096;
        await client.write(offset, block, { fua: false });
        await client.read(offset, 4096);
        const now = performance.now();
        maxGapMs = Math.max(maxGapMs, now - lastDoneMs);
        lastDoneMs = now;
      }
    })();
    await new Promise((resolve) => setTimeout(resolve, 500));
    const killedAt = performance.now();
    await cluster.kill(0);
    await cluster.restart(0);
    const restartReadyMs = performance.now() - killedAt;
    await new Promise((resolve) => setTimeout(resolve, 1500));
    stop = true;
    await loop;
    await client.disconnect();
    const line = attach.stderr.split('\n').find((text) => / failover /.test(text)) ?? '';
    return {
      clientGapMs: Math.round(maxGapMs),
      attachPauseMs: Number(/pauseMs=(\d+)/.exec(line)?.[1] ?? NaN),
      replayed: Number(/replayed=(\d+)/.exec(line)?.[1] ?? NaN),
      restartReadyMs: Math.round(restartReadyMs),
    };
  } finally {
    await attach.stop('SIGTERM');
    await cluster.stop();
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function main(): Promise<void> {
  const runsIndex = process.argv.indexOf('--runs');
  const runs = runsIndex > 0 ? Number(process.argv[runsIndex + 1]) : 5;
  const results: RunResult[] = [];
  for (let run = 0; run < runs; run++) {
    const result = await oneRun();
    results.push(result);
    process.stderr.write(`[failover] run ${run + 1}/${runs}: ${JSON.stringify(result)}\n`);
  }
  const summary = {
    runs,
    clientGapMsMedian: median(results.map((r) => r.clientGapMs)),
    attachPauseMsMedian: median(results.map((r) => r.attachPauseMs)),
    restartReadyMsMedian: median(results.map((r) => r.restartReadyMs)),
    results,
  };
  process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  process.stdout.write(
    `\n| metric (median of ${runs}) | ms |\n|---|---:|\n| client-visible I/O pause (longest gap between completions) | ${summary.clientGapMsMedian} |\n| attach's logged pause | ${summary.attachPauseMsMedian} |\n| node SIGKILL to restarted node ready | ${summary.restartReadyMsMedian} |\n`,
  );
}

main().catch((error: unknown) => {
  process.stderr.write(`failover bench failed: ${error instanceof Error ? error.stack : String(error)}\n`);
  process.exit(1);
});
