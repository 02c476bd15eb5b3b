// The arbiter's side of the grant protocol (DESIGN.md §5b): per volume and epoch, which node
// holds each region's write priority, under which generation, and who waits for it (FIFO).
// A pure state machine: messages, link events and ticks in, effects out. No sockets, no timers,
// no clock of its own: time arrives through tick(nowMs).
//
// Rules:
// - GRANT_REQUEST for a free region with nobody waiting: GRANT at generation + 1.
// - For a held region: queue the requester (FIFO, bounded: a full queue answers GRANT_REFUSED)
//   and REVOKE the holder, once per generation (again after a reconnect: it may have been lost).
// - RELEASE of the current generation by its holder: grant the head of the queue, and revoke
//   again at once if others still wait (no starvation: a grant serves what its holder had
//   queued, then moves on).
// - Link failures lose messages; the holder side resends its requests after reconnecting, and
//   the arbiter resends its revokes. Duplicates are recognised by generation (see messages.ts),
//   so a grant is never lost and never given twice.
// - Epoch fence: when the epoch's members are given, nothing is granted (requests queue) until
//   every member said DRAINED (it holds nothing and has no unacknowledged write of an earlier
//   epoch); each DRAINED is echoed back as its acknowledgement.
// - Messages of another volume or epoch, or for a region outside the volume, are ignored and
//   reported (an 'ignored' effect) for the log.
import { assert } from '../errors.js';
import type { NodeId, PolicingMessage } from './messages.js';

/** A deliberate mistake for the simulation to catch (tests only). */
export type ArbiterBug =
  | 'none'
  /** Grants the last requester queued instead of the first. */
  | 'grantLifo'
  /** Grants in a new epoch without waiting for every member's DRAINED. */
  | 'noEpochFence';

export interface ArbiterConfig {
  readonly volume: string;
  readonly epoch: number;
  /** Regions of the volume (regions.ts regionCount); requests for others are ignored. */
  readonly regionCount: number;
  /** Requesters queued per region; one more is refused. At least the number of other members. */
  readonly waitersPerRegionMax: number;
  /** After a REVOKE, how long the holder may keep the region before an overdue report. */
  readonly grantHoldMaxMs: number;
  /**
   * The in-sync members of this epoch. Given: grant nothing until each sent DRAINED (required
   * after an epoch change). Omitted: no fence (a brand-new volume, or tests).
   */
  readonly members?: readonly NodeId[];
  readonly bug?: ArbiterBug;
}

export type ArbiterIgnoredReason = 'epoch' | 'volume' | 'region' | 'stale' | 'duplicate' | 'unexpected';

export type ArbiterEffect =
  | { readonly kind: 'send'; readonly target: NodeId; readonly message: PolicingMessage }
  /** `node` now waits for `region` at position `position` (0 = next). For logs and the FIFO checker. */
  | { readonly kind: 'queued'; readonly region: number; readonly node: NodeId; readonly position: number }
  /** A message that changed nothing: log it (at debug level for 'stale' and 'duplicate'). */
  | { readonly kind: 'ignored'; readonly source: NodeId; readonly message: PolicingMessage; readonly reason: ArbiterIgnoredReason }
  /**
   * A revoked holder kept the region longer than grantHoldMaxMs: some in-sync member is not
   * acknowledging its writes. Reported once per revoke; membership (§5) decides what to do.
   */
  | { readonly kind: 'holdOverdue'; readonly region: number; readonly holder: NodeId; readonly generation: number; readonly revokedForMs: number };

interface RegionEntry {
  holder: NodeId | undefined;
  /** The last generation granted (0: never granted in this epoch). */
  generation: number;
  readonly waiters: NodeId[];
  /** When the REVOKE of the current generation was first sent; undefined: not revoked. */
  revokedAtMs: number | undefined;
  overdueReported: boolean;
}

