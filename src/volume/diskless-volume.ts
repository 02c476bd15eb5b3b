// The export of a replicated volume on one node, across disk failures (issue 5 item 4,
// docs/replication.md "Disk failure"). While the disk works every request goes to the local
// ReplicatedVolume. When its store fails (EIO or ENOSPC on the image or a log), the volume refuses
// every pending and later request with VOLUME_DISKLESS, and this wrapper switches over:
//   1. every request from then on (and each refused one, none of which was acknowledged) goes
//      to a ForwardingDevice (diskless.ts) that holds it until step 4;
//   2. the failed volume asks its peers to make this node's stream durable (SYNC): writes this
//      node acknowledged from the members' memory must survive there, since a FLUSH forwarded
//      later only covers the peer's own stream;
//   3. the node leaves the in-sync (or catching-up) set by an epoch-incrementing CAS, so that no
//      writer waits for it and no one reads from it (I1, I3 hold for the others as before);
//   4. the failed volume is closed (peers' frames for it are dropped from then on) and the
//      forwarder starts: to an in-sync peer's NBD export of the same volume. The client sees a
//      pause, not an error.
// Re-attach (operator: `mirrorsan volume reattach`, or POST /v1/volumes/NAME/reattach) reopens
// the store from its directory (log replay, a torn tail cut: I5) as a new ReplicatedVolume that
// is out of sync: the membership monitor has it join the catching-up set, the catch-up copies
// what differs from an in-sync peer, and the CAS that promotes it puts it back in sync. Until
// then requests keep going to the forwarder; then the forwarder is drained, a FLUSH through the
// peer makes durable every write it acknowledged (the local FLUSH covers only this node's own
// stream), and requests go to the local replica again. A store failure during the re-attach
// puts the volume back to diskless (the new replica leaves the catching-up set the same way).
// Re-attach is never automatic: a disk that failed once is suspect, and each attempt costs a
// catch-up walk over the whole volume; the operator says when the disk is fit again.
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from './device.js';
import { ForwardingDevice, type ForwardStats, type ForwardTarget } from './diskless.js';
import type { ReplicatedVolume } from './replicated-volume.js';

/** How the node's CAS out of the in-sync set went. */
export type DisklessLeaveOutcome =
  /** The record lists this node in neither inSync nor catchingUp (now, or already). */
  | 'out'
  /** This node is the last in-sync member: it stays listed (it holds the only current copy). */
  | 'last-in-sync'
  /** The CAS did not go through (coordinator unreachable, lost races): try again. */
  | 'failed';

/** What the wrapper needs from the node (src/node/replication.ts). */
export interface DisklessHost {
  /** Moves this node out of the volume's in-sync or catching-up set by CAS. */
  leave(volume: ReplicatedVolume): Promise<DisklessLeaveOutcome>;
  /** Stops routing peer frames to `volume` and closes it (its store is not checkpointed). */
  detach(volume: ReplicatedVolume): Promise<void>;
  /**
   * Opens the local replica again from its directory (log replay); it then catches up. Its own
   * log is padded to `ownSequenceFloor` (ReplicatedVolumeOptions.ownSequenceFloor).
   */
  reopen(ownSequenceFloor: number): Promise<ReplicatedVolume>;
  /** In-sync peers' NBD exports of the volume, best first. */
  forwardTargets(): ForwardTarget[];
}

export interface DisklessVolumeOptions {
  volume: ReplicatedVolume;
  host: DisklessHost;
  logger: Logger;
  /** A forwarded request fails with EIO if no peer answered it this long after it arrived (default 30 s). */
  forwardWaitMaxMs?: number;
  /** How long the failed volume waits for its peers' SYNC_ACKs before it leaves anyway (default 3 s). */
  peerSyncTimeoutMs?: number;
}

export type DisklessMode =
  /** The local replica serves. */
  | 'attached'
  /**
   * The disk failed: syncing on the peers, leaving the in-sync set, closing the replica. On the
   * first failure requests are held meanwhile; after a failed re-attach they keep being forwarded.
   */
  | 'detaching'
  /** Requests go to an in-sync peer. */
  | 'diskless'
  /** Still forwarding, while a re-opened local replica catches up. */
  | 'reattaching'
  /** The re-attached replica is in sync: forwarded requests drain, then it serves. */
  | 'switching'
  | 'closed';

