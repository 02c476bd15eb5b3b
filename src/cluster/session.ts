// The client half of a lease, shared by both backends: a renewal loop, a deadline, and the
// one-way transition to "lost". The backend supplies renew() and revokeRemote(); this class
// decides when the session is valid.
//
// The rule that makes I2/I3 hold: the session is valid until (the time a renewal was *sent*
// + the TTL the coordinator confirmed) − a safety margin. The coordinator starts its own TTL
// when it *receives* the renewal, which is later, so the node always gives up its lease before
// anybody else can see it expire. isValid() reads the clock each time: a late timer (a stalled
// event loop) cannot stretch the lease.
import { assert } from '../errors.js';
import type { Logger } from '../util/log.js';
import { LOST_CALLBACKS_MAX } from './coordinator.js';
import type { LeaseLostReason, NodeSession, Unsubscribe } from './coordinator.js';

export type RenewResult =
  /** The coordinator confirmed the lease until validUntilMs (on this session's clock). */
  | { kind: 'renewed'; validUntilMs: number }
  /** The coordinator says the lease is gone: lost for good. */
  | { kind: 'rejected'; detail: string }
  /** No answer (unreachable, timeout, I/O error): try again while the lease lasts. */
  | { kind: 'failed'; error: unknown };

export interface LeaseKeeperOptions {
  nodeId: string;
  leaseId: string;
  ttlMs: number;
  /** The validity the grant itself confirmed. */
  validUntilMs: number;
  /** Same clock as validUntilMs (embedded: wall clock shared by processes; etcd: monotonic). */
  now: () => number;
  renew: () => Promise<RenewResult>;
  revokeRemote: () => Promise<void>;
  logger: Logger;
  onEnded?: () => void;
}

/** Renew three times per TTL (as etcd's Go client does): two renewals may fail in a row. */
export function renewIntervalMs(ttlMs: number): number {
  return Math.max(50, Math.floor(ttlMs / 3));
}

/** Margin for clock rate differences and the gap between checking validity and acting on it. */
export function safetyMarginMs(ttlMs: number): number {
  return Math.min(500, Math.floor(ttlMs / 10));
}

export class LeaseKeeper implements NodeSession {
  readonly nodeId: string;
  readonly leaseId: string;
  readonly ttlMs: number;
  private validUntilMs: number;
  private readonly marginMs: number;
  private readonly options: LeaseKeeperOptions;
  private lostReason: LeaseLostReason | undefined;
  private readonly callbacks = new Set<(reason: LeaseLostReason) => void>();
  private renewTimer: NodeJS.Timeout | undefined;
  private deadlineTimer: NodeJS.Timeout | undefined;
  /** The renewal in flight, if any (at most one). */
  private renewal: Promise<void> | undefined;

  constructor(options: LeaseKeeperOptions) {
    assert(options.ttlMs > 0, 'lease TTL is positive');
    this.options = options;
    this.nodeId = options.nodeId;
    this.leaseId = options.leaseId;
    this.ttlMs = options.ttlMs;
    this.validUntilMs = options.validUntilMs;
    this.marginMs = safetyMarginMs(options.ttlMs);
    this.armDeadline();
    this.scheduleRenew(renewIntervalMs(this.ttlMs));
  }

  isValid(): boolean {
    return this.remainingMs() > 0;
  }

  /** Once this reaches 0 the session is lost for good, even if a renewal answer arrives later. */
  remainingMs(): number {
    if (this.lostReason !== undefined) return 0;
    const remainingMs = Math.floor(this.validUntilMs - this.marginMs - this.options.now());
    if (remainingMs > 0) return remainingMs;
    this.lose('expired', `no renewal confirmed within the TTL of ${this.ttlMs} ms`);
    return 0;
  }

  get lost(): LeaseLostReason | undefined {
    return this.lostReason;
  }