export class Arbiter {
  private readonly config: ArbiterConfig;
  private epochValue: number;
  private nowMs = 0;
  /** Only regions ever requested in this epoch: generations must survive a region going free. */
  private readonly regions = new Map<number, RegionEntry>();
  /** Per node: regions it held in an earlier epoch, until its DRAINED in the current one (holdingsOf). */
  private readonly undrainedHoldings = new Map<NodeId, Set<number>>();
  /** Regions with an outstanding REVOKE, for tick() (cheap with a huge region table). */
  private readonly revoked = new Set<number>();
  private members: readonly NodeId[] | undefined;
  /** Members that said DRAINED in this epoch. */
  private readonly drained = new Set<NodeId>();

  constructor(config: ArbiterConfig) {
    assert(config.volume.length > 0, 'an arbiter needs a volume name');
    assert(Number.isSafeInteger(config.epoch) && config.epoch >= 0, `epoch must be a non-negative integer, got ${config.epoch}`);
    assert(Number.isSafeInteger(config.regionCount) && config.regionCount >= 1, 'a volume has at least one region');
    assert(Number.isSafeInteger(config.waitersPerRegionMax) && config.waitersPerRegionMax >= 1, 'waitersPerRegionMax must be at least 1');
    assert(Number.isSafeInteger(config.grantHoldMaxMs) && config.grantHoldMaxMs >= 1, 'grantHoldMaxMs must be a positive integer');
    this.config = config;
    this.epochValue = config.epoch;
    this.members = config.members === undefined ? undefined : [...config.members];
  }

  /** True until every member of the epoch said DRAINED: requests queue, nothing is granted. */
  get fenced(): boolean {
    if (this.config.bug === 'noEpochFence') return false;
    return this.members !== undefined && this.members.some((member) => !this.drained.has(member));
  }

  get epoch(): number {
    return this.epochValue;
  }

  /**
   * The whole table in one figure set (for /v1/status, O(regions touched this epoch)): how
   * many regions each node holds, how many regions have a queue, how many requesters wait,
   * and the members whose DRAINED the epoch fence still waits for.
   */
  summary(): { regionsHeld: Record<NodeId, number>; regionsContended: number; waiters: number; awaitingDrained: NodeId[] } {
    const regionsHeld: Record<NodeId, number> = {};
    let regionsContended = 0;
    let waiters = 0;
    for (const entry of this.regions.values()) {
      if (entry.holder !== undefined) regionsHeld[entry.holder] = (regionsHeld[entry.holder] ?? 0) + 1;
      if (entry.waiters.length > 0) regionsContended++;
      waiters += entry.waiters.length;
    }
    const awaitingDrained = this.members === undefined ? [] : this.members.filter((member) => !this.drained.has(member));
    return { regionsHeld, regionsContended, waiters, awaitingDrained };
  }

  /**
   * Regions `node` may have writes in flight in: those it holds, and those it held in an
   * earlier epoch and has not said DRAINED for since. When it dies, its writes there may have
   * reached some members and not others (the volume repairs them).
   */
  holdingsOf(node: NodeId): number[] {
    const regions = new Set(this.undrainedHoldings.get(node) ?? []);
    for (const [region, entry] of this.regions) if (entry.holder === node) regions.add(region);
    return [...regions].sort((a, b) => a - b);
  }

  /** The holder and generation of a region (for status pages and tests). */
  region(region: number): { holder: NodeId | undefined; generation: number; waiters: readonly NodeId[] } {
    const entry = this.regions.get(region);
    return { holder: entry?.holder, generation: entry?.generation ?? 0, waiters: [...(entry?.waiters ?? [])] };
  }

  /**
   * A new epoch: the whole table goes (every grant of the old epoch is void). With `members`,
   * the new epoch is fenced until each of them said DRAINED.
   */
  reset(epoch: number, members?: readonly NodeId[]): void {
    assert(Number.isSafeInteger(epoch) && epoch > this.epochValue, `epochs only grow: ${epoch} after ${this.epochValue}`);
    this.epochValue = epoch;
    for (const [region, entry] of this.regions) {
      if (entry.holder === undefined) continue;
      const held = this.undrainedHoldings.get(entry.holder) ?? new Set<number>();
      held.add(region);
      this.undrainedHoldings.set(entry.holder, held);
    }
    this.regions.clear();
    this.revoked.clear();
    this.drained.clear();
    this.members = members === undefined ? undefined : [...members];
  }