/** Pause between CAS attempts when leaving the in-sync set fails (coordinator unreachable). */
const LEAVE_RETRY_DELAY_MS = 1000;
/** CAS attempts before forwarding starts anyway (requests then wait for writers that wait for us). */
const LEAVE_ATTEMPTS_MAX = 10;
const DEFAULT_PEER_SYNC_TIMEOUT_MS = 3000;

export interface DisklessStatus {
  mode: DisklessMode;
  /** Wall-clock time the disk failed (ms since the epoch). */
  sinceMs: number;
  /** The store error that detached the disk. */
  error: { code: string; message: string };
  /** The peer requests go to now. */
  forwardingTo: string | null;
  /** From the failure to the first request the forwarder could send (null until then). */
  failureToForwardingMs: number | null;
  /** Whether the peers acknowledged this node's stream durable before it left (false: timed out). */
  peersSynced: boolean | null;
  leaveOutcome: DisklessLeaveOutcome | null;
  /** Why the last re-attach failed, if it did. */
  reattachError: string | null;
  /** Requests the failed replica refused (in flight at the failure, or just after) that went to the forwarder. */
  reroutedRequests: number;
  forwarder: ForwardStats | null;
}

export class DisklessVolume implements BlockDevice {
  readonly name: string;
  readonly description: string;
  private readonly geometryValue: DeviceGeometry;
  private readonly host: DisklessHost;
  private readonly log: Logger;
  private readonly forwardWaitMaxMs: number | undefined;
  private readonly peerSyncTimeoutMs: number;
  private modeValue: DisklessMode = 'attached';
  /** The replica that serves (mode attached). */
  private local: ReplicatedVolume | undefined;
  /** The re-opened replica catching up (modes reattaching, switching). */
  private reattaching: ReplicatedVolume | undefined;
  private forwarder: ForwardingDevice | undefined;
  /** Requests wait here while the forwarder drains before the local replica takes over. */
  private gate: Promise<void> | undefined;
  private failure: { atMs: number; atMonotonicMs: number; error: MirrorsanError } | undefined;
  private failureToForwardingMs: number | undefined;
  private peersSynced: boolean | undefined;
  private leaveOutcome: DisklessLeaveOutcome | undefined;
  private reattachError: string | undefined;
  /** The last own sequence any failed replica assigned: a reopened one continues after it. */
  private ownSequenceFloor = 0;
  private readonly counters = { diskFailures: 0, reattaches: 0, reroutedRequests: 0 };

  constructor(options: DisklessVolumeOptions) {
    this.local = options.volume;
    this.name = options.volume.name;
    this.description = options.volume.description;
    this.geometryValue = Object.freeze({ ...options.volume.geometry() });
    this.host = options.host;
    this.log = options.logger;
    this.forwardWaitMaxMs = options.forwardWaitMaxMs;
    this.peerSyncTimeoutMs = options.peerSyncTimeoutMs ?? DEFAULT_PEER_SYNC_TIMEOUT_MS;
    // Failed before this export existed (while the node waited to rejoin): its peers wait for it.
    const failed = options.volume.diskFailureError;
    if (failed) queueMicrotask(() => this.diskFailed(options.volume, failed));
  }

  get mode(): DisklessMode {
    return this.modeValue;
  }

  /** The replica open on this node (serving, or catching up after a re-attach); undefined while diskless. */
  get replica(): ReplicatedVolume | undefined {
    return this.local ?? this.reattaching;
  }

  // ---- BlockDevice ------------------------------------------------------------------------

