// A node's side of the grant protocol (DESIGN.md §5b): which region grants it holds, which
// writes wait for which grant, and which admitted writes are still unacknowledged. A pure
// state machine: calls in, effects out; time arrives through tick(nowMs).
//
// Life of a write: acquire(writeId, regions) queues it; it takes its regions' grants one at a
// time in ascending order (a region it has taken is *pinned* for it: not released while it
// waits for the next one); once it holds all of them it is admitted (an 'admit' effect: the
// caller may now sequence and execute it); writeAcknowledged(writeId) says every in-sync
// member acknowledged it, which ends its hold on its regions.
//
// Why this cannot deadlock: a write waits only for a region above every region it pins, and
// an admitted write waits for nothing but acknowledgements. So a chain of waits goes up the
// region indexes and ends; the arbiter's FIFO then serves every requester in turn.
//
// On REVOKE the region admits no new writes: only those that had already pinned it before the
// revoke (they are part-way through their ascending acquisition; turning them back would let
// two multi-region writers take turns for ever). Once those are admitted and every write
// admitted on the region is acknowledged, RELEASE goes out; writes that were waiting for the
// region request it again (they queue behind the others at the arbiter).
//
// Grants stay cached after their writes finish (the next write to the region starts at once)
// until revoked. Link failures lose messages: after reconnecting, every request still
// unanswered is sent again; GRANT_REQUEST carries the last generation this node saw for the
// region so the arbiter can tell a retry from a request after a lost RELEASE (messages.ts).
//
// Epoch change: no admission from then on, every grant is dropped once the writes admitted
// under the old epoch are acknowledged; then DRAINED goes to the new epoch's arbiter (which
// grants nothing until every member said it) and waiting writes request again. DRAINED is
// also announced for the first epoch, and resent until the arbiter echoes it.
import { assert } from '../errors.js';
import type { NodeId, PolicingMessage } from './messages.js';
import { isAscendingRegions } from './regions.js';

/** Deliberate mistakes for the simulation to catch (tests only). */
export type HolderBug =
  | 'none'
  /** Releases a revoked region without waiting for its writes' acknowledgements. */
  | 'releaseBeforeAcknowledged'
  /** Never resends an unanswered request (after a reconnect or on the resend timer). */
  | 'noResend';

export interface HolderConfig {
  readonly volume: string;
  readonly epoch: number;
  readonly self: NodeId;
  /** The node arbitrating this volume in this epoch (may be `self`: the shell delivers locally). */
  readonly arbiter: NodeId;
  readonly regionCount: number;
  /** Writes waiting for grants; one more is refused at once (VOLUME_BUSY). */
  readonly waitingWritesMax: number;
  /** After a REVOKE, how long before a still-held region is reported overdue. */
  readonly grantHoldMaxMs: number;
  /**
   * Unanswered requests (and an unacknowledged DRAINED) are sent again this often, besides
   * after every reconnect: a message of a new epoch may reach a node that does not know the
   * epoch yet, which ignores it.
   */
  readonly resendIntervalMs: number;
  readonly bug?: HolderBug;
}

export type HolderIgnoredReason = 'epoch' | 'volume' | 'region' | 'stale' | 'unexpected' | 'draining' | 'source';

export type HolderEffect =
  | { readonly kind: 'send'; readonly target: NodeId; readonly message: PolicingMessage }
  /** The write may execute now: this node holds every region's grant, at these generations. */
  | { readonly kind: 'admit'; readonly writeId: number; readonly epoch: number; readonly regions: readonly number[]; readonly generations: readonly number[] }
  /** The write will not be admitted: fail it to the client with this code and message. */
  | { readonly kind: 'refuse'; readonly writeId: number; readonly code: 'VOLUME_BUSY'; readonly message: string }
  | { readonly kind: 'ignored'; readonly source: NodeId; readonly message: PolicingMessage; readonly reason: HolderIgnoredReason }
  /** A revoked region is still held after grantHoldMaxMs: its writes lack acknowledgements. */
  | { readonly kind: 'holdOverdue'; readonly region: number; readonly generation: number; readonly writesInFlight: number; readonly revokedForMs: number }
  /** The epoch change finished: no write of the old epoch is unacknowledged, no grant is held. */
  | { readonly kind: 'epochChanged'; readonly epoch: number; readonly arbiter: NodeId };

