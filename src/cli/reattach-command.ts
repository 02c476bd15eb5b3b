// `mirrorsan volume reattach NAME`: asks a node whose disk for NAME failed (it is diskless,
// forwarding its clients' I/O to an in-sync peer) to open its local replica again. The replica
// then catches up and the node serves from it once it is back in the in-sync set; `--wait`
// follows that through /v1/status until it is done.
import fs from 'node:fs';
import path from 'node:path';
import { ERROR_CODES, MirrorsanError, type ErrorCode } from '../errors.js';
import { validateVolumeName } from '../node/config.js';

export interface ReattachOptions {
  /** Admin URL of the node (default http://127.0.0.1:11009). */
  admin?: string;
  /** Node id: its admin URL is read from DIR/<id>/node.json (as `mirrorsan up` wrote it). */
  node?: string;
  dir: string;
  wait?: boolean;
  /** With --wait: give up after this many seconds. */
  timeout?: string;
  json?: boolean;
}

const DEFAULT_ADMIN_URL = 'http://127.0.0.1:11009';
const WAIT_POLL_INTERVAL_MS = 500;
const DEFAULT_WAIT_TIMEOUT_S = 600;

/** The admin URL of `node`, from the config `mirrorsan up` wrote under `dir`. */
export function adminUrlOfNode(dir: string, node: string): string {
  const file = path.join(dir, node, 'node.json');
  let config: { admin?: { host?: string; port?: number } };
  try {
    config = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof config;
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `cannot read node ${node}'s config ${file}: ${(error as Error).message}`);
  }
  const host = config.admin?.host ?? '127.0.0.1';
  const port = config.admin?.port;
  if (typeof port !== 'number') throw new MirrorsanError('CONFIG_INVALID', `${file} has no admin port`);
  const wildcard = host === '0.0.0.0' || host === '::';
  return `http://${wildcard ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host}:${port}`;
}

function errorCodeOf(code: unknown): ErrorCode {
  return typeof code === 'string' && code in ERROR_CODES ? (code as ErrorCode) : 'CONFIG_INVALID';
}

export async function runVolumeReattach(name: string, options: ReattachOptions): Promise<void> {
  validateVolumeName(name);
  const admin = options.node ? adminUrlOfNode(options.dir, options.node) : (options.admin ?? DEFAULT_ADMIN_URL);
  const url = new URL(`/v1/volumes/${encodeURIComponent(name)}/reattach`, admin);
  let answer: { node?: string; mode?: string; changed?: boolean; error?: string; code?: string };
  let httpStatus: number;
  try {
    const response = await fetch(url, { method: 'POST', signal: AbortSignal.timeout(60_000) });
    httpStatus = response.status;
    answer = (await response.json()) as typeof answer;
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `cannot reach ${url}: ${(error as Error).message}`);
  }
  if (httpStatus !== 200) throw new MirrorsanError(errorCodeOf(answer.code), `re-attach of ${name} refused (HTTP ${httpStatus}): ${answer.error ?? 'no reason given'}`);
  const node = answer.node ?? admin;
  if (!options.json) {
    const what = answer.changed
      ? `${name} on ${node}: re-attaching: the local replica reopened and catches up; I/O stays forwarded until it is in sync`
      : `${name} on ${node}: nothing to re-attach (${answer.mode})`;
    process.stdout.write(what + '\n');
  }
  if (!options.wait) {
    if (options.json) process.stdout.write(JSON.stringify(answer) + '\n');
    return;
  }
  const timeoutS = options.timeout === undefined ? DEFAULT_WAIT_TIMEOUT_S : Number(options.timeout);
  if (!Number.isFinite(timeoutS) || timeoutS <= 0) throw new MirrorsanError('CONFIG_INVALID', `--timeout must be a positive number of seconds, got ${options.timeout}`);
  const deadlineMs = Date.now() + timeoutS * 1000;
  let last = '';
  for (;;) {
    const state = await volumeState(admin, name);
    if (state.replicaState === 'in-sync' && state.diskless === null) break;
    const line = `${state.replicaState}${state.diskless ? ` (${state.diskless.mode})` : ''}${state.percent !== undefined ? ` ${state.percent}%` : ''}`;
    if (!options.json && line !== last) process.stdout.write(`${name} on ${node}: ${line}\n`);
    last = line;
    if (state.diskless?.mode === 'diskless' && state.diskless.reattachError) {
      throw new MirrorsanError('STORE_IO', `re-attach of ${name} on ${node} failed: ${state.diskless.reattachError}`);
    }
    if (Date.now() > deadlineMs) throw new MirrorsanError('CONFIG_INVALID', `${name} on ${node} is not in sync after ${timeoutS} s (${line})`);
    await new Promise((resolve) => setTimeout(resolve, WAIT_POLL_INTERVAL_MS));
  }
  process.stdout.write(options.json ? JSON.stringify({ ...answer, mode: 'attached', inSync: true }) + '\n' : `${name} on ${node}: in sync; served from the local replica again\n`);
}

interface VolumeState {
  replicaState: string;
  diskless: { mode: string; reattachError: string | null } | null;
  percent: number | undefined;
}

async function volumeState(admin: string, name: string): Promise<VolumeState> {
  const url = new URL('/v1/status', admin);
  const response = await fetch(url, { signal: AbortSignal.timeout(5000) });
  if (!response.ok) throw new MirrorsanError('CONFIG_INVALID', `cannot read ${url}: HTTP ${response.status}`);
  const status = (await response.json()) as { replicatedVolumes?: { name: string; replicaState: string; diskless?: VolumeState['diskless']; catchUp?: { percent?: number } | null }[] };
  const volume = status.replicatedVolumes?.find((candidate) => candidate.name === name);
  if (!volume) throw new MirrorsanError('VOLUME_NOT_FOUND', `${admin} serves no replicated volume ${name}`);
  return { replicaState: volume.replicaState, diskless: volume.diskless ?? null, percent: volume.catchUp?.percent };
}
