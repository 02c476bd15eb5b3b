// Catch-up benchmark (issue 5): a 2-node cluster, n2 SIGKILLed; while it is away, 1% of the
// volume's regions are written through n1; n2 restarts and catches up. Reported: the time from
// n2's restart to its return to the in-sync set, what it compared (the dirty regions n1
// marked while it was away) and the bytes it copied, against a full copy of the same volume
// (n2 restarted on an empty disk) in the same run; and the compare throughput against this
// machine's raw disk read rate (dd) and loopback TCP rate (one stream), its two limits.
// `npm run bench:catchup`; options in bench/README.md.
import { execFileSync } from 'node:child_process';
import { rm, mkdir, writeFile } from 'node:fs/promises';
import * as net from 'node:net';
import path from 'node:path';
import { REPO_ROOT, fioNbd, sleep, startUp, waitUntil } from '../test/helpers/index.js';
import type { UpCluster } from '../test/helpers/index.js';

const MiB = 1024 * 1024;

interface Config {
  sizeBytes: number;
  outageS: number;
  writtenFraction: number;
  runs: number;
}

interface CatchUpStatus {
  replicaState: string;
  inSync: string[];
  catchUp: { bytesCopied: number; bytesCompared: number; state: string; mode: string | null; startedAtMs: number; finishedAtMs: number | null } | null;
}

interface RunResult {
  kind: 'catch-up' | 'full copy';
  /** From the restart of n2 to its return to the in-sync set (node start, store replay and CASes included). */
  seconds: number;
  /** The catch-up itself: plan, compare, copy and flush (the node's own clock). */
  catchUpSeconds: number;
  bytesCopied: number;
  bytesCompared: number;
  mode: string;
}

function parseArgs(argv: readonly string[]): Config {
  const config: Config = { sizeBytes: 512 * MiB, outageS: 30, writtenFraction: 0.01, runs: 1 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) usage();
    if (flag === '--size-mib') config.sizeBytes = Number(value) * MiB;
    else if (flag === '--outage') config.outageS = Number(value);
    else if (flag === '--written') config.writtenFraction = Number(value);
    else if (flag === '--runs') config.runs = Number(value);
    else usage();
  }
  if (!(config.sizeBytes >= 64 * MiB) || !(config.outageS >= 0) || !(config.writtenFraction > 0 && config.writtenFraction <= 1)) usage();
  return config;
}

function usage(): never {
  process.stderr.write('usage: node dist/bench/catchup.js [--size-mib N (512)] [--outage S (30)] [--written FRACTION (0.01)] [--runs N (1)]\n');
  process.exit(2);
}

const progress = (message: string): void => {
  process.stderr.write(`[bench:catchup] ${message}\n`);
};

async function volumeStatus(cluster: UpCluster, index: number): Promise<CatchUpStatus | undefined> {
  try {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`, { signal: AbortSignal.timeout(2000) });
    const status = (await response.json()) as { replicatedVolumes: (CatchUpStatus & { name: string })[] };
    return status.replicatedVolumes.find((volume) => volume.name === cluster.volume);
  } catch {
    return undefined;
  }
}

/** Writes 4 KiB into `fraction` of the 1 MiB regions, chosen at random, through n1. */
async function writeRegions(cluster: UpCluster, sizeBytes: number, fraction: number): Promise<number> {
  const regions = sizeBytes / MiB;
  const count = Math.max(1, Math.round(regions * fraction));
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(Math.random() * regions));
  const lines = ['[global]', 'ioengine=nbd', `uri=${cluster.nodes[0]!.nbd}`, 'rw=write', 'bs=4k', 'size=4k', 'iodepth=1', 'refill_buffers=1'];
  for (const region of chosen) lines.push(`[r${region}]`, `offset=${region * MiB + Math.floor(Math.random() * 256) * 4096}`);
  const jobFile = path.join(cluster.workDir, 'regions.fio');
  await writeFile(jobFile, lines.join('\n') + '\n');
  execFileSync('fio', ['--output-format=terse', jobFile], { stdio: 'ignore', timeout: 600_000 });
  return count;
}

async function measure(config: Config, kind: RunResult['kind']): Promise<RunResult> {
  const cluster = await startUp({ nodes: 2, volume: 'bench', size: String(config.sizeBytes), extraArgs: ['--lease-ttl', '2000', '--failure-timeout', '1000'], readyTimeoutMs: 60_000 });
  try {
    progress(`${kind}: filling ${config.sizeBytes / MiB} MiB through n1`);
    await fioNbd(cluster.nodes[0]!.nbd, ['--name=fill', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${config.sizeBytes}`, '--end_fsync=1', '--refill_buffers'], { timeoutMs: 1_800_000 });
    progress(`${kind}: SIGKILL n2`);
    await cluster.kill(1);
    await waitUntil(async () => {
      const status = await volumeStatus(cluster, 0);
      return status !== undefined && !status.inSync.includes('n2');
    }, { timeoutMs: 60_000, what: 'n2 to leave the in-sync set' });
    const outageStarted = Date.now();
    const written = await writeRegions(cluster, config.sizeBytes, config.writtenFraction);
    progress(`${kind}: wrote 4 KiB into ${written} of ${config.sizeBytes / MiB} regions while n2 was away`);
    await sleep(Math.max(0, config.outageS * 1000 - (Date.now() - outageStarted)));
    if (kind === 'full copy') {
      // A replaced disk: n2 comes back with nothing.
      await rm(path.join(cluster.dir, 'n2', 'volumes'), { recursive: true, force: true });
    }
    const restarted = Date.now();
    await cluster.restart(1);
    await waitUntil(async () => (await volumeStatus(cluster, 1))?.replicaState === 'in-sync', { timeoutMs: 1_800_000, intervalMs: 100, what: 'n2 back in sync' });
    const seconds = (Date.now() - restarted) / 1000;
    const status = await volumeStatus(cluster, 1);
    const catchUpSeconds = status?.catchUp?.finishedAtMs ? (status.catchUp.finishedAtMs - status.catchUp.startedAtMs) / 1000 : NaN;
    return { kind, seconds, catchUpSeconds, bytesCopied: status?.catchUp?.bytesCopied ?? 0, bytesCompared: status?.catchUp?.bytesCompared ?? 0, mode: status?.catchUp?.mode ?? '?' };
  } finally {
    await cluster.stop();
  }
}

