// Which log entries replay must not apply to the image: a DIRECT_WRITE puts its bytes in
// the image only, so an older entry replayed over the same blocks would overwrite newer
// data. The index answers, per block, the sequence of the newest DIRECT_WRITE covering it.
// Pure; built from a scan of the log before replay.

/** Blocks per chunk: chunks are allocated only where direct writes landed. */
const CHUNK_BLOCKS = 256;

export interface BlockRun {
  firstBlock: number;
  blockCount: number;
}

export class SupersedeIndex {
  private readonly chunks = new Map<number, Float64Array>();

  get isEmpty(): boolean {
    return this.chunks.size === 0;
  }

  /** Records that the entry `sequence` wrote blocks [firstBlock, firstBlock+blockCount) in place. */
  add(sequence: number, firstBlock: number, blockCount: number): void {
    for (let block = firstBlock; block < firstBlock + blockCount; block++) {
      const chunkIndex = Math.floor(block / CHUNK_BLOCKS);
      let chunk = this.chunks.get(chunkIndex);
      if (!chunk) {
        chunk = new Float64Array(CHUNK_BLOCKS);
        this.chunks.set(chunkIndex, chunk);
      }
      const at = block - chunkIndex * CHUNK_BLOCKS;
      if (chunk[at]! < sequence) chunk[at] = sequence;
    }
  }

  /** The newest direct write covering `block`, or 0. */
  newestDirect(block: number): number {
    const chunkIndex = Math.floor(block / CHUNK_BLOCKS);
    return this.chunks.get(chunkIndex)?.[block - chunkIndex * CHUNK_BLOCKS] ?? 0;
  }

  /** The runs of [firstBlock, endBlock) that no direct write newer than `sequence` covers. */
  liveRuns(sequence: number, firstBlock: number, endBlock: number): BlockRun[] {
    if (this.chunks.size === 0) return [{ firstBlock, blockCount: endBlock - firstBlock }];
    const runs: BlockRun[] = [];
    let runStart = -1;
    for (let block = firstBlock; block < endBlock; block++) {
      const live = this.newestDirect(block) <= sequence;
      if (live && runStart < 0) runStart = block;
      if (!live && runStart >= 0) {
        runs.push({ firstBlock: runStart, blockCount: block - runStart });
        runStart = -1;
      }
    }
    if (runStart >= 0) runs.push({ firstBlock: runStart, blockCount: endBlock - runStart });
    return runs;
  }
}