interface RegionState {
  granted: boolean;
  /** The generation held (granted) or last held. */
  generation: number;
  revoking: boolean;
  revokedAtMs: number;
  overdueReported: boolean;
  /** A GRANT_REQUEST is out and unanswered. */
  requested: boolean;
  /** Admitted writes on this region not yet acknowledged. */
  writesInFlight: number;
  /** Waiting writes that took this region in their ascending acquisition. */
  pins: number;
  /** Writes whose next region to take is this one, in arrival order. */
  readonly waiting: WriteState[];
}

interface WriteState {
  readonly id: number;
  readonly regions: readonly number[];
  /** How many of `regions` (a prefix) this write has taken (pinned). */
  taken: number;
  admitted: boolean;
}

export class Holder {
  private readonly config: HolderConfig;
  private readonly bug: HolderBug;
  private epochValue: number;
  private arbiterNode: NodeId;
  private nowMs = 0;
  private readonly regions = new Map<number, RegionState>();
  /** Regions revoked and still held, for tick() (cheap however many regions were ever touched). */
  private readonly revoking = new Set<number>();
  /** Regions with an unanswered GRANT_REQUEST, for resend() (same reason). */
  private readonly requested = new Set<number>();
  /** Every write not yet acknowledged, in arrival order (Map keeps insertion order). */
  private readonly writes = new Map<number, WriteState>();
  private waitingCount = 0;
  private admittedCount = 0;
  /** Set while an epoch change waits for the old epoch's writes to be acknowledged. */
  private nextEpoch: { epoch: number; arbiter: NodeId } | undefined;
  /** The arbiter echoed this epoch's DRAINED. */
  private drainedAcknowledged = false;
  private lastResendMs = 0;

  constructor(config: HolderConfig) {
    assert(config.volume.length > 0 && config.self.length > 0 && config.arbiter.length > 0, 'holder config names volume, self and arbiter');
    assert(Number.isSafeInteger(config.epoch) && config.epoch >= 0, `epoch must be a non-negative integer, got ${config.epoch}`);
    assert(Number.isSafeInteger(config.regionCount) && config.regionCount >= 1, 'a volume has at least one region');
    assert(Number.isSafeInteger(config.waitingWritesMax) && config.waitingWritesMax >= 1, 'waitingWritesMax must be at least 1');
    assert(Number.isSafeInteger(config.grantHoldMaxMs) && config.grantHoldMaxMs >= 1, 'grantHoldMaxMs must be a positive integer');
    assert(Number.isSafeInteger(config.resendIntervalMs) && config.resendIntervalMs >= 1, 'resendIntervalMs must be a positive integer');
    this.config = config;
    this.bug = config.bug ?? 'none';
    this.epochValue = config.epoch;
    this.arbiterNode = config.arbiter;
  }

  get epoch(): number {
    return this.epochValue;
  }
  get arbiter(): NodeId {
    return this.arbiterNode;
  }
  /** Writes queued for grants. */
  get writesWaiting(): number {
    return this.waitingCount;
  }
  /** Writes admitted and not yet acknowledged. */
  get writesAdmitted(): number {
    return this.admittedCount;
  }
  /** Regions whose grant this node holds now (O(regions touched): for status pages). */
  get regionsHeld(): number {
    let held = 0;
    for (const state of this.regions.values()) if (state.granted) held++;
    return held;
  }
  get changingEpoch(): boolean {
    return this.nextEpoch !== undefined;
  }

  /** Whether this node holds the region's grant, at which generation, and whether it is being given back. */
  grantOf(region: number): { held: boolean; generation: number; revoking: boolean } {
    const state = this.regions.get(region);
    return { held: state?.granted ?? false, generation: state?.generation ?? 0, revoking: state?.revoking ?? false };
  }

  /**
   * A write touching `regions` (strictly ascending, from regionsOf) asks for admission. It is
   * admitted at once when every grant is cached, else queued; a full queue refuses it.
   */
  acquire(writeId: number, regions: readonly number[]): HolderEffect[] {
    assert(Number.isSafeInteger(writeId), `write id must be an integer, got ${writeId}`);
    assert(!this.writes.has(writeId), `write ${writeId} is already known`);
    assert(isAscendingRegions(regions), `regions must be strictly ascending: ${regions.join(',')}`);
    assert(regions[regions.length - 1]! < this.config.regionCount, `region ${regions[regions.length - 1]} outside the volume`);
    const effects: HolderEffect[] = [];
    if (this.waitingCount >= this.config.waitingWritesMax) {
      effects.push({ kind: 'refuse', writeId, code: 'VOLUME_BUSY', message: `${this.waitingCount} writes already wait for write priority on volume ${this.config.volume}` });
      return effects;
    }
    const write: WriteState = { id: writeId, regions: [...regions], taken: 0, admitted: false };
    this.writes.set(writeId, write);
    this.waitingCount++;
    this.advance(write, effects);
    return effects;
  }

