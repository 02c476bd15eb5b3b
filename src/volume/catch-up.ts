// Catch-up of a returning replica (issue 5, docs/replication.md "Catch-up"): the driver that
// runs on the replica while the coordinator's record lists it in `catchingUp`. By then every
// writer mirrors each new write to it (and waits for it), so what it lacks is only what was
// written before it joined. The driver walks the volume in chunks:
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
// pause, from the same offset (resumable). Progress (percent, bytes, rate, ETA) is in status().
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../util/log.js';

/** Bytes compared per chunk; differing chunks are copied whole. */
export const CATCH_UP_CHUNK_BYTES_MAX = 1024 * 1024;
/** Chunks compared per digest request. */
const CHUNKS_PER_BATCH = 16;
/** Pause before retrying a batch that failed. */
const RETRY_DELAY_MS = 500;

/** What the driver needs from the peers (supplied by the node: HTTP digests, NBD reads). */
export interface CatchUpPeerAccess {
  /** Digests (catchUpDigest) of consecutive `chunkBytes` chunks of [offset, offset+length) on `peer`. */
  digests(peer: string, offset: number, length: number, chunkBytes: number): Promise<string[]>;
  /** [offset, offset+length) as `peer` serves it. */
  read(peer: string, offset: number, length: number): Promise<Buffer>;
}

/** What the driver needs from its volume. */
export interface CatchUpVolume {
  readonly sizeBytes: number;
  /** This replica's digests of the same chunks. */
  localDigests(offset: number, length: number, chunkBytes: number): Promise<string[]>;
  /** Holding the chunk's write grant: fetch the peer's bytes and write them here (mirrored) unless equal. */
  copyUnderGrant(offset: number, length: number, fetch: () => Promise<Buffer>): Promise<'same' | 'copied'>;
  /** Makes every copy durable on every member. */
  flush(): Promise<void>;
  /** In-sync peers to copy from (never empty while catching up). */
  sourcesOfTruth(): string[];
}

export interface CatchUpProgress {
  state: 'copying' | 'flushing' | 'done' | 'stopped';
  bytesTotal: number;
  bytesCompared: number;
  bytesCopied: number;
  chunksCopied: number;
  percent: number;
  rateBytesPerSec: number;
  etaSeconds: number | null;
  startedAtMs: number;
  retries: number;
  lastError: string | null;
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
  private offset = 0;
  private peerIndex = 0;
  readonly progressValue: CatchUpProgress;

  constructor(volume: CatchUpVolume, access: CatchUpPeerAccess, options: { chunkBytes: number; rateBytesPerSec: number; logger: Logger }) {
    this.volume = volume;
    this.access = access;
    this.logger = options.logger;
    this.chunkBytes = options.chunkBytes;
    this.rateBytesPerSec = options.rateBytesPerSec;
    this.progressValue = {
      state: 'copying', bytesTotal: volume.sizeBytes, bytesCompared: 0, bytesCopied: 0, chunksCopied: 0,
      percent: 0, rateBytesPerSec: 0, etaSeconds: null, startedAtMs: Date.now(), retries: 0, lastError: null,
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
    const { sizeBytes } = this.volume;
    const batchBytes = this.chunkBytes * CHUNKS_PER_BATCH;
    this.logger.info('catch-up started', { sizeBytes, chunkBytes: this.chunkBytes, rateBytesPerSec: this.rateBytesPerSec || 'unlimited' });
    while (this.offset < sizeBytes) {
      if (this.stopped) return false;
      const length = Math.min(batchBytes, sizeBytes - this.offset);
      try {
        await this.batch(this.offset, length);
        this.offset += length;
        this.progressValue.bytesCompared = this.offset;
        this.updateRate();
      } catch (error) {
        if (this.stopped) return false;
        this.progressValue.retries++;
        this.progressValue.lastError = error instanceof Error ? error.message : String(error);
        this.peerIndex++;
        this.logger.warn('catch-up batch failed; retrying', { offset: this.offset, error: this.progressValue.lastError });
        await sleep(RETRY_DELAY_MS, undefined, { ref: false });
      }
    }
    this.progressValue.state = 'flushing';
    await this.volume.flush();
    if (this.stopped) return false;
    this.progressValue.state = 'done';
    this.progressValue.percent = 100;
    this.progressValue.etaSeconds = 0;
    this.logger.info('catch-up copied everything', {
      bytesCompared: this.progressValue.bytesCompared,
      bytesCopied: this.progressValue.bytesCopied,
      seconds: Math.round((Date.now() - this.progressValue.startedAtMs) / 100) / 10,
    });
    return true;
  }

  private async batch(offset: number, length: number): Promise<void> {
    const peers = this.volume.sourcesOfTruth();
    if (peers.length === 0) throw new Error('no in-sync peer to copy from');
    const peer = peers[this.peerIndex % peers.length]!;
    const [remote, local] = await Promise.all([this.access.digests(peer, offset, length, this.chunkBytes), this.volume.localDigests(offset, length, this.chunkBytes)]);
    if (remote.length !== local.length) throw new Error(`peer ${peer} sent ${remote.length} digests for ${local.length} chunks`);
    for (let index = 0; index < local.length; index++) {
      if (remote[index] === local[index]) continue;
      if (this.stopped) return;
      const start = offset + index * this.chunkBytes;
      const chunkLength = Math.min(this.chunkBytes, offset + length - start);
      await this.throttle(chunkLength);
      const result = await this.volume.copyUnderGrant(start, chunkLength, () => this.access.read(peer, start, chunkLength));
      if (result === 'copied') {
        this.progressValue.bytesCopied += chunkLength;
        this.progressValue.chunksCopied++;
      }
    }
  }

  /** Keeps copied bytes at or under the configured rate (0: unlimited). */
  private async throttle(nextBytes: number): Promise<void> {
    if (this.rateBytesPerSec <= 0) return;
    const elapsedMs = Date.now() - this.progressValue.startedAtMs;
    const allowedMs = ((this.progressValue.bytesCopied + nextBytes) / this.rateBytesPerSec) * 1000;
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

