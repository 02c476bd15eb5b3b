// Active-active benchmark (issue 4): 4k random writes QD32 from one writer, from two writers on
// two nodes on disjoint halves of the volume, and from two writers on the same range
// (contended), at several region sizes, beside nbdkit's file plugin with one writer in the same
// run. `npm run bench:policing`; options in bench/README.md. Prints a markdown table and writes
// bench/out/policing-<date>.json.
import { mkdir, open, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { REPO_ROOT, fioNbd, makeTempDir, removeDir, startNbdkit, startUp } from '../test/helpers/index.js';
import type { FioReport } from '../test/helpers/index.js';

interface Config {
  runtimeS: number;
  rampS: number;
  sizeBytes: number;
  replicas: number;
  regionSizes: string[];
  outDir: string;
}

/** One fio job's side of a run. */
interface JobResult {
  iops: number;
  latencyP50Us: number;
  latencyP99Us: number;
}

interface Row {
  scenario: 'nbdkit-file 1 writer' | 'single writer' | 'two writers, disjoint' | 'two writers, contended';
  regionSize: string;
  jobs: JobResult[];
  aggregateIops: number;
  /** Aggregate over the single writer of the same region size and replication factor. */
  ratioToSingleWriter?: number;
  /** Grant releases during the run, summed over the nodes (a release = a grant changed hands). */
  grantReleases?: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;

function usage(): never {
  process.stderr.write(`usage: node dist/bench/policing.js [--runtime S] [--ramp S] [--size SIZE] [--replicas N] [--region-sizes a,b]
  --runtime S        measured seconds per run (default 6)
  --ramp S           unmeasured warm-up seconds per run (default 1)
  --size SIZE        volume size in MiB or GiB, e.g. 256MiB (default 256MiB)
  --replicas N       nodes (= replicas), 2 or 3 (default 2); writers run on n1 and n2
  --region-sizes L   region sizes to compare, e.g. 64KiB,1MiB,16MiB,single (default 64KiB,1MiB,16MiB)
`);
  process.exit(2);
}

function parseSizeBytes(text: string): number {
  const match = /^(\d+)\s*(|k|kib|m|mib|g|gib)$/i.exec(text.trim());
  if (!match) usage();
  const unit = (match[2] ?? '').toLowerCase();
  return Number(match[1]) * (unit.startsWith('k') ? KiB : unit.startsWith('m') ? MiB : unit.startsWith('g') ? 1024 * MiB : 1);
}

function parseArgs(argv: readonly string[]): Config {
  const config: Config = { runtimeS: 6, rampS: 1, sizeBytes: 256 * MiB, replicas: 2, regionSizes: ['64KiB', '1MiB', '16MiB'], outDir: path.join(REPO_ROOT, 'bench', 'out') };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) usage();
    if (flag === '--runtime') config.runtimeS = Number(value);
    else if (flag === '--ramp') config.rampS = Number(value);
    else if (flag === '--size') config.sizeBytes = parseSizeBytes(value);
    else if (flag === '--replicas') config.replicas = Number(value);
    else if (flag === '--region-sizes') config.regionSizes = value.split(',');
    else usage();
  }
  if (!(config.runtimeS > 0) || !(config.rampS >= 0) || ![2, 3].includes(config.replicas) || config.sizeBytes % MiB !== 0) usage();
  return config;
}

const progress = (message: string): void => {
  process.stderr.write(`[bench:policing] ${message}\n`);
};

function jobResult(report: FioReport): JobResult {
  const job = report.jobs[0];
  if (!job) throw new Error('fio report has no job');
  const percentile = (key: string): number => (job.write.lat_ns.percentile?.[key] ?? job.write.clat_ns.percentile?.[key] ?? 0) / 1000;
  return { iops: job.write.iops, latencyP50Us: percentile('50.000000'), latencyP99Us: percentile('99.000000') };
}

/** 4k random writes QD32 over [offset, offset + size) for the configured time. */
function randomWrite(uri: string, config: Config, offsetBytes: number, sizeBytes: number): Promise<FioReport> {
  return fioNbd(uri, [
    '--name=randwrite', '--rw=randwrite', '--bs=4k', '--iodepth=32', `--offset=${offsetBytes}`, `--size=${sizeBytes}`,
    '--time_based', `--runtime=${config.runtimeS}`, `--ramp_time=${config.rampS}`, '--lat_percentiles=1', '--norandommap', '--randrepeat=0',
  ], { timeoutMs: (config.runtimeS + config.rampS + 120) * 1000 });
}

async function releases(admins: readonly string[]): Promise<number> {
  let total = 0;
  for (const admin of admins) {
    const status = (await (await fetch(`${admin}/v1/status`)).json()) as { replicatedVolumes: { counters: { releaseSyncs: number } }[] };
    total += status.replicatedVolumes[0]?.counters.releaseSyncs ?? 0;
  }
  return total;
}