  /**
   * Every in-sync member acknowledged the admitted write (or it is known to have failed
   * everywhere): its regions no longer wait for it.
   */
  writeAcknowledged(writeId: number): HolderEffect[] {
    const write = this.writes.get(writeId);
    assert(write !== undefined && write.admitted, `write ${writeId} is not admitted`);
    this.writes.delete(writeId);
    this.admittedCount--;
    const effects: HolderEffect[] = [];
    for (const region of write.regions) {
      const state = this.regions.get(region)!;
      assert(state.writesInFlight > 0, `region ${region} has no write in flight`);
      state.writesInFlight--;
      this.maybeRelease(region, state, effects);
    }
    this.maybeFinishEpochChange(effects);
    return effects;
  }

  receive(source: NodeId, message: PolicingMessage): HolderEffect[] {
    const effects: HolderEffect[] = [];
    const ignore = (reason: HolderIgnoredReason): HolderEffect[] => {
      effects.push({ kind: 'ignored', source, message, reason });
      return effects;
    };
    if (message.volume !== this.config.volume) return ignore('volume');
    // While the epoch changes, the old arbiter's word no longer counts and the new one has not
    // been asked anything yet.
    if (this.nextEpoch !== undefined) return ignore('draining');
    if (message.epoch !== this.epochValue) return ignore('epoch');
    if (source !== this.arbiterNode) return ignore('source');
    if (!Number.isSafeInteger(message.region) || message.region < 0 || message.region >= this.config.regionCount) return ignore('region');
    const region = message.region;
    const state = this.region(region);
    switch (message.type) {
      case 'DRAINED':
        this.drainedAcknowledged = true;
        return effects;
      case 'GRANT':
        if (message.generation <= state.generation) return ignore('stale'); // a duplicate of one already had
        this.granted(region, state, message.generation, effects);
        return effects;
      case 'REVOKE':
        if (message.generation > state.generation) {
          // Its GRANT was lost with a link and this REVOKE was resent after the reconnect: the
          // arbiter's word is that we hold it. Take it (waiting writes advance), then give it back.
          this.granted(region, state, message.generation, effects);
        }
        if (state.granted && state.generation === message.generation) {
          if (!state.revoking) {
            state.revoking = true;
            state.revokedAtMs = this.nowMs;
            state.overdueReported = false;
            this.revoking.add(region);
          }
          this.maybeRelease(region, state, effects);
        } else if (!state.granted && message.generation === state.generation) {
          // Already released; that RELEASE was lost with a link. Say it again.
          this.send(effects, 'RELEASE', region, message.generation);
        } else {
          return ignore('stale');
        }
        return effects;
      case 'GRANT_REFUSED': {
        if (!state.requested) return ignore('stale');
        this.setRequested(region, state, false);
        // The arbiter's queue is full: fail the writes waiting here rather than spin.
        for (const write of state.waiting.splice(0)) this.refuseWaiting(write, `write priority for region ${region} of volume ${this.config.volume} is refused: the arbiter's queue is full`, effects);
        return effects;
      }
      case 'GRANT_REQUEST':
      case 'RELEASE':
        return ignore('unexpected');
    }
  }

  /** A link to or from the arbiter came (back) up: what was sent before may be lost; resend. */
  linkUp(peer: NodeId): HolderEffect[] {
    const effects: HolderEffect[] = [];
    if (peer === this.arbiterNode) this.resend(effects);
    return effects;
  }

  /**
   * Time passes: resends what is unanswered every resendIntervalMs, and reports revoked
   * regions still held after grantHoldMaxMs.
   */
  tick(nowMs: number): HolderEffect[] {
    assert(Number.isSafeInteger(nowMs) && nowMs >= this.nowMs, `time goes forward: ${nowMs} after ${this.nowMs}`);
    this.nowMs = nowMs;
    const effects: HolderEffect[] = [];
    if (nowMs - this.lastResendMs >= this.config.resendIntervalMs) this.resend(effects);
    for (const region of this.revoking) {
      const state = this.regions.get(region)!;
      assert(state.granted && state.revoking, `region ${region} in the revoking set is held and revoking`);
      if (state.overdueReported) continue;
      const revokedForMs = nowMs - state.revokedAtMs;
      if (revokedForMs <= this.config.grantHoldMaxMs) continue;
      state.overdueReported = true;
      effects.push({ kind: 'holdOverdue', region, generation: state.generation, writesInFlight: state.writesInFlight, revokedForMs });
    }
    return effects;
  }