  receive(source: NodeId, message: PolicingMessage): ArbiterEffect[] {
    const effects: ArbiterEffect[] = [];
    const ignore = (reason: ArbiterIgnoredReason): ArbiterEffect[] => {
      effects.push({ kind: 'ignored', source, message, reason });
      return effects;
    };
    if (message.volume !== this.config.volume) return ignore('volume');
    if (message.epoch !== this.epochValue) return ignore('epoch');
    if (!Number.isSafeInteger(message.region) || message.region < 0 || message.region >= this.config.regionCount) return ignore('region');
    const region = message.region;
    switch (message.type) {
      case 'GRANT_REQUEST': {
        const entry = this.entry(region);
        if (entry.holder === source) {
          if (message.generation < entry.generation) {
            // A retried request whose GRANT was lost (or is still in flight): say it again.
            this.send(effects, source, 'GRANT', region, entry.generation);
            return effects;
          }
          // The requester has seen the current generation, so it released it and that RELEASE
          // was lost with a link: it is free. (On a FIFO link a RELEASE that did arrive would
          // have come first and made the requester no longer the holder.)
          this.free(region, entry);
        }
        if (entry.waiters.includes(source)) return ignore('duplicate');
        if (entry.holder === undefined && entry.waiters.length === 0 && !this.fenced) {
          this.grant(effects, region, entry, source);
          return effects;
        }
        if (entry.waiters.length >= this.config.waitersPerRegionMax) {
          this.send(effects, source, 'GRANT_REFUSED', region, 0);
          // The requester may have just been found to have released it (above): hand it on.
          if (entry.holder === undefined && !this.fenced) this.grantNext(effects, region, entry);
          return effects;
        }
        entry.waiters.push(source);
        effects.push({ kind: 'queued', region, node: source, position: entry.waiters.length - 1 });
        if (entry.holder !== undefined) this.revoke(effects, region, entry);
        else if (!this.fenced) this.grantNext(effects, region, entry);
        return effects;
      }
      case 'DRAINED': {
        const wasFenced = this.fenced;
        this.drained.add(source);
        // Its writes under older grants are acknowledged (and durable) on every member now.
        this.undrainedHoldings.delete(source);
        effects.push({ kind: 'send', target: source, message: { type: 'DRAINED', volume: this.config.volume, epoch: this.epochValue, region: 0, generation: 0 } });
        if (wasFenced && !this.fenced) {
          for (const [queued, entry] of this.regions) this.grantNext(effects, queued, entry);
        }
        return effects;
      }
      case 'RELEASE': {
        const entry = this.regions.get(region);
        if (entry === undefined || entry.holder !== source || entry.generation !== message.generation) return ignore('stale');
        this.free(region, entry);
        this.grantNext(effects, region, entry);
        return effects;
      }
      case 'GRANT':
      case 'REVOKE':
      case 'GRANT_REFUSED':
        return ignore('unexpected');
    }
  }

  /**
   * A link to or from `peer` came (back) up. Revokes sent to it may have been lost: send them
   * again (a holder that already released answers with its RELEASE again).
   */
  linkUp(peer: NodeId): ArbiterEffect[] {
    const effects: ArbiterEffect[] = [];
    for (const region of this.revoked) {
      const entry = this.regions.get(region)!;
      if (entry.holder === peer) this.send(effects, peer, 'REVOKE', region, entry.generation);
    }
    return effects;
  }

