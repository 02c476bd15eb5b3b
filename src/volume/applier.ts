// Applies writes, zeroes and trims to an image and its allocation map. Shared by the
// single-node volume and the multi-source replica store, and by their live paths and their
// replays, so that a replayed log ends in exactly the state the live requests produced.
import type { AllocationMap } from '../store/alloc-map.js';
import type { ImageFile } from '../store/image.js';

/** Zero/trim physical actions run this many at a time (a fragmented range has many). */
const ZERO_ACTION_CONCURRENCY = 16;

/** A physical step of a zero or trim request. */
export type ZeroAction = { kind: 'zero'; offset: number; length: number } | { kind: 'free'; offset: number; length: number };

/**
 * Applies requests to the image and the map: shared by live requests and replay, so a
 * replayed log ends in exactly the state the live requests produced.
 */
export class VolumeApplier {
  private readonly image: ImageFile;
  private readonly map: AllocationMap;
  private readonly bs: number;
  private readonly zeroBlock: Buffer;

  constructor(image: ImageFile, map: AllocationMap, blockSizeBytes: number) {
    this.image = image;
    this.map = map;
    this.bs = blockSizeBytes;
    this.zeroBlock = Buffer.alloc(blockSizeBytes);
  }

  /** `logged` settles when the entry is in the log file (undefined during replay). */
  async applyWrite(offset: number, data: Buffer, logged: Promise<void> | undefined): Promise<void> {
    const bs = this.bs;
    const end = offset + data.length;
    const firstBlock = Math.floor(offset / bs);
    const endBlock = Math.ceil(end / bs);
    const allocating = !this.map.allAllocated(firstBlock, endBlock - firstBlock);
    if (allocating && logged) await logged;
    const buffers: Buffer[] = [];
    let start = offset;
    if (offset % bs !== 0 && !this.map.isAllocated(firstBlock)) {
      start = firstBlock * bs;
      buffers.push(this.zeroBlock.subarray(0, offset - start));
    }
    buffers.push(data);
    if (end % bs !== 0 && !this.map.isAllocated(endBlock - 1)) buffers.push(this.zeroBlock.subarray(0, endBlock * bs - end));
    await this.image.write(start, buffers);
    this.map.setRange(firstBlock, endBlock - firstBlock);
  }

  /** Replay of a DIRECT_WRITE: the bytes are already in the image; only the map learns. */
  markWritten(offset: number, length: number): void {
    const firstBlock = Math.floor(offset / this.bs);
    this.map.setRange(firstBlock, Math.ceil((offset + length) / this.bs) - firstBlock);
  }

  async applyZero(offset: number, length: number, deallocate: boolean): Promise<void> {
    const actions = planZero(this.map, offset, length, deallocate);
    await runLimited(actions, ZERO_ACTION_CONCURRENCY, async (action) => {
      if (action.kind === 'zero') {
        await this.image.writeZeros(action.offset, action.length);
      } else {
        await this.image.deallocate(action.offset, action.length);
        this.map.clearRange(action.offset / this.bs, action.length / this.bs);
      }
    });
  }
}

/**
 * The physical work of zeroing [offset, offset+length): nothing where blocks are already
 * unallocated (they read as zeros from the image); zeros written over allocated bytes, or,
 * with `deallocate`, whole allocated blocks freed and partial ones zeroed (they stay
 * allocated because other bytes of them hold data).
 */
export function planZero(map: AllocationMap, offset: number, length: number, deallocate: boolean): ZeroAction[] {
  const bs = map.blockSizeBytes;
  const end = offset + length;
  const firstBlock = Math.floor(offset / bs);
  const actions: ZeroAction[] = [];
  if (length === 0) return actions;
  for (const run of map.runs(firstBlock, Math.ceil(end / bs) - firstBlock)) {
    if (!run.allocated) continue;
    const start = Math.max(offset, run.firstBlock * bs);
    const stop = Math.min(end, (run.firstBlock + run.blockCount) * bs);
    if (!deallocate) {
      actions.push({ kind: 'zero', offset: start, length: stop - start });
      continue;
    }
    const fullStart = Math.ceil(start / bs) * bs;
    const fullEnd = Math.floor(stop / bs) * bs;
    if (fullStart >= fullEnd) {
      actions.push({ kind: 'zero', offset: start, length: stop - start });
      continue;
    }
    if (start < fullStart) actions.push({ kind: 'zero', offset: start, length: fullStart - start });
    actions.push({ kind: 'free', offset: fullStart, length: fullEnd - fullStart });
    if (fullEnd < stop) actions.push({ kind: 'zero', offset: fullEnd, length: stop - fullEnd });
  }
  return actions;
}

export async function runLimited<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  if (items.length === 1) return work(items[0]!);
  let next = 0;
  let failure: unknown;
  const worker = async (): Promise<void> => {
    while (next < items.length && failure === undefined) {
      const item = items[next++]!;
      try {
        await work(item);
      } catch (error) {
        failure ??= error;
      }
    }
  };
  const workers: Promise<void>[] = [];
  for (let i = 0; i < Math.min(limit, items.length); i++) workers.push(worker());
  await Promise.all(workers);
  if (failure !== undefined) throw failure;
}