  onLost(callback: (reason: LeaseLostReason) => void): Unsubscribe {
    if (this.lostReason !== undefined) {
      const reason = this.lostReason;
      queueMicrotask(() => callback(reason));
      return () => {};
    }
    assert(this.callbacks.size < LOST_CALLBACKS_MAX, `at most ${LOST_CALLBACKS_MAX} onLost callbacks per session`);
    // Wrap so that the same function registered twice is called twice and unsubscribes singly.
    const entry = (reason: LeaseLostReason): void => callback(reason);
    this.callbacks.add(entry);
    return () => {
      this.callbacks.delete(entry);
    };
  }

  async revoke(): Promise<void> {
    this.lose('revoked', 'revoke() called');
    await this.options.revokeRemote();
  }

  /** Resolves once no renewal is in flight (after close(), nothing touches the backend). */
  async drained(): Promise<void> {
    await this.renewal;
  }

  /** The coordinator client closes: stop renewing; the lease runs out on its own. */
  close(): void {
    this.lose('closed', 'coordinator closed');
  }

  /** Ends the session (idempotent): timers stop, callbacks fire once, asynchronously. */
  lose(reason: LeaseLostReason, detail: string): void {
    if (this.lostReason !== undefined) return;
    this.lostReason = reason;
    clearTimeout(this.renewTimer);
    clearTimeout(this.deadlineTimer);
    this.renewTimer = undefined;
    this.deadlineTimer = undefined;
    const fields = { node: this.nodeId, lease: this.leaseId, reason, detail };
    if (reason === 'revoked' || reason === 'closed') this.options.logger.info('lease ended', fields);
    else this.options.logger.warn('lease lost: this node must stop acknowledging writes', fields);
    const callbacks = [...this.callbacks];
    this.callbacks.clear();
    this.options.onEnded?.();
    queueMicrotask(() => {
      for (const callback of callbacks) callback(reason);
    });
  }

  private armDeadline(): void {
    clearTimeout(this.deadlineTimer);
    const delayMs = this.validUntilMs - this.marginMs - this.options.now();
    this.deadlineTimer = setTimeout(() => {
      // remainingMs() ends the session when the time is up; otherwise a renewal moved the deadline.
      if (this.remainingMs() > 0) this.armDeadline();
    }, Math.max(0, delayMs));
  }

  private scheduleRenew(delayMs: number): void {
    if (this.lostReason !== undefined) return;
    clearTimeout(this.renewTimer);
    this.renewTimer = setTimeout(() => {
      if (this.renewal) return;
      this.renewal = this.renewOnce().finally(() => (this.renewal = undefined));
    }, delayMs);
  }

  private async renewOnce(): Promise<void> {
    if (this.lostReason !== undefined) return;
    // Never renew a lease this node already had to consider gone (remainingMs() ends it): a
    // late renewal must not bring back a session whose owner stopped acknowledging writes.
    if (this.remainingMs() <= 0) return;
    let result: RenewResult;
    try {
      result = await this.options.renew();
    } catch (error) {
      result = { kind: 'failed', error };
    }
    if (this.lostReason !== undefined) return;
    switch (result.kind) {
      case 'renewed':
        // An answer that arrives after the validity ran out comes too late (see above).
        if (this.remainingMs() <= 0) return;
        // Validity only moves forward: an answer to an older renewal cannot shorten it.
        if (result.validUntilMs > this.validUntilMs) {
          this.validUntilMs = result.validUntilMs;
          this.armDeadline();
        }
        this.scheduleRenew(renewIntervalMs(this.ttlMs));
        return;
      case 'rejected':
        this.lose('rejected', result.detail);
        return;
      case 'failed':
        this.options.logger.warn('lease renewal failed; retrying while the lease lasts', {
          node: this.nodeId,
          lease: this.leaseId,
          remainingMs: this.remainingMs(),
          error: result.error instanceof Error ? result.error.message : String(result.error),
        });
        this.scheduleRenew(Math.max(25, Math.floor(renewIntervalMs(this.ttlMs) / 2)));
        return;
    }
  }
}
