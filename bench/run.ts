// Benchmark harness: the same fio (and libnbd FUA) workloads against mirrorsan and against
// nbdkit's file plugin on the same disk, reported side by side with the ratio. `npm run bench`;
// options in bench/README.md. Writes bench/out/results-<date>.json and prints a markdown table.
import { execFileSync } from 'node:child_process';
import { mkdir, open, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  PYTHON3, REPO_ROOT, fioNbd, makeTempDir, removeDir, run, startNbdkit, startUp,
} from '../test/helpers/index.js';
import type { FioDirection, FioReport, NbdkitServer, UpCluster } from '../test/helpers/index.js';

type ServerKind = 'nbdkit-file' | 'nbdkit-memory' | 'mirrorsan' | 'mirrorsan-2way' | 'mirrorsan-3way';
const SERVER_KINDS: readonly ServerKind[] = ['nbdkit-file', 'nbdkit-memory', 'mirrorsan', 'mirrorsan-2way', 'mirrorsan-3way'];
/** Nodes (= replicas) of each mirrorsan variant; all on this host, the client talks to n1. */
const MIRRORSAN_NODES: Partial<Record<ServerKind, number>> = { mirrorsan: 1, 'mirrorsan-2way': 2, 'mirrorsan-3way': 3 };
/** The baseline every ratio is taken against: unreplicated, same disk, same client. */
const BASELINE: ServerKind = 'nbdkit-file';

interface BenchConfig {
  runtimeS: number;
  rampS: number;
  sizeBytes: number;
  servers: ServerKind[];
  rows: string[] | undefined;
  outDir: string;
}

interface Workload {
  id: string;
  label: string;
  /** fio job arguments, or 'fua' for the libnbd FUA loop (fio's nbd engine cannot send FUA). */
  fio?: string[];
  direction: 'read' | 'write';
}

const WORKLOADS: readonly Workload[] = [
  { id: 'randread-4k-qd32', label: '4k random read QD32', fio: ['--rw=randread', '--bs=4k', '--iodepth=32'], direction: 'read' },
  { id: 'randwrite-4k-qd32', label: '4k random write QD32', fio: ['--rw=randwrite', '--bs=4k', '--iodepth=32'], direction: 'write' },
  { id: 'seqread-1m-qd8', label: '1 MiB sequential read QD8', fio: ['--rw=read', '--bs=1M', '--iodepth=8'], direction: 'read' },
  { id: 'seqwrite-1m-qd8', label: '1 MiB sequential write QD8', fio: ['--rw=write', '--bs=1M', '--iodepth=8'], direction: 'write' },
  { id: 'write-fua-4k-qd1', label: '4k random write+FUA QD1 (libnbd)', direction: 'write' },
  { id: 'write-flush-4k-qd1', label: '4k random write, FLUSH after each (fio fsync=1) QD1', fio: ['--rw=randwrite', '--bs=4k', '--iodepth=1', '--fsync=1'], direction: 'write' },
];

interface Measurement {
  iops: number;
  mibPerS: number;
  latencyP50Us: number;
  latencyP99Us: number;
  latencyMeanUs: number;
  /** For write+FLUSH: the FLUSH latencies, which fio reports apart from the writes. */
  flushP50Us?: number;
  flushP99Us?: number;
}

interface ResultRow {
  workload: string;
  label: string;
  server: ServerKind;
  measurement: Measurement;
  /** IOPS of this server over the baseline's, same workload. */
  ratioToBaseline?: number;
}

interface Target {
  kind: ServerKind;
  uri: string;
  stop(): Promise<void>;
}

function usage(): never {
  process.stderr.write(`usage: node dist/bench/run.js [--runtime S] [--ramp S] [--size SIZE] [--servers a,b] [--rows id,id] [--out DIR]
  --runtime S   seconds per measured run (env BENCH_RUNTIME_S, default 8)
  --ramp S      unmeasured warm-up seconds per run (env BENCH_RAMP_S, default 2)
  --size SIZE   volume/file size, e.g. 1GiB (env BENCH_SIZE, default 1GiB)
  --servers     any of ${SERVER_KINDS.join(', ')} (env BENCH_SERVERS, default nbdkit-file,mirrorsan)
  --rows        subset of ${WORKLOADS.map((w) => w.id).join(', ')}
  --out DIR     where results-<date>.json goes (default bench/out)
`);
  process.exit(2);
}

