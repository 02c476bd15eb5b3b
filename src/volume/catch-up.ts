// Catch-up of a returning replica (issue 5, docs/replication.md "Catch-up"): the driver that
// runs on the replica while the coordinator's record lists it in `catchingUp`. By then every
// writer mirrors each new write to it (and waits for it), so what it lacks is only what was
// written before it joined. First a plan: the chunks the in-sync peers' dirty-region maps say
// it may lack (src/volume/dirty-regions.ts), or every chunk when they cannot tell (the log
// says why: a full comparison). The driver then walks the planned chunks:
//   1. digests of a batch of chunks here and on an in-sync peer, side by side (no grant needed:
//      a chunk equal now stays equal, because every later write reaches both; a chunk that
//      differs lacks something written before the join, which the peer has and this replica
//      does not);
//   2. each differing chunk is copied while holding its region's write grant (so no client
//      write can slip between the peer's read and this replica's write), through this node's
//      own mirrored write path: the copy is logged, ordered and durable like any write;
//   3. when the walk is done: a FLUSH (every copy durable everywhere), then the caller moves
//      this replica into the in-sync set by CAS.
// Copies are throttled to a byte rate; a failed batch (peer gone, link down) is retried after a
// pause, from the same offset. Each compared chunk is struck off the plan, which the volume
// saves: a catch-up interrupted by a restart resumes with what was left, plus whatever was
// written while it was away. Progress (percent, bytes, rate, ETA) is in status().
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../util/log.js';

/** Bytes compared per chunk; differing chunks are copied whole. */
export const CATCH_UP_CHUNK_BYTES_MAX = 1024 * 1024;
/** Chunks compared per digest request. */
const CHUNKS_PER_BATCH = 16;
/** Differing chunks copied at once. */
const COPIES_IN_FLIGHT = 4;
/** Pause before retrying a batch that failed. */
const RETRY_DELAY_MS = 500;

/** What the driver needs from the peers (supplied by the node: HTTP digests, NBD reads). */
export interface CatchUpPeerAccess {
  /** Digests (catchUpDigest) of consecutive `chunkBytes` chunks of [offset, offset+length) on `peer`. */
  digests(peer: string, offset: number, length: number, chunkBytes: number): Promise<string[]>;
  /** [offset, offset+length) as `peer` serves it. */
  read(peer: string, offset: number, length: number): Promise<Buffer>;
}

/** The chunks to compare (in `chunkBytes` units of the volume), and whether that is all of them. */
export interface CatchUpPlanResult {
  chunkBytes: number;
  /** Ascending chunk indexes. */
  chunks: number[];
  full: boolean;
  /** Why everything is compared (empty otherwise). */
  reason: string;
}

/** What the driver needs from its volume. */
export interface CatchUpVolume {
  readonly sizeBytes: number;
  /** What to compare (rejects while the peers cannot be asked: retried). */
  plan(): Promise<CatchUpPlanResult>;
  /** Chunk `chunk` of the plan was compared and, if it differed, copied. */
  verified(chunk: number): void;
  /** This replica's digests of the same chunks. */
  localDigests(offset: number, length: number, chunkBytes: number): Promise<string[]>;
  /** Holding the chunk's write grant: fetch the peer's bytes and write them here (mirrored) unless equal (`force`: even then). */
  copyUnderGrant(offset: number, length: number, fetch: () => Promise<Buffer>, force: boolean): Promise<'same' | 'copied'>;
  /** Makes every copy durable on every member. */
  flush(): Promise<void>;
  /** In-sync peers to copy from (never empty while catching up). */
  sourcesOfTruth(): string[];
}

export interface CatchUpProgress {
  state: 'planning' | 'copying' | 'flushing' | 'done' | 'stopped';
  /** `dirty-regions`: only what the peers' maps name; `full`: the whole volume (see fullReason). */
  mode: 'dirty-regions' | 'full' | null;
  fullReason: string | null;
  /** Bytes the plan names (the volume's size for a full comparison). */
  bytesPlanned: number;
  bytesTotal: number;
  bytesCompared: number;
  bytesCopied: number;
  chunksCopied: number;
  /** Chunks the in-sync peers themselves disagreed on (full comparisons ask them all): copied to every member. */
  chunksPeersDisagreed: number;
  percent: number;
  rateBytesPerSec: number;
  etaSeconds: number | null;
  startedAtMs: number;
  /** When everything was copied and flushed (null until then). */
  finishedAtMs: number | null;
  retries: number;
  lastError: string | null;
}

/** Consecutive planned chunks as byte ranges of the volume (the last chunk may be short). */
export function chunkRuns(plan: Pick<CatchUpPlanResult, 'chunkBytes' | 'chunks'>, sizeBytes: number): { offset: number; lengthBytes: number; firstChunk: number; lastChunk: number }[] {
  const runs: { offset: number; lengthBytes: number; firstChunk: number; lastChunk: number }[] = [];
  for (const chunk of plan.chunks) {
    const offset = chunk * plan.chunkBytes;
    if (offset >= sizeBytes) continue;
    const end = Math.min(sizeBytes, offset + plan.chunkBytes);
    const last = runs[runs.length - 1];
    if (last && last.lastChunk === chunk - 1) {
      last.lengthBytes = end - last.offset;
      last.lastChunk = chunk;
    } else {
      runs.push({ offset, lengthBytes: end - offset, firstChunk: chunk, lastChunk: chunk });
    }
  }
  return runs;
}

