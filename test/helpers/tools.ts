// Thin wrappers over the real NBD clients, parsing what they print, so tests read as
// statements about the server rather than about command lines.
import os from 'node:os';
import path from 'node:path';
import { FIXTURES_DIR, PYTHON3, describeCommand, run, runOk, tail } from './process.js';
import type { RunOptions, RunResult } from './process.js';

/** Features `nbdinfo --can` knows; it exits 0 when the server can, 2 when it cannot. */
export type NbdinfoFeature = 'connect' | 'flush' | 'fua' | 'trim' | 'zero' | 'df' | 'cache' | 'fast-zero' | 'multi-conn' | 'structured-reply';

export async function nbdinfoCan(feature: NbdinfoFeature, uri: string): Promise<boolean> {
  const result = await run('nbdinfo', ['--can', feature, uri], { timeoutMs: 15_000 });
  if (result.code === 0) return true;
  if (result.code === 2) return false;
  throw new Error(`nbdinfo --can ${feature} ${uri} failed (${result.code}): ${tail(result.stderr)}`);
}

/** One extent of `nbdinfo --map --json`: type bit 0 = hole, bit 1 = zero. */
export interface MapExtent {
  offset: number;
  length: number;
  type: number;
  description: string;
}

export async function nbdinfoMap(uri: string): Promise<MapExtent[]> {
  const result = await runOk('nbdinfo', ['--map', '--json', uri], { timeoutMs: 30_000 });
  return JSON.parse(result.stdout) as MapExtent[];
}

/** One entry of `qemu-img map --output=json`. */
export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export async function qemuImgMap(uri: string): Promise<QemuMapEntry[]> {
  const result = await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri], { timeoutMs: 30_000 });
  return JSON.parse(result.stdout) as QemuMapEntry[];
}

/** The extents of a map that cover byte `offset` (assumes ascending, contiguous extents). */
export function extentAt<T extends { length: number }>(extents: readonly T[], offset: number, startOf: (e: T) => number): T | undefined {
  return extents.find((e) => startOf(e) <= offset && offset < startOf(e) + e.length);
}

/** Runs test/fixtures/NAME with Debian's python3 (the one with the `nbd` module). */
export async function runPythonFixture(name: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return await run(PYTHON3, [path.join(FIXTURES_DIR, name), ...args], { timeoutMs: 60_000, ...options });
}

/** Parses fio's JSON output, which fio's nbd engine prefixes with a "connected" line. */
export function parseFioJson(stdout: string): FioReport {
  const start = stdout.indexOf('{');
  if (start === -1) throw new Error(`fio printed no JSON:\n${tail(stdout)}`);
  return JSON.parse(stdout.slice(start)) as FioReport;
}

export interface FioLatency {
  min: number;
  max: number;
  mean: number;
  N: number;
  percentile?: Record<string, number>;
}

export interface FioDirection {
  io_bytes: number;
  bw_bytes: number;
  iops: number;
  runtime: number;
  total_ios: number;
  clat_ns: FioLatency;
  lat_ns: FioLatency;
}

export interface FioJob {
  jobname: string;
  error: number;
  read: FioDirection;
  write: FioDirection;
  sync: { total_ios: number; lat_ns: FioLatency };
}

export interface FioReport {
  'fio version': string;
  jobs: FioJob[];
}

/**
 * fio saves a `local-<job>-<n>-verify.state` file into its working directory after verify
 * jobs; never let it litter the repository (and run it from the temp dir besides).
 */
export const FIO_NO_STATE_FILES = ['--verify_state_save=0'] as const;

/** Runs fio with the nbd engine against `uri`; throws with fio's output unless it exits 0. */
export async function fioNbd(uri: string, jobArgs: readonly string[], options: RunOptions = {}): Promise<FioReport> {
  const args = ['--ioengine=nbd', `--uri=${uri}`, '--output-format=json', ...FIO_NO_STATE_FILES, ...jobArgs];
  const result = await run('fio', args, { timeoutMs: 120_000, cwd: os.tmpdir(), ...options });
  if (result.code !== 0) {
    throw new Error(`${describeCommand('fio', args)} exited ${result.code ?? result.signal}\n${tail(result.stdout)}\n${tail(result.stderr)}`);
  }
  const report = parseFioJson(result.stdout);
  for (const job of report.jobs) {
    if (job.error !== 0) throw new Error(`fio job ${job.jobname} reported error ${job.error}\n${tail(result.stderr)}`);
  }
  return report;
}