function parseSizeBytes(text: string): number {
  const match = /^(\d+)\s*(|b|k|kib|m|mib|g|gib)$/i.exec(text.trim());
  if (!match) throw new Error(`cannot parse size ${text}`);
  const unit = (match[2] ?? '').toLowerCase();
  const multiplier = unit.startsWith('k') ? 1024 : unit.startsWith('m') ? 1024 ** 2 : unit.startsWith('g') ? 1024 ** 3 : 1;
  return Number(match[1]) * multiplier;
}

function parseArgs(argv: readonly string[]): BenchConfig {
  const config: BenchConfig = {
    runtimeS: Number(process.env.BENCH_RUNTIME_S ?? 8),
    rampS: Number(process.env.BENCH_RAMP_S ?? 2),
    sizeBytes: parseSizeBytes(process.env.BENCH_SIZE ?? '1GiB'),
    servers: (process.env.BENCH_SERVERS ?? `${BASELINE},mirrorsan`).split(',') as ServerKind[],
    rows: undefined,
    outDir: path.join(REPO_ROOT, 'bench', 'out'),
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (flag === '--help' || flag === '-h') usage();
    if (value === undefined) usage();
    if (flag === '--runtime') config.runtimeS = Number(value);
    else if (flag === '--ramp') config.rampS = Number(value);
    else if (flag === '--size') config.sizeBytes = parseSizeBytes(value);
    else if (flag === '--servers') config.servers = value.split(',') as ServerKind[];
    else if (flag === '--rows') config.rows = value.split(',');
    else if (flag === '--out') config.outDir = path.resolve(value);
    else usage();
    i++;
  }
  for (const server of config.servers) if (!SERVER_KINDS.includes(server)) usage();
  for (const row of config.rows ?? []) if (!WORKLOADS.some((w) => w.id === row)) usage();
  if (!(config.runtimeS > 0) || !(config.rampS >= 0)) usage();
  if (config.sizeBytes < 64 * 1024 * 1024 || config.sizeBytes % (1024 * 1024) !== 0) throw new Error('--size must be a whole number of MiB, at least 64MiB');
  return config;
}

const progress = (message: string): void => {
  process.stderr.write(`[bench] ${message}\n`);
};

async function startTarget(kind: ServerKind, config: BenchConfig, workDir: string): Promise<Target> {
  const nodes = MIRRORSAN_NODES[kind];
  if (nodes !== undefined) {
    const cluster: UpCluster = await startUp({ nodes, volume: 'bench', size: String(config.sizeBytes), readyTimeoutMs: 60_000 });
    return {
      kind,
      uri: cluster.nodes[0]!.nbd,
      stop: async () => {
        await cluster.stop();
      },
    };
  }
  let server: NbdkitServer;
  if (kind === 'nbdkit-file') {
    // A fresh sparse file beside mirrorsan's data dir (both under os.tmpdir()): same disk.
    const imagePath = path.join(workDir, 'nbdkit-file.img');
    const image = await open(imagePath, 'w');
    await image.truncate(config.sizeBytes);
    await image.close();
    server = await startNbdkit({ plugin: ['file', imagePath] });
  } else {
    server = await startNbdkit({ plugin: ['memory', String(config.sizeBytes)] });
  }
  return { kind, uri: server.uri(), stop: () => server.stop() };
}

function percentileUs(direction: { lat_ns: FioDirection['lat_ns']; clat_ns: FioDirection['clat_ns'] }, key: string): number {
  const ns = direction.lat_ns.percentile?.[key] ?? direction.clat_ns.percentile?.[key];
  if (ns === undefined) throw new Error(`fio report lacks the ${key} percentile`);
  return ns / 1000;
}