/** This machine's sequential read rate of a cold-ish file of the volume's size (dd, direct I/O). */
function diskReadMiBPerS(dir: string, sizeBytes: number): number {
  const file = path.join(dir, 'dd-probe.bin');
  execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `count=${Math.min(256, sizeBytes / MiB)}`, 'status=none']);
  const started = process.hrtime.bigint();
  execFileSync('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'iflag=direct', 'status=none']);
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  execFileSync('rm', ['-f', file]);
  return Math.min(256, sizeBytes / MiB) / seconds;
}

/** One TCP stream over 127.0.0.1: this machine's loopback rate (the other limit of a copy between nodes). */
async function loopbackMiBPerS(totalBytes = 1024 * MiB): Promise<number> {
  const server = net.createServer((socket) => socket.resume());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const chunk = Buffer.alloc(4 * MiB, 7);
  const started = process.hrtime.bigint();
  await new Promise<void>((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => {
      let sent = 0;
      const pump = (): void => {
        while (sent < totalBytes) {
          sent += chunk.length;
          if (!socket.write(chunk)) return void socket.once('drain', pump);
        }
        socket.end(resolve);
      };
      pump();
    });
    socket.on('error', reject);
  });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  server.close();
  return totalBytes / MiB / seconds;
}

async function main(): Promise<void> {
  const config = parseArgs(process.argv.slice(2));
  const results: RunResult[] = [];
  for (let run = 0; run < config.runs; run++) {
    results.push(await measure(config, 'catch-up'));
    results.push(await measure(config, 'full copy'));
  }
  const outDir = path.join(REPO_ROOT, 'bench', 'out');
  await mkdir(outDir, { recursive: true });
  const diskMiBPerS = diskReadMiBPerS(outDir, config.sizeBytes);
  const loopMiBPerS = await loopbackMiBPerS();
  const median = (kind: RunResult['kind']): RunResult => {
    const runs = results.filter((result) => result.kind === kind).sort((a, b) => a.seconds - b.seconds);
    return runs[Math.floor(runs.length / 2)]!;
  };
  const catchUp = median('catch-up');
  const full = median('full copy');
  const rate = (result: RunResult): number => result.bytesCompared / MiB / result.catchUpSeconds;
  const lines = [
    `| run (2 nodes, ${config.sizeBytes / MiB} MiB, ${config.outageS} s outage, ${config.writtenFraction * 100}% of regions written) | mode | restart → in sync, s | catch-up, s | MiB compared | MiB copied (sent) | compare rate MiB/s | vs disk read (${diskMiBPerS.toFixed(0)} MiB/s) | vs loopback (${loopMiBPerS.toFixed(0)} MiB/s) |`,
    '|---|---|---:|---:|---:|---:|---:|---:|---:|',
    ...[catchUp, full].map((result) => `| ${result.kind} | ${result.mode} | ${result.seconds.toFixed(2)} | ${result.catchUpSeconds.toFixed(2)} | ${(result.bytesCompared / MiB).toFixed(1)} | ${(result.bytesCopied / MiB).toFixed(1)} | ${rate(result).toFixed(0)} | ${(rate(result) / diskMiBPerS).toFixed(2)}× | ${(rate(result) / loopMiBPerS).toFixed(2)}× |`),
    '',
    `catch-up / full copy time: ${(catchUp.catchUpSeconds / full.catchUpSeconds).toFixed(3)} (target ≤ 0.05); restart → in sync: ${(catchUp.seconds / full.seconds).toFixed(3)}`,
  ];
  const date = new Date().toISOString();
  await writeFile(path.join(outDir, `catchup-${date.replace(/[:.]/g, '-')}.json`), JSON.stringify({ date, config, diskMiBPerS, loopMiBPerS, results }, null, 2) + '\n');
  process.stdout.write(`\n${lines.join('\n')}\n\n`);
}

main().catch((error: unknown) => {
  process.stderr.write(`[bench:catchup] failed: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
  process.exit(1);
});
