// Reusable checkers for simulated runs, over plain records so that hand-made histories test
// them as easily as recorded ones. Each returns a CheckResult; assertCheck() turns a failure into
// an InvariantViolation naming the invariant of DESIGN.md §3 it breaks.
//
// Times are simulated milliseconds. Operation A precedes B only if A responded strictly before B
// was invoked; operations whose times touch are concurrent. That errs towards accepting a
// history (never a false alarm), at the cost of missing orderings inside one millisecond.
//
// - checkBlockLinearizable: each block is a read/write register and every write stores a
//   unique value. A read may return the value of a write that "could have been the latest":
//   not one invoked after the read responded, not one a newer write acknowledged before the
//   read began had already replaced. On top of these direct checks it runs the exact test for
//   atomic registers with unique writes (Gibbons & Korach 1997; Golab, Li & Shah 2011): group
//   each write with the reads that returned its value, give each group a zone from its
//   earliest response to its latest invocation; the history is linearizable iff no two forward
//   zones overlap and no backward zone lies inside a forward zone. That also catches reads that
//   go back in time (a read returning an older value than an earlier read returned).
// - checkReplicasConverged: replicas at quiescence are byte-identical (I4).
// - checkDurability: after a crash, each block reads back a value no older than every write
//   that had to be durable: acknowledged with FUA, or acknowledged before a flush that was
//   itself acknowledged before the crash (I1).
import { assert } from '../errors.js';
import type { Clock } from './scheduler.js';
import { InvariantViolation } from './trace.js';

export type RegisterValue = string | number | bigint;

export interface WriteRecord {
  readonly block: number;
  readonly value: RegisterValue;
  readonly invokeMs: number;
  /** When the client got its acknowledgement; undefined: never (the write may or may not take effect). */
  readonly ackMs?: number | undefined;
  /** Force unit access: durable once acknowledged. */
  readonly fua?: boolean | undefined;
}

export interface ReadRecord {
  readonly block: number;
  readonly value: RegisterValue;
  readonly invokeMs: number;
  readonly responseMs: number;
}

export interface FlushRecord {
  readonly invokeMs: number;
  readonly ackMs?: number | undefined;
}

export type CheckResult = { readonly ok: true } | { readonly ok: false; readonly invariant: string; readonly message: string };

const OK: CheckResult = { ok: true };

function fail(invariant: string, message: string): CheckResult {
  return { ok: false, invariant, message };
}

export function assertCheck(result: CheckResult): void {
  if (!result.ok) throw new InvariantViolation(result.invariant, result.message);
}

/** The checker's view of a write; the initial value is a write at -Infinity. */
interface Version {
  readonly value: RegisterValue;
  readonly invokeMs: number;
  /** +Infinity when never acknowledged. */
  readonly ackMs: number;
  readonly initial: boolean;
}

function describeVersion(version: Version): string {
  if (version.initial) return `the initial value ${String(version.value)}`;
  const ack = version.ackMs === Infinity ? 'never acknowledged' : `acknowledged at ${version.ackMs}`;
  return `write ${String(version.value)} (invoked at ${version.invokeMs}, ${ack})`;
}

function describeRead(read: ReadRecord): string {
  return `read of block ${read.block} [${read.invokeMs}, ${read.responseMs}] returning ${String(read.value)}`;
}

function groupByBlock<T extends { block: number }>(items: readonly T[]): Map<number, T[]> {
  const groups = new Map<number, T[]>();
  for (const item of items) {
    const group = groups.get(item.block);
    if (group === undefined) groups.set(item.block, [item]);
    else group.push(item);
  }
  return groups;
}

function versionsOf(block: number, writes: readonly WriteRecord[], initialValue: RegisterValue): Map<RegisterValue, Version> {
  const versions = new Map<RegisterValue, Version>();
  versions.set(initialValue, { value: initialValue, invokeMs: -Infinity, ackMs: -Infinity, initial: true });
  for (const write of writes) {
    assert(!versions.has(write.value), `block ${block}: value ${String(write.value)} written twice or equal to the initial value (values must be unique)`);
    assert(write.ackMs === undefined || write.ackMs >= write.invokeMs, `block ${block}: write ${String(write.value)} acknowledged before it was invoked`);
    versions.set(write.value, { value: write.value, invokeMs: write.invokeMs, ackMs: write.ackMs ?? Infinity, initial: false });
  }
  return versions;
}

