// The seeded pseudo-random number generator every simulated component draws from, so that one
// seed reproduces a whole run. xoshiro128** (Blackman & Vigna) on 32-bit words, seeded through
// splitmix32: only Math.imul, shifts and additions mod 2^32, plus exact double arithmetic, so the
// same seed gives the same stream on every platform and Node version (no Math.random, no
// Math.log or other transcendental functions, whose last bits the spec leaves to the engine).
//
// fork(label) derives an independent stream from this stream's *seed key* and the label, not
// from its current position: adding a draw to one component (say, the disk) never shifts what
// another component (the network) sees, so a seed keeps reproducing the "same" scenario while
// the code under test changes around it.
import { assert } from '../errors.js';

const TWO_POW_32 = 0x1_0000_0000;
const TWO_POW_53 = 2 ** 53;

function rotl(value: number, shift: number): number {
  return ((value << shift) | (value >>> (32 - shift))) >>> 0;
}

/** One splitmix32 step: returns [output, next state]. A good 32-bit mixer for seeding. */
function splitmix32(state: number): [number, number] {
  const next = (state + 0x9e3779b9) >>> 0;
  let z = next;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return [(z ^ (z >>> 16)) >>> 0, next];
}

/** FNV-1a over UTF-16 code units: a stable 32-bit hash of a fork label. */
function hashLabel(label: string): number {
  let hash = 0x811c9dc5;
  for (let index = 0; index < label.length; index++) {
    hash = Math.imul(hash ^ label.charCodeAt(index), 0x01000193) >>> 0;
  }
  return hash >>> 0;
}

/** Expands 32-bit material into a 4-word xoshiro key that is never all zeros. */
function expandKey(material: readonly number[]): [number, number, number, number] {
  let state = 0x6a09e667;
  for (const word of material) {
    let mixed: number;
    [mixed, state] = splitmix32((state ^ word) >>> 0);
    state = mixed;
  }
  const key: number[] = [];
  for (let index = 0; index < 4; index++) {
    let output: number;
    [output, state] = splitmix32(state);
    key.push(output);
  }
  // xoshiro's only bad state; splitmix makes it astronomically unlikely, but never let it stick.
  if ((key[0]! | key[1]! | key[2]! | key[3]!) === 0) key[0] = 1;
  return [key[0]!, key[1]!, key[2]!, key[3]!];
}

export class Prng {
  /** The seed this stream (or the root of its fork tree) was made from: print it on failure. */
  readonly seed: number;
  /** The fork path from the root ("" at the root), for trace lines and error messages. */
  readonly label: string;
  private readonly key: readonly [number, number, number, number];
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /**
   * `seed`: any safe non-negative integer (both 32-bit halves count). `forked` is fork()'s
   * private way in; callers pass only the seed.
   */
  constructor(seed: number, forked?: { label: string; key: [number, number, number, number] }) {
    assert(Number.isSafeInteger(seed) && seed >= 0, `prng seed must be a safe non-negative integer, got ${seed}`);
    const key = forked?.key ?? expandKey([seed >>> 0, Math.floor(seed / TWO_POW_32) >>> 0]);
    this.seed = seed;
    this.label = forked?.label ?? '';
    this.key = key;
    [this.s0, this.s1, this.s2, this.s3] = key;
  }

  /** A stream starting from raw xoshiro128** state words: for checking published test vectors. */
  static fromState(state: readonly [number, number, number, number]): Prng {
    assert(state.every((word) => Number.isInteger(word) && word >= 0 && word < TWO_POW_32), 'state words are uint32');
    assert((state[0] | state[1] | state[2] | state[3]) !== 0, 'the all-zero state is invalid for xoshiro');
    return new Prng(0, { label: 'state', key: [state[0], state[1], state[2], state[3]] });
  }

  /** An independent deterministic stream for one component; the same label gives the same stream. */
  fork(label: string): Prng {
    assert(label.length > 0, 'a fork label must not be empty');
    const key = expandKey([...this.key, hashLabel(label), label.length]);
    return new Prng(this.seed, { label: this.label === '' ? label : `${this.label}/${label}`, key });
  }

  /** The next 32 random bits as an unsigned integer. */
  uint32(): number {
    const s0 = this.s0;
    const s1 = this.s1;
    const result = Math.imul(rotl(Math.imul(s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (s1 << 9) >>> 0;
    this.s2 = (this.s2 ^ s0) >>> 0;
    this.s3 = (this.s3 ^ s1) >>> 0;
    this.s1 = (s1 ^ this.s2) >>> 0;
    this.s0 = (s0 ^ this.s3) >>> 0;
    this.s2 = (this.s2 ^ t) >>> 0;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** A uniform integer in [min, max], both inclusive, without modulo bias. */
  int(min: number, max: number): number {
    assert(Number.isSafeInteger(min) && Number.isSafeInteger(max), `int(${min}, ${max}): bounds must be safe integers`);
    assert(min <= max, `int(${min}, ${max}): min must not exceed max`);
    const range = max - min + 1;
    assert(range <= TWO_POW_53, `int(${min}, ${max}): range larger than 2^53`);
    if (range <= TWO_POW_32) {
      // Rejection sampling: draws at or above the largest multiple of `range` would bias low values.
      const limit = Math.floor(TWO_POW_32 / range) * range;
      for (;;) {
        const draw = this.uint32();
        if (draw < limit) return min + (draw % range);
      }
    }
    const limit = Math.floor(TWO_POW_53 / range) * range;
    for (;;) {
      const draw = (this.uint32() >>> 11) * TWO_POW_32 + this.uint32();
      if (draw < limit) return min + (draw % range);
    }
  }

  /** A uniform double in [0, 1) with 53 random bits (exact: only power-of-two scaling). */
  float(): number {
    const high = this.uint32() >>> 5; // 27 bits
    const low = this.uint32() >>> 6; // 26 bits
    return (high * 67_108_864 + low) / TWO_POW_53;
  }

  /** True with probability `probability` (always draws, so p=0 and p=1 keep streams aligned). */
  chance(probability: number): boolean {
    assert(probability >= 0 && probability <= 1, `chance(${probability}): probability must be in [0, 1]`);
    return this.float() < probability;
  }

  pick<T>(items: readonly T[]): T {
    assert(items.length > 0, 'pick() from an empty array');
    return items[this.int(0, items.length - 1)]!;
  }

  /** Fisher-Yates, in place; returns the same array. */
  shuffle<T>(items: T[]): T[] {
    for (let index = items.length - 1; index > 0; index--) {
      const other = this.int(0, index);
      const held = items[index]!;
      items[index] = items[other]!;
      items[other] = held;
    }
    return items;
  }

  /** Fills `target` with random bytes and returns it. */
  fill<T extends Uint8Array>(target: T): T {
    let index = 0;
    while (index < target.length) {
      let word = this.uint32();
      for (let byte = 0; byte < 4 && index < target.length; byte++, word >>>= 8) target[index++] = word & 0xff;
    }
    return target;
  }
}