/** The digest both sides compute: SHA-256 of the chunk, first 16 bytes, hex. */
export function catchUpDigest(chunk: Buffer): string {
  return createHash('sha256').update(chunk).digest('hex').slice(0, 32);
}

/** Digests of consecutive `chunkBytes` chunks of `data` (the last may be shorter). */
export function digestChunks(data: Buffer, chunkBytes: number): string[] {
  const digests: string[] = [];
  for (let start = 0; start < data.length; start += chunkBytes) digests.push(catchUpDigest(data.subarray(start, Math.min(data.length, start + chunkBytes))));
  return digests;
}

export class CatchUpDriver {
  private readonly volume: CatchUpVolume;
  private readonly access: CatchUpPeerAccess;
  private readonly logger: Logger;
  private readonly chunkBytes: number;
  private readonly rateBytesPerSec: number;
  private stopped = false;
  private peerIndex = 0;
  /** Compare with every in-sync peer, not one (full comparisons). */
  private allPeers = false;
  /** Bytes let through the throttle so far (copies in flight included). */
  private bytesScheduled = 0;
  readonly progressValue: CatchUpProgress;

  constructor(volume: CatchUpVolume, access: CatchUpPeerAccess, options: { chunkBytes: number; rateBytesPerSec: number; logger: Logger }) {
    this.volume = volume;
    this.access = access;
    this.logger = options.logger;
    this.chunkBytes = options.chunkBytes;
    this.rateBytesPerSec = options.rateBytesPerSec;
    this.progressValue = {
      state: 'planning', mode: null, fullReason: null, bytesPlanned: 0, bytesTotal: volume.sizeBytes, bytesCompared: 0, bytesCopied: 0, chunksCopied: 0, chunksPeersDisagreed: 0,
      percent: 0, rateBytesPerSec: 0, etaSeconds: null, startedAtMs: Date.now(), finishedAtMs: null, retries: 0, lastError: null,
    };
  }