  /**
   * The volume's epoch changed (a new in-sync set, perhaps a new arbiter). Nothing is admitted
   * from now on; once every admitted write is acknowledged all grants are dropped and waiting
   * writes request again from `arbiter` under `epoch` (an 'epochChanged' effect marks it).
   */
  changeEpoch(epoch: number, arbiter: NodeId): HolderEffect[] {
    const current = this.nextEpoch?.epoch ?? this.epochValue;
    assert(Number.isSafeInteger(epoch) && epoch > current, `epochs only grow: ${epoch} after ${current}`);
    this.nextEpoch = { epoch, arbiter };
    // Writes part-way through acquisition start again under the new epoch: the pins go.
    for (const write of this.writes.values()) if (!write.admitted) write.taken = 0;
    for (const state of this.regions.values()) {
      state.pins = 0;
      state.requested = false;
      state.waiting.length = 0;
    }
    this.requested.clear();
    const effects: HolderEffect[] = [];
    this.maybeFinishEpochChange(effects);
    return effects;
  }

  /**
   * Recomputes every count from the writes and checks the region table against it (O(writes +
   * regions): for tests and simulations, after each step). Throws on the first mismatch.
   */
  assertInvariants(): void {
    const pins = new Map<number, number>();
    const inFlight = new Map<number, number>();
    let waiting = 0;
    for (const write of this.writes.values()) {
      if (write.admitted) {
        for (const region of write.regions) inFlight.set(region, (inFlight.get(region) ?? 0) + 1);
        continue;
      }
      waiting++;
      for (let index = 0; index < write.taken; index++) pins.set(write.regions[index]!, (pins.get(write.regions[index]!) ?? 0) + 1);
      if (this.nextEpoch === undefined) {
        const next = this.regions.get(write.regions[write.taken]!);
        assert(next !== undefined && next.waiting.includes(write), `write ${write.id} waits in the queue of its next region`);
      }
    }
    assert(waiting === this.waitingCount && this.writes.size - waiting === this.admittedCount, 'write counts match the writes');
    for (const [region, state] of this.regions) {
      assert(state.pins === (pins.get(region) ?? 0), `region ${region}: ${state.pins} pins counted, ${pins.get(region) ?? 0} held by writes`);
      if (this.bug !== 'releaseBeforeAcknowledged') {
        assert(state.writesInFlight === (inFlight.get(region) ?? 0), `region ${region}: in-flight count matches the admitted writes`);
        assert(state.granted || state.writesInFlight === 0, `region ${region}: writes in flight on a region not held`);
      }
      assert(state.granted || (!state.revoking && state.pins === 0), `region ${region}: revoking or pinned but not held`);
      assert(state.revoking === this.revoking.has(region), `region ${region}: revoking set agrees`);
      assert(!(state.granted && state.requested), `region ${region}: requested while held`);
      assert(state.requested === this.requested.has(region), `region ${region}: requested set agrees`);
      for (const write of state.waiting) assert(this.writes.get(write.id) === write && !write.admitted && write.regions[write.taken] === region, `region ${region}: queued write ${write.id} waits here`);
    }
  }

  // ---- internals ---------------------------------------------------------------------------

  /** Every request still unanswered, and DRAINED until the arbiter echoed it. */
  private resend(effects: HolderEffect[]): void {
    this.lastResendMs = this.nowMs;
    if (this.nextEpoch !== undefined) return; // nothing is asked of anyone while draining
    if (!this.drainedAcknowledged) this.sendDrained(effects);
    if (this.bug === 'noResend') return;
    for (const region of this.requested) this.send(effects, 'GRANT_REQUEST', region, this.regions.get(region)!.generation);
  }

  private setRequested(region: number, state: RegionState, requested: boolean): void {
    state.requested = requested;
    if (requested) this.requested.add(region);
    else this.requested.delete(region);
  }

  private sendDrained(effects: HolderEffect[]): void {
    effects.push({ kind: 'send', target: this.arbiterNode, message: { type: 'DRAINED', volume: this.config.volume, epoch: this.epochValue, region: 0, generation: 0 } });
  }