function fromFio(report: FioReport, direction: 'read' | 'write'): Measurement {
  const job = report.jobs[0];
  if (!job) throw new Error('fio report has no job');
  const side = job[direction];
  const measurement: Measurement = {
    iops: side.iops,
    mibPerS: side.bw_bytes / (1024 * 1024),
    latencyP50Us: percentileUs(side, '50.000000'),
    latencyP99Us: percentileUs(side, '99.000000'),
    latencyMeanUs: side.lat_ns.mean / 1000,
  };
  if (job.sync.total_ios > 0 && job.sync.lat_ns.percentile) {
    measurement.flushP50Us = (job.sync.lat_ns.percentile['50.000000'] ?? 0) / 1000;
    measurement.flushP99Us = (job.sync.lat_ns.percentile['99.000000'] ?? 0) / 1000;
  }
  return measurement;
}

async function measure(target: Target, workload: Workload, config: BenchConfig): Promise<Measurement> {
  if (!workload.fio) {
    const result = await run(PYTHON3, [path.join(REPO_ROOT, 'bench', 'fua_qd1.py'), target.uri, String(config.runtimeS), String(config.rampS), String(config.sizeBytes)], {
      timeoutMs: (config.runtimeS + config.rampS + 60) * 1000,
    });
    if (result.code !== 0) throw new Error(`fua_qd1.py against ${target.kind} failed:\n${result.stdout}${result.stderr}`);
    const parsed = JSON.parse(result.stdout.trim()) as Measurement & { ops: number };
    return {
      iops: parsed.iops,
      mibPerS: parsed.mibPerS,
      latencyP50Us: parsed.latencyP50Us,
      latencyP99Us: parsed.latencyP99Us,
      latencyMeanUs: parsed.latencyMeanUs,
    };
  }
  const report = await fioNbd(target.uri, [
    `--name=${workload.id}`, ...workload.fio, `--size=${config.sizeBytes}`,
    '--time_based', `--runtime=${config.runtimeS}`, `--ramp_time=${config.rampS}`,
    '--lat_percentiles=1', '--norandommap', '--randrepeat=0',
  ], { timeoutMs: (config.runtimeS + config.rampS + 120) * 1000 });
  return fromFio(report, workload.direction);
}

/** Writes every byte once so reads hit allocated data, not holes that servers answer without I/O. */
async function fill(target: Target, config: BenchConfig): Promise<{ seconds: number; mibPerS: number }> {
  const started = Date.now();
  await fioNbd(target.uri, [
    '--name=fill', '--rw=write', '--bs=1M', '--iodepth=8', `--size=${config.sizeBytes}`, '--end_fsync=1', '--refill_buffers',
  ], { timeoutMs: 30 * 60 * 1000 });
  const seconds = (Date.now() - started) / 1000;
  return { seconds, mibPerS: config.sizeBytes / (1024 * 1024) / seconds };
}

function commandOutput(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  } catch {
    return 'unavailable';
  }
}

async function machineInfo(): Promise<Record<string, string | number>> {
  const cpuinfo = await readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  return {
    nproc: Number(commandOutput('nproc', [])) || os.availableParallelism(),
    cpuModel: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown',
    memory: commandOutput('free', ['-h']),
    kernel: os.release(),
    node: process.version,
    fio: commandOutput('fio', ['--version']),
    nbdkit: commandOutput('nbdkit', ['--version']),
    libnbd: commandOutput('nbdinfo', ['--version']).split('\n').at(-1) ?? 'unknown',
    disk: commandOutput('df', ['-h', os.tmpdir()]).split('\n').at(-1) ?? 'unknown',
  };
}

const fmt = (value: number, digits = 0): string =>
  value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