  /** Time passes: reports holders that keep a revoked region past grantHoldMaxMs. */
  tick(nowMs: number): ArbiterEffect[] {
    assert(Number.isSafeInteger(nowMs) && nowMs >= this.nowMs, `time goes forward: ${nowMs} after ${this.nowMs}`);
    this.nowMs = nowMs;
    const effects: ArbiterEffect[] = [];
    for (const region of this.revoked) {
      const entry = this.regions.get(region)!;
      assert(entry.holder !== undefined && entry.revokedAtMs !== undefined, 'a revoked region has a holder');
      const revokedForMs = nowMs - entry.revokedAtMs;
      if (revokedForMs > this.config.grantHoldMaxMs && !entry.overdueReported) {
        entry.overdueReported = true;
        effects.push({ kind: 'holdOverdue', region, holder: entry.holder, generation: entry.generation, revokedForMs });
      }
    }
    return effects;
  }

  /** Checks the table's invariants (O(regions touched): for tests and simulations). */
  assertInvariants(): void {
    for (const [region, entry] of this.regions) {
      // A free region with waiters would be a lost grant: every release hands it on at once.
      assert(entry.holder !== undefined || entry.waiters.length === 0 || this.fenced, `region ${region} is free while [${entry.waiters.join(',')}] wait`);
      assert(entry.holder === undefined || !entry.waiters.includes(entry.holder), `region ${region}: its holder also waits for it`);
      assert(new Set(entry.waiters).size === entry.waiters.length && entry.waiters.length <= this.config.waitersPerRegionMax, `region ${region}: waiters unique and bounded`);
      assert((entry.revokedAtMs !== undefined) === this.revoked.has(region), `region ${region}: revoked set agrees`);
      assert(entry.revokedAtMs === undefined || entry.holder !== undefined, `region ${region}: revoked while free`);
      assert(entry.waiters.length === 0 || entry.revokedAtMs !== undefined || (entry.holder === undefined && this.fenced), `region ${region}: others wait but the holder is not revoked`);
    }
  }

  // ---- internals ---------------------------------------------------------------------------

  private entry(region: number): RegionEntry {
    let entry = this.regions.get(region);
    if (entry === undefined) {
      entry = { holder: undefined, generation: 0, waiters: [], revokedAtMs: undefined, overdueReported: false };
      this.regions.set(region, entry);
    }
    return entry;
  }

  private free(region: number, entry: RegionEntry): void {
    entry.holder = undefined;
    entry.revokedAtMs = undefined;
    entry.overdueReported = false;
    this.revoked.delete(region);
  }

  private grantNext(effects: ArbiterEffect[], region: number, entry: RegionEntry): void {
    assert(entry.holder === undefined, 'only a free region is granted');
    if (entry.waiters.length === 0) return;
    const next = this.config.bug === 'grantLifo' ? entry.waiters.pop()! : entry.waiters.shift()!;
    this.grant(effects, region, entry, next);
    // Others still wait: the new holder gets to run what it has queued, then must give way.
    if (entry.waiters.length > 0) this.revoke(effects, region, entry);
  }

  private grant(effects: ArbiterEffect[], region: number, entry: RegionEntry, node: NodeId): void {
    assert(entry.holder === undefined, `region ${region} granted while held by ${entry.holder}`);
    entry.holder = node;
    entry.generation++;
    this.send(effects, node, 'GRANT', region, entry.generation);
  }

  private revoke(effects: ArbiterEffect[], region: number, entry: RegionEntry): void {
    assert(entry.holder !== undefined, 'only a held region is revoked');
    if (entry.revokedAtMs !== undefined) return; // once per generation; linkUp resends
    entry.revokedAtMs = this.nowMs;
    this.revoked.add(region);
    this.send(effects, entry.holder, 'REVOKE', region, entry.generation);
  }

  private send(effects: ArbiterEffect[], target: NodeId, type: 'GRANT' | 'REVOKE' | 'GRANT_REFUSED', region: number, generation: number): void {
    const base = { volume: this.config.volume, epoch: this.epochValue, region };
    const message: PolicingMessage = type === 'GRANT_REFUSED' ? { ...base, type, generation: 0 } : { ...base, type, generation };
    effects.push({ kind: 'send', target, message });
  }
}