  private region(region: number): RegionState {
    let state = this.regions.get(region);
    if (state === undefined) {
      state = { granted: false, generation: 0, revoking: false, revokedAtMs: 0, overdueReported: false, requested: false, writesInFlight: 0, pins: 0, waiting: [] };
      this.regions.set(region, state);
    }
    return state;
  }

  private granted(region: number, state: RegionState, generation: number, effects: HolderEffect[]): void {
    assert(!state.granted, `region ${region}: GRANT ${generation} while holding ${state.generation}`);
    // (The deliberate bug leaves writes in flight on a released region: let the checker see it.)
    assert(state.pins === 0 && (state.writesInFlight === 0 || this.bug === 'releaseBeforeAcknowledged'), `region ${region}: writes on a region not held`);
    state.granted = true;
    state.generation = generation;
    state.revoking = false;
    this.setRequested(region, state, false);
    // Every write waiting for this region takes it now, in arrival order, before any REVOKE
    // can apply: that is what guarantees each grant moves each waiting write forward.
    for (const write of state.waiting.splice(0)) this.advance(write, effects);
  }

  /** Takes as many of the write's regions as are usable, then admits it or queues it for the next. */
  private advance(write: WriteState, effects: HolderEffect[]): void {
    assert(!write.admitted, 'an admitted write does not advance');
    if (this.nextEpoch !== undefined) return; // re-driven once the epoch change finishes
    while (write.taken < write.regions.length) {
      const region = write.regions[write.taken]!;
      const state = this.region(region);
      if (!state.granted || state.revoking) {
        state.waiting.push(write);
        if (!state.granted && !state.requested) {
          this.setRequested(region, state, true);
          this.send(effects, 'GRANT_REQUEST', region, state.generation);
        }
        return;
      }
      state.pins++;
      write.taken++;
    }
    write.admitted = true;
    this.waitingCount--;
    this.admittedCount++;
    const generations: number[] = [];
    for (const region of write.regions) {
      const state = this.regions.get(region)!;
      assert(state.granted && state.pins > 0, `write ${write.id} admitted on region ${region} without its grant`);
      state.pins--;
      state.writesInFlight++;
      generations.push(state.generation);
    }
    effects.push({ kind: 'admit', writeId: write.id, epoch: this.epochValue, regions: write.regions, generations });
  }

  private maybeRelease(region: number, state: RegionState, effects: HolderEffect[]): void {
    if (!state.granted || !state.revoking || state.pins > 0) return;
    if (state.writesInFlight > 0 && this.bug !== 'releaseBeforeAcknowledged') return;
    state.granted = false;
    state.revoking = false;
    this.revoking.delete(region);
    this.send(effects, 'RELEASE', region, state.generation);
    if (state.waiting.length > 0) {
      this.setRequested(region, state, true);
      this.send(effects, 'GRANT_REQUEST', region, state.generation);
    }
  }

  private refuseWaiting(write: WriteState, message: string, effects: HolderEffect[]): void {
    assert(!write.admitted, 'only a waiting write is refused');
    this.writes.delete(write.id);
    this.waitingCount--;
    for (let index = 0; index < write.taken; index++) {
      const region = write.regions[index]!;
      const state = this.regions.get(region)!;
      state.pins--;
      this.maybeRelease(region, state, effects);
    }
    effects.push({ kind: 'refuse', writeId: write.id, code: 'VOLUME_BUSY', message });
  }

  private maybeFinishEpochChange(effects: HolderEffect[]): void {
    const next = this.nextEpoch;
    if (next === undefined || this.admittedCount > 0) return;
    // Old grants are simply forgotten: the new epoch's arbiter starts from an empty table.
    this.regions.clear();
    this.revoking.clear();
    this.requested.clear();
    this.epochValue = next.epoch;
    this.arbiterNode = next.arbiter;
    this.nextEpoch = undefined;
    this.drainedAcknowledged = false;
    effects.push({ kind: 'epochChanged', epoch: next.epoch, arbiter: next.arbiter });
    this.sendDrained(effects);
    for (const write of [...this.writes.values()]) this.advance(write, effects);
  }

  private send(effects: HolderEffect[], type: 'GRANT_REQUEST' | 'RELEASE', region: number, generation: number): void {
    effects.push({ kind: 'send', target: this.arbiterNode, message: { type, volume: this.config.volume, epoch: this.epochValue, region, generation } });
  }
}