/**
 * For "is there a write invoked after `ackMs` and acknowledged before `beforeMs`?": the writes
 * sorted by acknowledgement, with the running maximum of invocation times.
 */
class NewerWriteIndex {
  private readonly byAck: Version[];
  private readonly latestInvokeUpTo: Version[];

  constructor(versions: Iterable<Version>) {
    this.byAck = [...versions].filter((version) => version.ackMs !== Infinity && !version.initial).sort((a, b) => a.ackMs - b.ackMs);
    this.latestInvokeUpTo = [];
    let latest: Version | undefined;
    for (const version of this.byAck) {
      if (latest === undefined || version.invokeMs > latest.invokeMs) latest = version;
      this.latestInvokeUpTo.push(latest);
    }
  }

  /** A write acknowledged strictly before `beforeMs` and invoked strictly after `afterMs`, if any. */
  find(afterMs: number, beforeMs: number): Version | undefined {
    let low = 0;
    let high = this.byAck.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (this.byAck[middle]!.ackMs < beforeMs) low = middle + 1;
      else high = middle;
    }
    if (low === 0) return undefined;
    const candidate = this.latestInvokeUpTo[low - 1]!;
    return candidate.invokeMs > afterMs ? candidate : undefined;
  }
}

interface Zone {
  readonly version: Version;
  /** Earliest response in the cluster. */
  readonly firstResponseMs: number;
  /** Latest invocation in the cluster. */
  readonly lastInvokeMs: number;
}

/** Per-block linearizability of a read/write register history with unique written values. */
export function checkBlockLinearizable(history: {
  writes: readonly WriteRecord[];
  reads: readonly ReadRecord[];
  initialValue?: RegisterValue;
}): CheckResult {
  const initialValue = history.initialValue ?? 0;
  const writesByBlock = groupByBlock(history.writes);
  const readsByBlock = groupByBlock(history.reads);
  const blocks = [...new Set([...writesByBlock.keys(), ...readsByBlock.keys()])].sort((a, b) => a - b);
  for (const block of blocks) {
    const result = checkOneBlock(block, writesByBlock.get(block) ?? [], readsByBlock.get(block) ?? [], initialValue);
    if (!result.ok) return result;
  }
  return OK;
}

function checkOneBlock(block: number, writes: readonly WriteRecord[], reads: readonly ReadRecord[], initialValue: RegisterValue): CheckResult {
  const versions = versionsOf(block, writes, initialValue);
  const newer = new NewerWriteIndex(versions.values());
  const readsOf = new Map<Version, ReadRecord[]>();
  for (const read of reads) {
    assert(read.responseMs >= read.invokeMs, `${describeRead(read)}: responded before it was invoked`);
    const version = versions.get(read.value);
    if (version === undefined) {
      return fail('linearizability', `${describeRead(read)}: no write produced that value (a corrupt or half-applied entry? I5)`);
    }
    if (version.invokeMs > read.responseMs) {
      return fail('linearizability', `${describeRead(read)}: that value's ${describeVersion(version)} began only after the read returned`);
    }
    const replacement = newer.find(version.ackMs, read.invokeMs);
    if (replacement !== undefined) {
      return fail(
        'linearizability',
        `${describeRead(read)}: stale: ${describeVersion(version)} was already replaced by ${describeVersion(replacement)} before the read began (I1)`,
      );
    }
    const list = readsOf.get(version);
    if (list === undefined) readsOf.set(version, [read]);
    else list.push(read);
  }

  const forward: Zone[] = [];
  const backward: Zone[] = [];
  for (const version of versions.values()) {
    const clusterReads = readsOf.get(version) ?? [];
    // A write nobody read and nobody was told about may never have happened: it constrains nothing.
    if (clusterReads.length === 0 && (version.ackMs === Infinity || version.initial)) continue;
    let firstResponseMs = version.ackMs;
    let lastInvokeMs = version.invokeMs;
    for (const read of clusterReads) {
      firstResponseMs = Math.min(firstResponseMs, read.responseMs);
      lastInvokeMs = Math.max(lastInvokeMs, read.invokeMs);
    }
    const zone = { version, firstResponseMs, lastInvokeMs };
    if (firstResponseMs < lastInvokeMs) forward.push(zone);
    else backward.push(zone);
  }
  forward.sort((a, b) => a.firstResponseMs - b.firstResponseMs);
  let widest: Zone | undefined;
  for (const zone of forward) {
    if (widest !== undefined && zone.firstResponseMs < widest.lastInvokeMs) {
      return fail(
        'linearizability',
        `block ${block}: ${describeVersion(widest.version)} was observed until ${widest.lastInvokeMs}, ` +
          `but ${describeVersion(zone.version)} had already been observed at ${zone.firstResponseMs}: no single order of writes explains the reads`,
      );
    }
    if (widest === undefined || zone.lastInvokeMs > widest.lastInvokeMs) widest = zone;
  }
  for (const zone of backward) {
    // Forward zones are disjoint now: only the last one starting before this zone can contain it.
    let low = 0;
    let high = forward.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (forward[middle]!.firstResponseMs < zone.lastInvokeMs) low = middle + 1;
      else high = middle;
    }
    const container = low > 0 ? forward[low - 1]! : undefined;
    if (container !== undefined && zone.firstResponseMs < container.lastInvokeMs) {
      return fail(
        'linearizability',
        `block ${block}: ${describeVersion(zone.version)} lies entirely between the first and last observation of ` +
          `${describeVersion(container.version)} (${container.firstResponseMs} to ${container.lastInvokeMs}): a read went back in time`,
      );
    }
  }
  return OK;
}