  geometry(): DeviceGeometry {
    return this.geometryValue;
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    return this.route((device) => device.read(offset, length));
  }

  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    return this.route((device) => device.write(offset, data, options));
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    return this.route((device) => device.writeZeroes(offset, length, options));
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    return this.route((device) => device.trim(offset, length, options));
  }

  async flush(): Promise<void> {
    return this.route((device) => device.flush());
  }

  async cache(offset: number, length: number): Promise<void> {
    return this.route((device) => device.cache(offset, length));
  }

  blockStatus(offset: number, length: number): Extent[] {
    const local = this.local;
    if (local && !this.gate) {
      try {
        return local.blockStatus(offset, length);
      } catch (error) {
        if (!isMirrorsanError(error, 'VOLUME_DISKLESS')) throw error;
        this.diskFailed(local, error);
      }
    }
    // No local map to trust: everything is data (a client reads what it could have skipped).
    return [{ offset, length: Math.max(1, Math.min(length, this.geometryValue.sizeBytes - offset)), hole: false, zero: false }];
  }

  /** The local replica while it serves, else the forwarder; a request the failed replica refused goes to the forwarder. */
  private async route<T>(call: (device: BlockDevice) => Promise<T>): Promise<T> {
    // Bounded: a request meets at most one disk failure per pass, and after it the forwarder.
    for (let attempt = 0; attempt < 3; attempt++) {
      if (this.gate) await this.gate;
      if (this.modeValue === 'closed') throw new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closing`);
      const local = this.local;
      if (local) {
        try {
          return await call(local);
        } catch (error) {
          if (!isMirrorsanError(error, 'VOLUME_DISKLESS')) throw error;
          // Refused (in flight when the disk failed, or just after): never acknowledged, so it
          // goes to the forwarder like any later request.
          this.counters.reroutedRequests++;
          this.diskFailed(local, error);
          continue;
        }
      }
      assert(this.forwarder !== undefined, `volume ${this.name}: neither a local replica nor a forwarder in mode ${this.modeValue}`);
      return call(this.forwarder);
    }
    throw new MirrorsanError('NBD_EIO', `volume ${this.name}: a request met the disk failure over and over`);
  }

  // ---- disk failure ------------------------------------------------------------------------

  /** `volume`'s store failed (its onDiskFailure, or a VOLUME_DISKLESS refusal). Idempotent. */
  diskFailed(volume: ReplicatedVolume, error: MirrorsanError): void {
    if (this.modeValue === 'closed') return;
    if (volume === this.local) {
      this.enterDiskless(volume, error);
    } else if (volume === this.reattaching) {
      this.reattachFailed(volume, error);
    }
  }

  private enterDiskless(volume: ReplicatedVolume, error: MirrorsanError): void {
    assert(this.forwarder === undefined, `volume ${this.name}: a forwarder exists while attached`);
    const cause = volume.diskFailureError ?? (isMirrorsanError(error.cause) ? error.cause : error);
    this.local = undefined;
    this.modeValue = 'detaching';
    this.counters.diskFailures++;
    this.failure = { atMs: Date.now(), atMonotonicMs: performance.now(), error: cause };
    this.failureToForwardingMs = undefined;
    this.peersSynced = undefined;
    this.leaveOutcome = undefined;
    this.forwarder = new ForwardingDevice({
      name: this.name,
      description: this.description,
      geometry: this.geometryValue,
      targets: () => this.host.forwardTargets(),
      logger: this.log.child('forward'),
      ...(this.forwardWaitMaxMs !== undefined ? { waitMaxMs: this.forwardWaitMaxMs } : {}),
    });
    this.log.error('disk failed: going diskless (requests will be forwarded to an in-sync peer)', { code: cause.code, error: cause.message });
    this.detach(volume, true).catch((failure: unknown) => this.log.error('going diskless failed', { error: String(failure) }));
  }

  /** The re-opened replica failed while catching up (or just as it was about to serve): diskless again. */
  private reattachFailed(volume: ReplicatedVolume, error: MirrorsanError): void {
    const cause = volume.diskFailureError ?? error;
    this.reattaching = undefined;
    this.reattachError = `${cause.code}: ${cause.message}`;
    this.counters.diskFailures++;
    // The forwarder goes on; 'diskless' (and another re-attach) once the replica is closed.
    if (this.modeValue === 'reattaching' || this.modeValue === 'switching') this.modeValue = 'detaching';
    this.log.error('disk failed again during the re-attach: staying diskless', { code: cause.code, error: cause.message });
    this.detach(volume, false).catch((failure: unknown) => this.log.error('detaching the re-attached replica failed', { error: String(failure) }));
  }

  /** Steps 2-4 of the header: peers' SYNC, the CAS out of the sets, closing the failed replica. */
  private async detach(volume: ReplicatedVolume, firstFailure: boolean): Promise<void> {
    const synced = await volume.syncOwnStreamOnPeers(this.peerSyncTimeoutMs).catch(() => false);
    if (firstFailure) this.peersSynced = synced;
    if (!synced) this.log.warn('peers did not confirm this node\'s writes durable in time; leaving the in-sync set anyway', { timeoutMs: this.peerSyncTimeoutMs });
    const outcome = await this.leave(volume);
    if (firstFailure) this.leaveOutcome = outcome;
    try {
      await this.host.detach(volume);
    } catch (error) {
      this.log.warn('closing the failed replica did not go cleanly', { error: error instanceof Error ? error.message : String(error) });
    }
    // Closed: it assigns no more sequences. Its peers may hold own entries up to here.
    this.ownSequenceFloor = Math.max(this.ownSequenceFloor, volume.lastOwnSequence);
    if (this.modeValue !== 'detaching') return; // closed meanwhile
    this.modeValue = 'diskless';
    if (!firstFailure) return; // the forwarder never stopped
    this.failureToForwardingMs = Math.round(performance.now() - this.failure!.atMonotonicMs);
    this.forwarder!.start();
    this.log.warn('diskless: forwarding this node\'s requests to in-sync peers', {
      peersSynced: synced,
      leave: outcome,
      failureToForwardingMs: this.failureToForwardingMs,
      reattach: `mirrorsan volume reattach ${this.name}`,
    });
  }

  private async leave(volume: ReplicatedVolume): Promise<DisklessLeaveOutcome> {
    for (let attempt = 1; attempt <= LEAVE_ATTEMPTS_MAX; attempt++) {
      let outcome: DisklessLeaveOutcome;
      try {
        outcome = await this.host.leave(volume);
      } catch (error) {
        this.log.warn('leaving the in-sync set failed', { attempt, error: error instanceof Error ? error.message : String(error) });
        outcome = 'failed';
      }
      if (outcome === 'last-in-sync') {
        this.log.error('this node is the last in-sync replica and its disk failed: no peer holds the current data; requests fail with EIO until the disk is re-attached', { volume: this.name });
      }
      if (outcome !== 'failed' || this.modeValue === 'closed') return outcome;
      await new Promise((resolve) => setTimeout(resolve, LEAVE_RETRY_DELAY_MS).unref());
    }
    this.log.error('could not leave the in-sync set: forwarding anyway (writers may wait for this node until it is removed)', { volume: this.name, attempts: LEAVE_ATTEMPTS_MAX });
    return 'failed';
  }

  // ---- re-attach -------------------------------------------------------------------------

  /**
   * Re-opens the local replica (its disk is fit again) and lets it catch up; requests go to it
   * once it is in sync. Rejects if the store cannot be opened (the fault is still there).
   */
  async reattach(): Promise<{ mode: DisklessMode; changed: boolean }> {
    if (this.modeValue === 'detaching') {
      throw new MirrorsanError('VOLUME_BUSY', `volume ${this.name}: the failed replica is still being detached; try again in a moment`);
    }
    if (this.modeValue !== 'diskless') {
      // Attached: nothing to do; reattaching or switching: under way already; closed.
      return { mode: this.modeValue, changed: false };
    }
    this.reattachError = undefined;
    this.log.info('re-attaching the disk: reopening the local replica');
    let volume: ReplicatedVolume;
    try {
      volume = await this.host.reopen(this.ownSequenceFloor);
    } catch (error) {
      this.reattachError = error instanceof Error ? error.message : String(error);
      this.log.error('re-attach failed: the local replica cannot be opened; staying diskless', { error: this.reattachError });
      throw error;
    }
    if ((this.modeValue as DisklessMode) === 'closed') {
      await this.host.detach(volume).catch(() => undefined);
      throw new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name} is closing`);
    }
    if (volume.diskFailureError) {
      // It failed while opening or rejoining (its onDiskFailure may not have reached us yet).
      this.reattaching = volume;
      this.modeValue = 'reattaching';
      this.reattachFailed(volume, volume.diskFailureError);
      throw new MirrorsanError('STORE_IO', `volume ${this.name}: the disk failed again during the re-attach: ${volume.diskFailureError.message}`);
    }
    this.reattaching = volume;
    this.modeValue = 'reattaching';
    this.counters.reattaches++;
    this.log.info('local replica reopened: catching up while requests are still forwarded', { state: volume.replicaState });
    return { mode: this.modeValue, changed: true };
  }

  /** Timers (the node's volume tick): switches back once the re-attached replica is in sync. */
  tick(): void {
    const volume = this.reattaching;
    if (this.modeValue !== 'reattaching' || !volume) return;
    if (volume.replicaState === 'in-sync' && volume.fenceReason === undefined && volume.diskFailureError === undefined) void this.switchToLocal(volume);
  }

  private async switchToLocal(volume: ReplicatedVolume): Promise<void> {
    this.modeValue = 'switching';
    let openGate!: () => void;
    this.gate = new Promise<void>((resolve) => (openGate = resolve));
    const forwarder = this.forwarder!;
    try {
      await forwarder.drain();
      // Writes the peer acknowledged may be only in the members' memory; a local FLUSH after the
      // switch covers this node's stream only, so they are made durable now.
      await forwarder.flush().catch((error: unknown) =>
        this.log.warn('FLUSH through the peer before re-attaching failed', { error: error instanceof Error ? error.message : String(error) }),
      );
    } finally {
      if (this.reattaching === volume && (this.modeValue as DisklessMode) === 'switching') {
        forwarder.close();
        this.forwarder = undefined;
        this.local = volume;
        this.reattaching = undefined;
        this.modeValue = 'attached';
        const disklessForMs = this.failure ? Math.round(performance.now() - this.failure.atMonotonicMs) : 0;
        this.log.info('disk re-attached: the local replica is in sync and serves again', { disklessForMs });
      } else if ((this.modeValue as DisklessMode) === 'switching') {
        this.modeValue = 'diskless';
      }
      this.gate = undefined;
      openGate();
    }
  }

  // ---- inspection ---------------------------------------------------------------------------

  /** Null while attached (and never failed since the last re-attach). */
  status(): DisklessStatus | null {
    if (this.modeValue === 'attached' || !this.failure) return null;
    const stats = this.forwarder?.stats() ?? null;
    return {
      mode: this.modeValue,
      sinceMs: this.failure.atMs,
      error: { code: this.failure.error.code, message: this.failure.error.message },
      forwardingTo: stats?.node ?? null,
      failureToForwardingMs: this.failureToForwardingMs ?? null,
      peersSynced: this.peersSynced ?? null,
      leaveOutcome: this.leaveOutcome ?? null,
      reattachError: this.reattachError ?? null,
      reroutedRequests: this.counters.reroutedRequests,
      forwarder: stats,
    };
  }

  /** Numbers for /metrics. */
  stats(): Record<string, number> {
    const forward = this.forwarder?.stats();
    return {
      diskless: this.modeValue === 'attached' ? 0 : 1,
      diskFailures: this.counters.diskFailures,
      reattaches: this.counters.reattaches,
      reroutedRequests: this.counters.reroutedRequests,
      forwardedRequests: forward?.forwardedRequests ?? 0,
      forwardRetries: (forward?.retriedRequests ?? 0) + (forward?.replayedRequests ?? 0),
      forwardFailures: forward?.failedRequests ?? 0,
      forwardPending: (forward?.pending ?? 0) + (forward?.waiting ?? 0),
    };
  }

  /** Fails forwarded requests still pending; the node closes the replica itself. */
  close(): void {
    if (this.modeValue === 'closed') return;
    this.modeValue = 'closed';
    this.forwarder?.close();
    this.forwarder = undefined;
  }
}