export function markdownTable(rows: readonly ResultRow[]): string {
  const lines = [
    `| workload | server | IOPS | MiB/s | p50 µs | p99 µs | IOPS vs ${BASELINE} |`,
    '|---|---|---:|---:|---:|---:|---:|',
  ];
  for (const row of rows) {
    const m = row.measurement;
    const latency = (p50: number, p99: number, flush50?: number, flush99?: number): [string, string] =>
      flush50 === undefined || flush99 === undefined
        ? [fmt(p50), fmt(p99)]
        : [`${fmt(p50)} + ${fmt(flush50)}`, `${fmt(p99)} + ${fmt(flush99)}`];
    const [p50, p99] = latency(m.latencyP50Us, m.latencyP99Us, m.flushP50Us, m.flushP99Us);
    const ratio = row.server === BASELINE || row.ratioToBaseline === undefined ? '' : `${fmt(row.ratioToBaseline, 2)}×`;
    lines.push(`| ${row.label} | ${row.server} | ${fmt(m.iops)} | ${fmt(m.mibPerS, 1)} | ${p50} | ${p99} | ${ratio} |`);
  }
  return lines.join('\n');
}

async function main(): Promise<void> {
  const config = parseArgs(process.argv.slice(2));
  const workloads = WORKLOADS.filter((w) => !config.rows || config.rows.includes(w.id));
  const workDir = await makeTempDir('bench');
  const targets: Target[] = [];
  let stopping = false;
  const cleanup = async (): Promise<void> => {
    if (stopping) return;
    stopping = true;
    for (const target of targets) await target.stop().catch(() => {});
    await removeDir(workDir);
  };
  // Ctrl-C must not leave a mirrorsan or nbdkit behind.
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      void cleanup().then(() => process.exit(130));
    });
  }
  try {
    const fills: Record<string, { seconds: number; mibPerS: number }> = {};
    for (const kind of config.servers) {
      progress(`starting ${kind}`);
      const target = await startTarget(kind, config, workDir);
      targets.push(target);
      progress(`filling ${kind} (${target.uri}) with ${config.sizeBytes / (1024 * 1024)} MiB`);
      fills[kind] = await fill(target, config);
      progress(`filled ${kind} in ${fmt(fills[kind].seconds, 1)} s (${fmt(fills[kind].mibPerS)} MiB/s)`);
    }
    const results: ResultRow[] = [];
    for (const workload of workloads) {
      // Servers alternate per workload, so slow drift of the machine hits both alike.
      for (const target of targets) {
        progress(`${workload.label} on ${target.kind} (${config.rampS} s ramp + ${config.runtimeS} s)`);
        const measurement = await measure(target, workload, config);
        results.push({ workload: workload.id, label: workload.label, server: target.kind, measurement });
        progress(`  ${fmt(measurement.iops)} IOPS, ${fmt(measurement.mibPerS, 1)} MiB/s, p50 ${fmt(measurement.latencyP50Us)} µs, p99 ${fmt(measurement.latencyP99Us)} µs`);
      }
    }
    for (const row of results) {
      const baseline = results.find((r) => r.workload === row.workload && r.server === BASELINE);
      if (baseline && baseline.measurement.iops > 0) row.ratioToBaseline = row.measurement.iops / baseline.measurement.iops;
    }
    const date = new Date().toISOString();
    const report = {
      date,
      machine: await machineInfo(),
      config: { runtimeS: config.runtimeS, rampS: config.rampS, sizeBytes: config.sizeBytes, servers: config.servers },
      notes: [
        'fio ioengine=nbd (libnbd), one job, co-located with the servers on loopback.',
        'Volumes/files are filled with 1 MiB sequential writes first, so reads hit data.',
        'write+FUA: fio\'s nbd engine cannot set FUA, so bench/fua_qd1.py (python3-libnbd) times each 4 KiB pwrite with CMD_FLAG_FUA.',
        'write+FLUSH: fio fsync=1 sends a separate FLUSH after each write; latency shown as write + flush.',
        `Ratios are IOPS over ${BASELINE} (nbdkit file plugin on a sparse file on the same disk).`,
      ],
      fill: fills,
      results,
    };
    await mkdir(config.outDir, { recursive: true });
    const outPath = path.join(config.outDir, `results-${date.replace(/[:.]/g, '-')}.json`);
    await writeFile(outPath, JSON.stringify(report, null, 2) + '\n');
    process.stdout.write(`\n${markdownTable(results)}\n\n`);
    progress(`wrote ${outPath}`);
  } finally {
    await cleanup();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`[bench] failed: ${error instanceof Error ? error.stack ?? error.message : String(error)}\n`);
  process.exit(1);
});