/** The first offset at which `a` and `b` differ (or the shorter length), undefined if identical. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number | undefined {
  const length = Math.min(a.length, b.length);
  const chunkBytes = 4096;
  for (let start = 0; start < length; start += chunkBytes) {
    const end = Math.min(length, start + chunkBytes);
    // Compare a chunk natively first; look byte by byte only inside the chunk that differs.
    if (Buffer.compare(a.subarray(start, end), b.subarray(start, end)) === 0) continue;
    for (let offset = start; offset < end; offset++) if (a[offset] !== b[offset]) return offset;
  }
  return a.length === b.length ? undefined : length;
}

function hexAround(bytes: Uint8Array, offset: number): string {
  return Buffer.from(bytes.subarray(offset, Math.min(bytes.length, offset + 16))).toString('hex') || '(end)';
}

/** I4: all replicas at quiescence hold the same bytes. */
export function checkReplicasConverged(replicas: readonly { readonly name: string; readonly bytes: Uint8Array }[]): CheckResult {
  const reference = replicas[0];
  if (reference === undefined) return OK;
  for (const replica of replicas.slice(1)) {
    const offset = firstDifference(reference.bytes, replica.bytes);
    if (offset === undefined) continue;
    return fail(
      'I4',
      `replicas ${reference.name} and ${replica.name} differ at offset ${offset} ` +
        `(lengths ${reference.bytes.length} and ${replica.bytes.length}; bytes ${hexAround(reference.bytes, offset)} vs ${hexAround(replica.bytes, offset)})`,
    );
  }
  return OK;
}

/**
 * I1 across a crash: `readBack` (block -> value read after recovery) must, for every block,
 * return a value no older than each write that had to be durable at `crashMs`, and not one
 * invoked after the crash.
 */
export function checkDurability(input: {
  writes: readonly WriteRecord[];
  flushes: readonly FlushRecord[];
  crashMs: number;
  readBack: ReadonlyMap<number, RegisterValue>;
  initialValue?: RegisterValue;
}): CheckResult {
  const initialValue = input.initialValue ?? 0;
  // A write is covered by a flush invoked after its acknowledgement and acknowledged before the crash.
  const coveringFlushInvokes = input.flushes
    .filter((flush) => flush.ackMs !== undefined && flush.ackMs <= input.crashMs)
    .map((flush) => flush.invokeMs);
  const lastCoveringFlushInvokeMs = coveringFlushInvokes.length === 0 ? -Infinity : Math.max(...coveringFlushInvokes);
  const mustSurvive = (write: WriteRecord): boolean =>
    write.ackMs !== undefined && write.ackMs <= input.crashMs && (write.fua === true || write.ackMs < lastCoveringFlushInvokeMs);

  const writesByBlock = groupByBlock(input.writes);
  const blocks = [...new Set([...writesByBlock.keys(), ...input.readBack.keys()])].sort((a, b) => a - b);
  for (const block of blocks) {
    const writes = writesByBlock.get(block) ?? [];
    const required = writes.filter(mustSurvive);
    const value = input.readBack.get(block);
    if (value === undefined) {
      if (required.length === 0) continue;
      return fail('I1', `block ${block} has durable writes but was not read back after the crash at ${input.crashMs}`);
    }
    const versions = versionsOf(block, writes, initialValue);
    const version = versions.get(value);
    if (version === undefined) {
      return fail('I1', `block ${block} read back ${String(value)} after the crash at ${input.crashMs}: no write produced that value (I5?)`);
    }
    if (version.invokeMs > input.crashMs) {
      return fail('I1', `block ${block} read back ${describeVersion(version)}, invoked after the crash at ${input.crashMs}`);
    }
    for (const durable of required) {
      if (version.ackMs < durable.invokeMs) {
        return fail(
          'I1',
          `block ${block} read back ${describeVersion(version)} after the crash at ${input.crashMs}, ` +
            `but the durable write ${String(durable.value)} (invoked at ${durable.invokeMs}, acknowledged at ${durable.ackMs}) is newer: an acknowledged write was lost`,
        );
      }
    }
  }
  return OK;
}