  /** Stops after the chunk under way (the replica left the catching-up set, or the volume closes). */
  stop(): void {
    this.stopped = true;
    if (this.progressValue.state !== 'done') this.progressValue.state = 'stopped';
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  /** Runs the walk to its end; resolves true when everything was compared, copied and flushed. */
  async run(): Promise<boolean> {
    const plan = await this.makePlan();
    if (!plan) return false;
    const progress = this.progressValue;
    const runs = chunkRuns(plan, this.volume.sizeBytes);
    progress.state = 'copying';
    this.allPeers = plan.full;
    progress.mode = plan.full ? 'full' : 'dirty-regions';
    progress.fullReason = plan.full ? plan.reason : null;
    progress.bytesPlanned = runs.reduce((sum, run) => sum + run.lengthBytes, 0);
    progress.bytesTotal = progress.bytesPlanned;
    if (plan.full) this.logger.warn('catch-up compares the whole volume', { reason: plan.reason, sizeBytes: this.volume.sizeBytes });
    this.logger.info('catch-up started', {
      mode: progress.mode,
      bytesPlanned: progress.bytesPlanned,
      chunks: plan.chunks.length,
      chunkBytes: this.chunkBytes,
      rateBytesPerSec: this.rateBytesPerSec || 'unlimited',
    });
    const batchBytes = this.chunkBytes * CHUNKS_PER_BATCH;
    let compared = 0;
    for (const run of runs) {
      let offset = run.offset;
      let nextChunk = run.firstChunk;
      const end = run.offset + run.lengthBytes;
      while (offset < end) {
        if (this.stopped) return false;
        const length = Math.min(batchBytes, end - offset);
        try {
          await this.batch(offset, length, plan.chunkBytes);
          offset += length;
          compared += length;
          progress.bytesCompared = compared;
          // Chunks wholly compared are struck off the plan.
          while (nextChunk <= run.lastChunk && Math.min(this.volume.sizeBytes, (nextChunk + 1) * plan.chunkBytes) <= offset) this.volume.verified(nextChunk++);
          this.updateRate();
        } catch (error) {
          if (this.stopped) return false;
          progress.bytesCompared = compared; // the batch is done again from its start
          this.noteRetry(error, offset);
          await sleep(RETRY_DELAY_MS, undefined, { ref: false });
        }
      }
    }
    progress.state = 'flushing';
    await this.volume.flush();
    if (this.stopped) return false;
    progress.state = 'done';
    progress.finishedAtMs = Date.now();
    progress.percent = 100;
    progress.etaSeconds = 0;
    this.logger.info('catch-up copied everything', {
      mode: progress.mode,
      bytesCompared: progress.bytesCompared,
      bytesCopied: progress.bytesCopied,
      seconds: Math.round((Date.now() - progress.startedAtMs) / 100) / 10,
    });
    return true;
  }

  /** Asks the volume for the plan until it has one (peers may be briefly unreachable); undefined: stopped. */
  private async makePlan(): Promise<CatchUpPlanResult | undefined> {
    for (;;) {
      if (this.stopped) return undefined;
      try {
        const plan = await this.volume.plan();
        return this.stopped ? undefined : plan;
      } catch (error) {
        if (this.stopped) return undefined;
        this.noteRetry(error, 0);
        await sleep(RETRY_DELAY_MS, undefined, { ref: false });
      }
    }
  }

  private noteRetry(error: unknown, offset: number): void {
    this.progressValue.retries++;
    this.progressValue.lastError = error instanceof Error ? error.message : String(error);
    this.peerIndex++;
    this.logger.warn(`catch-up ${this.progressValue.state === 'planning' ? 'planning' : 'batch'} failed; retrying`, { offset, error: this.progressValue.lastError });
  }

  /** Compares (and copies what differs of) [offset, offset+length); plan chunks done are struck off as they finish. */
  private async batch(offset: number, length: number, planChunkBytes: number): Promise<void> {
    // Struck off one by one when compare and plan chunks coincide (the usual case); otherwise
    // run() strikes plan chunks off once a batch passes their end.
    const done = (start: number): void => {
      if (planChunkBytes === this.chunkBytes) this.volume.verified(start / planChunkBytes);
      // Progress moves chunk by chunk (a throttled batch of 16 MiB would otherwise sit at one figure for long).
      this.progressValue.bytesCompared += Math.min(this.chunkBytes, offset + length - start);
      this.updateRate();
    };
    const peers = this.volume.sourcesOfTruth();
    if (peers.length === 0) throw new Error('no in-sync peer to copy from');
    const peer = peers[this.peerIndex % peers.length]!;
    // A full comparison asks every in-sync peer: where they disagree among themselves (a dead
    // writer's entry that reached some of them), the chunk is copied from one even if equal
    // here, and the mirrored copy makes them all equal again.
    const asked = this.allPeers ? peers : [peer];
    const [local, ...remotes] = await Promise.all([this.volume.localDigests(offset, length, this.chunkBytes), ...asked.map((node) => this.access.digests(node, offset, length, this.chunkBytes))]);
    const remote = remotes[asked.indexOf(peer)]!;
    for (const [at, answer] of remotes.entries()) {
      if (answer.length !== local.length) throw new Error(`peer ${asked[at]} sent ${answer.length} digests for ${local.length} chunks`);
    }
    const differing: { index: number; force: boolean }[] = [];
    for (let index = 0; index < local.length; index++) {
      const disagree = remotes.some((answer) => answer[index] !== remote[index]);
      if (disagree) this.progressValue.chunksPeersDisagreed++;
      if (disagree || remote[index] !== local[index]) differing.push({ index, force: disagree });
      else done(offset + index * this.chunkBytes);
    }
    // A few copies at once: each is a grant round trip, a read from the peer and a mirrored
    // write, so one at a time leaves the disks and the link mostly idle.
    let next = 0;
    let failure: unknown;
    const copyNext = async (): Promise<void> => {
      while (next < differing.length && failure === undefined && !this.stopped) {
        const { index, force } = differing[next++]!;
        const start = offset + index * this.chunkBytes;
        const chunkLength = Math.min(this.chunkBytes, offset + length - start);
        try {
          await this.throttle(chunkLength);
          const result = await this.volume.copyUnderGrant(start, chunkLength, () => this.access.read(peer, start, chunkLength), force);
          if (result === 'copied') {
            this.progressValue.bytesCopied += chunkLength;
            this.progressValue.chunksCopied++;
          }
          done(start);
        } catch (error) {
          failure ??= error;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(COPIES_IN_FLIGHT, differing.length) }, copyNext));
    if (failure !== undefined) throw failure;
  }

  /** Keeps copied bytes at or under the configured rate (0: unlimited). */
  private async throttle(nextBytes: number): Promise<void> {
    if (this.rateBytesPerSec <= 0) return;
    this.bytesScheduled += nextBytes;
    const elapsedMs = Date.now() - this.progressValue.startedAtMs;
    const allowedMs = (this.bytesScheduled / this.rateBytesPerSec) * 1000;
    if (allowedMs > elapsedMs) await sleep(allowedMs - elapsedMs, undefined, { ref: false });
  }

  private updateRate(): void {
    const progress = this.progressValue;
    const seconds = Math.max(0.001, (Date.now() - progress.startedAtMs) / 1000);
    progress.percent = Math.floor((progress.bytesCompared / Math.max(1, progress.bytesTotal)) * 1000) / 10;
    progress.rateBytesPerSec = Math.round(progress.bytesCompared / seconds);
    progress.etaSeconds = progress.rateBytesPerSec > 0 ? Math.ceil((progress.bytesTotal - progress.bytesCompared) / progress.rateBytesPerSec) : null;
  }
}