function aggregate(scenario: Row['scenario'], regionSize: string, reports: FioReport[]): Row {
  const jobs = reports.map(jobResult);
  return { scenario, regionSize, jobs, aggregateIops: jobs.reduce((sum, job) => sum + job.iops, 0) };
}

async function measureNbdkit(config: Config, workDir: string): Promise<Row> {
  const imagePath = path.join(workDir, 'nbdkit-file.img');
  const image = await open(imagePath, 'w');
  await image.truncate(config.sizeBytes);
  await image.close();
  const server = await startNbdkit({ plugin: ['file', imagePath] });
  try {
    await fioNbd(server.uri(), ['--name=fill', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${config.sizeBytes}`, '--end_fsync=1'], { timeoutMs: 600_000 });
    return aggregate('nbdkit-file 1 writer', '-', [await randomWrite(server.uri(), config, 0, config.sizeBytes)]);
  } finally {
    await server.stop();
  }
}

async function measureRegionSize(config: Config, regionSize: string): Promise<Row[]> {
  const cluster = await startUp({ nodes: config.replicas, volume: 'bench', size: String(config.sizeBytes), extraArgs: ['--region-size', regionSize], readyTimeoutMs: 60_000 });
  try {
    const [n1, n2] = [cluster.nodes[0]!.nbd, cluster.nodes[1]!.nbd];
    const admins = cluster.nodes.map((node) => node.admin);
    progress(`region size ${regionSize}: filling through n1`);
    await fioNbd(n1, ['--name=fill', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${config.sizeBytes}`, '--end_fsync=1'], { timeoutMs: 600_000 });
    const half = config.sizeBytes / 2;
    const rows: Row[] = [];
    const runs: [Row['scenario'], () => Promise<FioReport>[]][] = [
      ['single writer', () => [randomWrite(n1, config, 0, config.sizeBytes)]],
      ['two writers, disjoint', () => [randomWrite(n1, config, 0, half), randomWrite(n2, config, half, half)]],
      ['two writers, contended', () => [randomWrite(n1, config, 0, config.sizeBytes), randomWrite(n2, config, 0, config.sizeBytes)]],
    ];
    for (const [scenario, start] of runs) {
      if (scenario === 'two writers, disjoint') {
        // The fill left every grant with n1: n2 first takes its half's grants (one sequential
        // pass), so the run measures writers that keep their grants, not the hand-over.
        progress(`region size ${regionSize}: n2 takes the grants of its half`);
        await fioNbd(n2, ['--name=warm', '--rw=write', '--bs=1M', '--iodepth=4', `--offset=${half}`, `--size=${half}`], { timeoutMs: 600_000 });
      }
      progress(`region size ${regionSize}: ${scenario}`);
      const before = await releases(admins);
      const row = aggregate(scenario, regionSize, await Promise.all(start()));
      row.grantReleases = (await releases(admins)) - before;
      rows.push(row);
    }
    const single = rows[0]!.aggregateIops;
    for (const row of rows) row.ratioToSingleWriter = single > 0 ? row.aggregateIops / single : 0;
    return rows;
  } finally {
    await cluster.stop();
  }
}

const fmt = (value: number, digits = 0): string => value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

function markdownTable(rows: readonly Row[], replicas: number): string {
  const lines = [
    `| region size | scenario (${replicas}-way, 4k randwrite QD32 per writer) | aggregate IOPS | per writer IOPS | p50 µs | p99 µs | vs single writer | grant releases |`,
    '|---|---|---:|---:|---:|---:|---:|---:|',
  ];
  for (const row of rows) {
    const perWriter = row.jobs.map((job) => fmt(job.iops)).join(' + ');
    const p50 = row.jobs.map((job) => fmt(job.latencyP50Us)).join(' / ');
    const p99 = row.jobs.map((job) => fmt(job.latencyP99Us)).join(' / ');
    const ratio = row.ratioToSingleWriter === undefined ? '' : `${fmt(row.ratioToSingleWriter, 2)}×`;
    lines.push(`| ${row.regionSize} | ${row.scenario} | ${fmt(row.aggregateIops)} | ${perWriter} | ${p50} | ${p99} | ${ratio} | ${row.grantReleases ?? ''} |`);
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const config = parseArgs(process.argv.slice(2));
  const workDir = await makeTempDir('bench-policing');
  try {
    progress('nbdkit-file, one writer (baseline)');
    const rows: Row[] = [await measureNbdkit(config, workDir)];
    for (const regionSize of config.regionSizes) rows.push(...(await measureRegionSize(config, regionSize)));
    const date = new Date().toISOString();
    await mkdir(config.outDir, { recursive: true });
    const outPath = path.join(config.outDir, `policing-${date.replace(/[:.]/g, '-')}.json`);
    await writeFile(outPath, JSON.stringify({ date, config, rows }, null, 2) + '\n');
    process.stdout.write(`\n${markdownTable(rows, config.replicas)}\n\n`);
    progress(`wrote ${outPath}`);
  } finally {
    await removeDir(workDir);
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`[bench:policing] failed: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
  process.exit(1);
});
