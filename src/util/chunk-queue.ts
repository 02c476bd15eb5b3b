// A FIFO of received chunks that parsers read frames from without concatenating them.
// Sockets hand us chunks of arbitrary size; a frame may start in one chunk and end in another.
// Reading a fixed-size header either happens in place (it lies in the head chunk: the
// common case) or through a small copy; payloads become views or one exact-size copy.
import { assert } from '../errors.js';

export class ChunkQueue {
  private chunks: Buffer[] = [];
  /** Index of the head chunk in `chunks` (consumed chunks before it are dropped lazily). */
  private headIndex = 0;
  /** Bytes of the head chunk already consumed. */
  private headOffset = 0;
  private lengthBytes = 0;

  /** Unconsumed bytes buffered. */
  get length(): number {
    return this.lengthBytes;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.lengthBytes += chunk.length;
  }

  /**
   * The head chunk if the next `n` bytes lie entirely inside it, else undefined. The bytes
   * start at `headStart`. Nothing is consumed.
   */
  contiguous(n: number): Buffer | undefined {
    const head = this.chunks[this.headIndex];
    if (head === undefined || head.length - this.headOffset < n) return undefined;
    return head;
  }

  get headStart(): number {
    return this.headOffset;
  }

  /** Copies the next `n` bytes into `target` at `targetStart` without consuming them. */
  peek(target: Buffer, targetStart: number, n: number): void {
    assert(n <= this.lengthBytes, 'peek past the buffered bytes');
    let index = this.headIndex;
    let offset = this.headOffset;
    let copied = 0;
    while (copied < n) {
      const chunk = this.chunks[index];
      assert(chunk !== undefined, 'chunk list shorter than its length');
      const count = Math.min(chunk.length - offset, n - copied);
      chunk.copy(target, targetStart + copied, offset, offset + count);
      copied += count;
      index++;
      offset = 0;
    }
  }

  /** Copies the next `n` bytes into `target` at `targetStart` and consumes them. */
  copyOut(target: Buffer, targetStart: number, n: number): void {
    assert(n <= this.lengthBytes, 'copyOut past the buffered bytes');
    let copied = 0;
    while (copied < n) {
      const chunk = this.chunks[this.headIndex];
      assert(chunk !== undefined, 'chunk list shorter than its length');
      const count = Math.min(chunk.length - this.headOffset, n - copied);
      chunk.copy(target, targetStart + copied, this.headOffset, this.headOffset + count);
      copied += count;
      this.consumeFromHead(count);
    }
  }

  /** Consumes `n` bytes and returns them: a view when they lie in one chunk, else one copy. */
  take(n: number): Buffer {
    const head = this.contiguous(n);
    if (head !== undefined) {
      const view = head.subarray(this.headOffset, this.headOffset + n);
      this.consumeFromHead(n);
      return view;
    }
    const copy = Buffer.allocUnsafe(n);
    this.copyOut(copy, 0, n);
    return copy;
  }

  /** Drops `n` bytes. */
  skip(n: number): void {
    assert(n <= this.lengthBytes, 'skip past the buffered bytes');
    let left = n;
    while (left > 0) {
      const chunk = this.chunks[this.headIndex];
      assert(chunk !== undefined, 'chunk list shorter than its length');
      const count = Math.min(chunk.length - this.headOffset, left);
      this.consumeFromHead(count);
      left -= count;
    }
  }

  /** Removes and returns every buffered byte as chunk views (for a hand-over to another reader). */
  drain(): Buffer[] {
    const rest: Buffer[] = [];
    for (let i = this.headIndex; i < this.chunks.length; i++) {
      const chunk = this.chunks[i];
      assert(chunk !== undefined, 'hole in the chunk list');
      rest.push(i === this.headIndex ? chunk.subarray(this.headOffset) : chunk);
    }
    this.chunks = [];
    this.headIndex = 0;
    this.headOffset = 0;
    this.lengthBytes = 0;
    return rest;
  }

  private consumeFromHead(count: number): void {
    const head = this.chunks[this.headIndex];
    assert(head !== undefined && count <= head.length - this.headOffset, 'consume past the head chunk');
    this.headOffset += count;
    this.lengthBytes -= count;
    if (this.headOffset === head.length) {
      this.headIndex++;
      this.headOffset = 0;
      if (this.headIndex === this.chunks.length) {
        this.chunks.length = 0;
        this.headIndex = 0;
      } else if (this.headIndex >= 64) {
        // Byte-at-a-time senders leave many consumed chunks; drop them in batches so that
        // consuming stays O(1) amortised instead of an O(n) shift per chunk.
        this.chunks = this.chunks.slice(this.headIndex);
        this.headIndex = 0;
      }
    }
  }
}