/** Records a register history as it happens, stamping times from a clock. */
export class BlockHistory {
  private readonly clock: Clock;
  readonly initialValue: RegisterValue;
  private readonly writeRecords: Array<{ block: number; value: RegisterValue; invokeMs: number; ackMs?: number; fua: boolean; failed: boolean }> = [];
  private readonly pendingReads: Array<{ block: number; invokeMs: number } | undefined> = [];
  private readonly readRecords: ReadRecord[] = [];
  private readonly flushRecords: Array<{ invokeMs: number; ackMs?: number }> = [];

  constructor(clock: Clock, options: { initialValue?: RegisterValue } = {}) {
    this.clock = clock;
    this.initialValue = options.initialValue ?? 0;
  }

  /** Returns a ticket for writeAcknowledged / writeFailed. */
  writeInvoked(block: number, value: RegisterValue, options: { fua?: boolean } = {}): number {
    this.writeRecords.push({ block, value, invokeMs: this.clock.nowMs(), fua: options.fua ?? false, failed: false });
    return this.writeRecords.length - 1;
  }

  writeAcknowledged(ticket: number): void {
    const record = this.writeRecords[ticket];
    assert(record !== undefined && record.ackMs === undefined && !record.failed, `write ticket ${ticket} is not pending`);
    record.ackMs = this.clock.nowMs();
  }

  /** The write certainly did not take effect (refused before doing anything): it leaves the history. */
  writeFailed(ticket: number): void {
    const record = this.writeRecords[ticket];
    assert(record !== undefined && record.ackMs === undefined && !record.failed, `write ticket ${ticket} is not pending`);
    record.failed = true;
  }

  readInvoked(block: number): number {
    this.pendingReads.push({ block, invokeMs: this.clock.nowMs() });
    return this.pendingReads.length - 1;
  }

  readReturned(ticket: number, value: RegisterValue): void {
    const pending = this.pendingReads[ticket];
    assert(pending !== undefined, `read ticket ${ticket} is not pending`);
    this.pendingReads[ticket] = undefined;
    this.readRecords.push({ block: pending.block, value, invokeMs: pending.invokeMs, responseMs: this.clock.nowMs() });
  }

  flushInvoked(): number {
    this.flushRecords.push({ invokeMs: this.clock.nowMs() });
    return this.flushRecords.length - 1;
  }

  flushAcknowledged(ticket: number): void {
    const record = this.flushRecords[ticket];
    assert(record !== undefined && record.ackMs === undefined, `flush ticket ${ticket} is not pending`);
    record.ackMs = this.clock.nowMs();
  }

  get writes(): WriteRecord[] {
    return this.writeRecords.filter((record) => !record.failed).map(({ block, value, invokeMs, ackMs, fua }) => ({ block, value, invokeMs, ackMs, fua }));
  }

  get reads(): readonly ReadRecord[] {
    return this.readRecords;
  }

  get flushes(): readonly FlushRecord[] {
    return this.flushRecords;
  }

  checkLinearizable(): CheckResult {
    return checkBlockLinearizable({ writes: this.writes, reads: this.reads, initialValue: this.initialValue });
  }

  checkDurableAfterCrash(crashMs: number, readBack: ReadonlyMap<number, RegisterValue>): CheckResult {
    return checkDurability({ writes: this.writes, flushes: this.flushes, crashMs, readBack, initialValue: this.initialValue });
  }
}
