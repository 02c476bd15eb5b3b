// The node's replication shell: the peer listener on the node's peer endpoint, one
// authenticated PeerLink dialled to every other node, and the replicated volumes this node
// serves. It routes every received frame to its volume (by the frame's volume name; the
// sender is the authenticated peer id of the connection), tells each volume about link news,
// and ticks their timers. The volumes decide what goes on which connection (see
// src/volume/replicated-volume.ts): our own initiatives on the link we dialled, our target's
// answers back on the connection the source dialled to us.
//
// Peers come from the coordinator's live registrations (each carries the node's peer
// endpoint). A node that dials us is accepted if it is a live node or a replica of one of our
// volumes: registration runs in the background, so a peer may dial before we have seen it.
import fs from 'node:fs';
import type { Coordinator, NodeRegistration, NodeSession, Unsubscribe, VolumeRecord, VolumeSpec } from '../cluster/index.js';
import { replicaStates } from '../cluster/membership.js';
import { MirrorsanError, assert } from '../errors.js';
import { PeerLink, PeerListener, type PeerConnection, type PeerMessage, type PeerTimings } from '../replication/peer-link.js';
import type { ImageFaults } from '../store/image.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice } from '../volume/device.js';
import type { ForwardTarget } from '../volume/diskless.js';
import { DisklessVolume, type DisklessLeaveOutcome } from '../volume/diskless-volume.js';
import { ReplicatedVolume } from '../volume/replicated-volume.js';
import { DEFAULT_FAILURE_TIMEOUT_MS, type Endpoint } from './config.js';
import { MembershipMonitor, membershipOf } from './membership.js';

export { membershipOf };

/** Every node of a cluster shares this id; the cluster secret is what tells clusters apart. */
export const CLUSTER_ID = 'mirrorsan';
/** Volume timers (resends, checkpoints, overdue grants) run this often. */
const TICK_INTERVAL_MS = 50;
/** Peers this node dials at most (a cluster is small: DESIGN.md). */
const PEERS_MAX = 64;
/** ACKs kept for volumes that are not open here yet (see `earlyAcks`). */
const EARLY_ACKS_MAX = 4096;

export interface NodeReplicationOptions {
  self: string;
  clusterSecret: Buffer;
  peerEndpoint: Endpoint;
  logger: Logger;
  timings?: Partial<PeerTimings>;
  /** Local store checkpoint period for every volume. */
  checkpointIntervalMs?: number;
  /** A peer silent this long (and without a lease) leaves the in-sync set (NodeConfig.failureTimeoutMs). */
  failureTimeoutMs?: number;
  /** NodeConfig.catchUpRateBytesPerSec (0: unlimited). */
  catchUpRateBytesPerSec?: number;
  /** Test-only injected store faults per volume (src/node/faults.ts); absent in production. */
  faultsFor?: (volume: string) => ImageFaults | undefined;
  /** Diskless mode: a forwarded request fails with EIO after waiting this long for an in-sync peer (default 30 s). */
  forwardWaitMaxMs?: number;
}

/** Closing a replica whose disk failed may hang on that disk: not longer than this. */
const DETACH_CLOSE_TIMEOUT_MS = 10_000;

/** Where to reach a node's NBD export: its NBD address, or its peer address if the NBD one is a wildcard. */
export function nbdTargetOf(node: Pick<NodeRegistration, 'nbd' | 'peer'>): { host: string; port: number } {
  const wildcard = node.nbd.host === '' || node.nbd.host === '0.0.0.0' || node.nbd.host === '::';
  return { host: wildcard ? node.peer.host : node.nbd.host, port: node.nbd.port };
}

/** Reads the cluster secret (a file written by `mirrorsan up`, mode 0600). */
export function readClusterSecret(file: string, logger: Logger): Buffer {
  let text: string;
  try {
    const stat = fs.statSync(file);
    if ((stat.mode & 0o077) !== 0) logger.warn('cluster secret file is readable by others; chmod 600 it', { file });
    text = fs.readFileSync(file, 'utf8').trim();
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `cannot read the cluster secret ${file}: ${(error as Error).message}`, { cause: error });
  }
  if (text.length < 16) throw new MirrorsanError('CONFIG_INVALID', `cluster secret ${file} is shorter than 16 characters`);
  return Buffer.from(text, 'utf8');
}

export class NodeReplication {
  private readonly options: NodeReplicationOptions;
  private readonly logger: Logger;
  private readonly listener: PeerListener;
  private readonly links = new Map<string, PeerLink>();
  private readonly volumes = new Map<string, ReplicatedVolume>();
  /** Ids that may dial us: live nodes and the replicas of our volumes. */
  private readonly knownPeers = new Set<string>();
  /**
   * The last ACK per (volume, peer) that arrived on our link to the peer before the volume was
   * open here. A peer's target sends the ACK that positions our stream when it opens the volume
   * or when the link comes up; if that happens before we open the volume, the ACK would be lost
   * and our source would wait for it for ever. It is replayed when the volume opens, and
   * forgotten when the link it came on goes down (the next link-up brings a fresh one).
   */
  private readonly earlyAcks = new Map<string, Map<string, PeerMessage>>();
  private earlyAckCount = 0;
  private tickTimer: NodeJS.Timeout | undefined;
  private unwatchNodes: Unsubscribe | undefined;
  /** Per open volume: the watch on its coordinator record (epoch changes reach the volume). */
  private readonly recordWatches = new Map<string, Unsubscribe>();
  /** Failure detection, removal, fencing and rejoin (issue 5); made with the first coordinator. */
  private monitor: MembershipMonitor | undefined;
  /**
   * Per volume opened with a coordinator: the export clients use (the local replica, or
   * forwarding while the disk is detached), what reopening needs, and the newest record (watched
   * for as long as the export lives, also while no replica is open here).
   */
  private readonly exports = new Map<string, { frontEnd: DisklessVolume; spec: VolumeSpec; dir: string; coordinator: Coordinator; unwatch: Unsubscribe }>();
  private readonly latestRecords = new Map<string, VolumeRecord>();
  /** NBD endpoints of the live registrations (forwarding targets in diskless mode). */
  private nbdTargets = new Map<string, { host: string; port: number }>();
  private closed = false;

  constructor(options: NodeReplicationOptions) {
    this.options = options;
    this.logger = options.logger;
    const identity = { clusterId: CLUSTER_ID, nodeId: options.self, clusterSecret: options.clusterSecret };
    this.listener = new PeerListener({
      identity,
      endpoint: options.peerEndpoint,
      isKnownPeer: (id) => id !== options.self && this.knownPeers.has(id),
      onConnection: (connection) => this.inbound(connection),
      isStale: (volume, epoch) => this.isStale(volume, epoch),
      logger: this.logger.child('peer'),
      ...(options.timings ? { timings: options.timings } : {}),
    });
  }

  async listen(): Promise<void> {
    await this.listener.listen();
    this.tickTimer = setInterval(() => {
      const now = Math.floor(performance.now());
      for (const volume of this.volumes.values()) volume.tick(now);
      for (const entry of this.exports.values()) entry.frontEnd.tick();
      this.monitor?.tick();
    }, TICK_INTERVAL_MS);
    this.tickTimer.unref();
  }

  /** Follows the coordinator's live nodes: dials every new one, and tells the membership monitor who holds a lease. */
  watchPeers(coordinator: Coordinator): void {
    const monitor = this.monitorFor(coordinator);
    this.unwatchNodes = coordinator.watchNodes((nodes) => {
      monitor.setLiveNodes(nodes.map((node) => node.id));
      this.nbdTargets = new Map(nodes.map((node) => [node.id, nbdTargetOf(node)]));
      this.setPeers(nodes);
    });
  }

  /**
   * This node's coordinator lease (undefined: lost). Without a valid one every replicated volume
   * here is fenced (I2, I3); with a new one each volume rejoins (a new epoch) before it serves.
   * Resolves once every volume rejoined (or found it is out of sync).
   */
  setSession(session: NodeSession | undefined): Promise<void> {
    return this.monitor?.setSession(session) ?? Promise.resolve();
  }

  private monitorFor(coordinator: Coordinator): MembershipMonitor {
    this.monitor ??= new MembershipMonitor({
      self: this.options.self,
      coordinator,
      failureTimeoutMs: this.options.failureTimeoutMs ?? DEFAULT_FAILURE_TIMEOUT_MS,
      logger: this.logger.child('membership'),
      isPeerUp: (peer) => this.links.get(peer)?.state === 'up' || this.listener.connectionFor(peer) !== undefined,
    });
    return this.monitor;
  }

  /** Dials every node in `nodes` not dialled yet (links stay up across lease blips). */
  setPeers(nodes: readonly Pick<NodeRegistration, 'id' | 'peer'>[]): void {
    if (this.closed) return;
    for (const node of nodes) {
      if (node.id === this.options.self) continue;
      this.knownPeers.add(node.id);
      if (this.links.has(node.id)) continue;
      if (this.links.size >= PEERS_MAX) {
        this.logger.error('too many peers; not dialling', { peer: node.id, limit: PEERS_MAX });
        continue;
      }
      this.dial(node.id, node.peer);
    }
  }

  /**
   * Opens a replicated volume this node is a replica of. The record must exist (created with
   * the spec by `mirrorsan up` or `mirrorsan volume create`). Then follows the record (every
   * newer epoch reaches the volume) and *rejoins*: moves the record to a new epoch with the
   * same members. This node lost whatever it knew before it (re)started (grants it held, the
   * arbiter's table if it arbitrates, its peers' stream positions); a new epoch makes every
   * member drop its grants and the arbiter start fenced, so no grant of the old epoch can
   * overlap one given after the restart.
   */
  async openVolume(spec: VolumeSpec, record: VolumeRecord, dir: string, coordinator?: Coordinator): Promise<ReplicatedVolume> {
    assert(!this.exports.has(spec.name), `volume ${spec.name} is exported already`);
    const volume = await this.openReplica(spec, record, dir, coordinator);
    // Diskless mode needs the coordinator: leaving the in-sync set is a CAS there.
    if (coordinator) {
      const frontEnd = new DisklessVolume({
        volume,
        logger: this.logger.child(`volume ${spec.name}`),
        ...(this.options.forwardWaitMaxMs !== undefined ? { forwardWaitMaxMs: this.options.forwardWaitMaxMs } : {}),
        host: {
          leave: (failed) => this.leaveDiskless(spec.name, failed),
          detach: (failed) => this.closeReplica(spec.name, failed),
          reopen: (ownSequenceFloor) => this.reopenReplica(spec.name, ownSequenceFloor),
          forwardTargets: () => this.forwardTargets(spec.name),
        },
      });
      const unwatch = coordinator.watchVolumeRecord(spec.name, (next) => {
        if (next) this.noteRecord(spec.name, next);
      });
      this.noteRecord(spec.name, record);
      this.exports.set(spec.name, { frontEnd, spec, dir, coordinator, unwatch });
    }
    return volume;
  }

  /**
   * What NBD clients are served for the volume: the export that survives disk failures (the
   * local replica, or forwarding to an in-sync peer), or the replica itself without a coordinator.
   */
  exportOf(name: string): BlockDevice | undefined {
    return this.exports.get(name)?.frontEnd ?? this.volumes.get(name);
  }

  /** POST /v1/volumes/NAME/reattach: re-opens the local replica of a diskless volume (it catches up). */
  async reattach(name: string): Promise<{ mode: string; changed: boolean } | undefined> {
    const entry = this.exports.get(name);
    if (!entry) return undefined;
    return entry.frontEnd.reattach();
  }

  /** The replica itself: opened from `dir` (log replay), routed, followed and monitored. */
  private async openReplica(spec: VolumeSpec, record: VolumeRecord, dir: string, coordinator?: Coordinator, ownSequenceFloor?: number): Promise<ReplicatedVolume> {
    assert(!this.volumes.has(spec.name), `volume ${spec.name} is open already`);
    if (!record.replicas.includes(this.options.self)) {
      throw new MirrorsanError('CONFIG_INVALID', `volume ${spec.name}: this node (${this.options.self}) is not one of its replicas (${record.replicas.join(', ')})`);
    }
    for (const replica of record.replicas) if (replica !== this.options.self) this.knownPeers.add(replica);
    let opened: ReplicatedVolume | undefined;
    const volume = await ReplicatedVolume.open({
      name: spec.name,
      description: `mirrorsan volume ${spec.name} (${record.replicas.length} replicas)`,
      sizeBytes: spec.sizeBytes,
      dir,
      self: this.options.self,
      membership: membershipOf(record),
      regionSizeBytes: spec.regionSizeBytes,
      mode: spec.mode,
      transport: {
        sendToPeer: (peer, message) => this.links.get(peer)?.send(message) ?? false,
        answerSource: (source, message) => this.listener.connectionFor(source)?.send(message) ?? false,
        resetInbound: (source, reason) => this.listener.connectionFor(source)?.close(`stream reset: ${reason}`),
        resetOutbound: (peer, reason) => this.links.get(peer)?.reconnect(reason),
      },
      logger: this.logger.child(`volume ${spec.name}`),
      ...(this.options.faultsFor?.(spec.name) ? { faults: this.options.faultsFor(spec.name)! } : {}),
      ...(ownSequenceFloor !== undefined ? { ownSequenceFloor } : {}),
      // Bound once open: a store failure then reaches the export, which goes diskless.
      ...(coordinator ? { onDiskFailure: (failure: MirrorsanError) => opened && this.exports.get(spec.name)?.frontEnd.diskFailed(opened, failure) } : {}),
      ...(this.options.checkpointIntervalMs !== undefined ? { checkpointIntervalMs: this.options.checkpointIntervalMs } : {}),
      strict: spec.strict,
      servingCheck: () => this.monitor?.leaseProblem(),
      // Without a coordinator nobody could move this replica back in sync: no catch-up.
      ...(coordinator
        ? {
            catchUp: {
              caughtUp: () => this.monitorFor(coordinator).caughtUp(spec.name),
              leave: () => this.monitorFor(coordinator).leaveToCatchUp(spec.name),
              rateBytesPerSec: this.options.catchUpRateBytesPerSec ?? 0,
            },
          }
        : {}),
    });
    opened = volume;
    this.volumes.set(spec.name, volume);
    // Links that came up before the volume existed: tell it now (its peers wait for our ACKs),
    // then hand it the positioning ACKs its peers sent before it was open.
    for (const [peer, link] of this.links) if (link.state === 'up') volume.outboundUp(peer);
    const early = this.earlyAcks.get(spec.name);
    if (early) {
      this.earlyAcks.delete(spec.name);
      this.earlyAckCount -= early.size;
      for (const [peer, message] of early) volume.receive(peer, message);
    }
    for (const peer of record.replicas) if (this.listener.connectionFor(peer)) volume.inboundUp(peer);
    if (coordinator) {
      const monitor = this.monitorFor(coordinator);
      this.recordWatches.set(spec.name, coordinator.watchVolumeRecord(spec.name, (next) => {
        if (!next || this.volumes.get(spec.name) !== volume) return;
        monitor.recordChanged(spec.name, next);
        volume.changeMembership(membershipOf(next));
      }));
      // Fenced until this node holds a lease and has rejoined under it (see MembershipMonitor).
      await monitor.add(spec, record, volume);
    }
    return volume;
  }

  /** Closes the volume's export (forwarding, if diskless) and its replica. */
  async closeVolume(name: string): Promise<void> {
    const entry = this.exports.get(name);
    if (entry) {
      this.exports.delete(name);
      entry.unwatch();
      entry.frontEnd.close();
      this.latestRecords.delete(name);
    }
    const volume = this.volumes.get(name);
    if (volume) await this.closeReplica(name, volume);
  }

  /** Stops routing frames to `volume` and closes it (bounded: its disk may hang). */
  private async closeReplica(name: string, volume: ReplicatedVolume): Promise<void> {
    if (this.volumes.get(name) !== volume) return;
    this.volumes.delete(name);
    this.monitor?.remove(name);
    this.recordWatches.get(name)?.();
    this.recordWatches.delete(name);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.logger.error('closing a replica timed out; its logs will be replayed when it opens again', { volume: name, timeoutMs: DETACH_CLOSE_TIMEOUT_MS });
        resolve();
      }, DETACH_CLOSE_TIMEOUT_MS);
      timer.unref();
    });
    try {
      await Promise.race([volume.close(), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- diskless mode (src/volume/diskless-volume.ts) -------------------------------------

  /** The CAS out of the in-sync or catching-up set, through the membership monitor. */
  private async leaveDiskless(name: string, volume: ReplicatedVolume): Promise<DisklessLeaveOutcome> {
    if (this.volumes.get(name) !== volume || !this.monitor) return 'failed';
    const { outcome, record } = await this.monitor.leaveDiskless(name);
    if (record) this.noteRecord(name, record);
    return outcome;
  }

  /** Opens the replica of a diskless volume again from the newest record; it joins the catch-up on its own. */
  private async reopenReplica(name: string, ownSequenceFloor: number): Promise<ReplicatedVolume> {
    const entry = this.exports.get(name);
    if (!entry) throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} is not open here`);
    if (this.volumes.has(name)) throw new MirrorsanError('CONFIG_INVALID', `volume ${name}: a replica is open already`);
    const record = (await entry.coordinator.getVolumeRecord(name)) ?? this.latestRecords.get(name);
    if (!record) throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} has no record at the coordinator`);
    this.noteRecord(name, record);
    // ACKs kept while no replica was open here position the stream of the replica that failed,
    // not of this one (its log is what it replayed now): drop them.
    const early = this.earlyAcks.get(name);
    if (early) {
      this.earlyAcks.delete(name);
      this.earlyAckCount -= early.size;
    }
    const volume = await this.openReplica(entry.spec, record, entry.dir, entry.coordinator, ownSequenceFloor);
    // The links stayed up across the failure, so no peer would send the ACK that positions this
    // replica's stream (a link-up does): redial them, as a restarted node's links would be.
    for (const peer of record.replicas) if (peer !== this.options.self) this.links.get(peer)?.reconnect(`volume ${name} re-attached: repositioning its stream`);
    return volume;
  }

  /** In-sync members other than this node that hold a live registration, arbiter first. */
  private forwardTargets(name: string): ForwardTarget[] {
    const record = this.latestRecords.get(name);
    if (!record) return [];
    const members = record.inSync.filter((node) => node !== this.options.self);
    const arbiter = record.arbiter;
    if (arbiter !== undefined && members.includes(arbiter)) members.sort((a, b) => (a === arbiter ? -1 : b === arbiter ? 1 : 0));
    const targets: ForwardTarget[] = [];
    for (const node of members) {
      const target = this.nbdTargets.get(node);
      if (target) targets.push({ node, target });
    }
    return targets;
  }

  private noteRecord(name: string, record: VolumeRecord): void {
    const known = this.latestRecords.get(name);
    if (!known || record.epoch > known.epoch) this.latestRecords.set(name, record);
  }

  /** The open replicated volumes (for /metrics). */
  openVolumes(): ReplicatedVolume[] {
    return [...this.volumes.values()];
  }

  /** The newest epoch among this node's replicated volumes (0: none). */
  get highestEpoch(): number {
    let epoch = 0;
    for (const volume of this.volumes.values()) epoch = Math.max(epoch, volume.epoch);
    return epoch;
  }

  /** The bound peer endpoint (after listen; port 0 picks a free one). */
  get endpoint(): Endpoint {
    return this.listener.endpoint;
  }

  has(name: string): boolean {
    return this.volumes.has(name) || this.exports.has(name);
  }

  status(): object[] {
    const links: Record<string, object> = {};
    for (const [peer, link] of this.links) {
      links[peer] = { outbound: link.state, inbound: this.listener.connectionFor(peer) ? 'up' : 'down', connectionsOpened: link.connectionsOpened, rttMs: link.stats?.lastRttMs ?? -1 };
    }
    const { self } = this.options;
    return this.volumeNames().map((name) => {
      const volume = this.volumes.get(name);
      const entry = this.exports.get(name);
      const diskless = entry?.frontEnd.status() ?? null;
      if (!volume) {
        // Diskless, no replica open here: what the record says, and where requests go.
        const record = this.latestRecords.get(name);
        const states = record ? replicaStates(record, self, false) : [];
        return {
          name,
          sizeBytes: entry?.spec.sizeBytes ?? 0,
          epoch: record?.epoch ?? 0,
          mode: entry?.spec.mode ?? 'sync',
          replicas: record ? [...record.replicas] : [],
          inSync: record ? [...record.inSync] : [],
          arbiter: record?.arbiter ?? record?.inSync[0] ?? null,
          catchingUp: [...(record?.catchingUp ?? [])],
          fence: null,
          strict: entry?.spec.strict ?? false,
          replicaState: 'diskless',
          replicaStates: states.map((replica) => (replica.node === self && replica.state === 'out-of-sync' ? { node: self, state: 'diskless' } : replica)),
          degraded: record ? record.inSync.length < record.replicas.length : true,
          catchUp: null,
          diskless,
          membership: null,
          links,
        };
      }
      const membership = volume.currentMembership;
      const status = volume.status() as { replicaState: string };
      // The disk failed and the replica is about to close: it serves by forwarding already.
      const detaching = diskless !== null && diskless.mode === 'detaching';
      const states = replicaStates(membership, self, volume.fenceReason !== undefined);
      return {
        ...status,
        replicaState: detaching ? 'diskless' : status.replicaState,
        // Per replica as this node sees it: in-sync, out-of-sync (not in the record's in-sync
        // set: needs catch-up), fenced (this node, while it may not serve), or diskless (this
        // node, its disk detached: it serves by forwarding).
        replicaStates: detaching ? states.map((replica) => (replica.node === self ? { node: self, state: 'diskless' } : replica)) : states,
        degraded: membership.inSync.length < membership.replicas.length,
        diskless,
        membership: this.monitor?.status(volume.name) ?? null,
        links,
      };
    });
  }

  /** Per volume, the numbers for /metrics: the replica's (when one is open) and the export's. */
  volumeStats(): { name: string; values: Record<string, number> }[] {
    return this.volumeNames().map((name) => {
      const volume = this.volumes.get(name);
      const record = this.latestRecords.get(name);
      const base = volume?.stats() ?? (record ? { epoch: record.epoch, inSyncMembers: record.inSync.length, replicas: record.replicas.length, inSyncHere: 0 } : {});
      return { name, values: { ...base, ...(this.exports.get(name)?.frontEnd.stats() ?? {}) } };
    });
  }

  /** Every replicated volume exported here: with a replica open, or diskless. */
  private volumeNames(): string[] {
    return [...new Set([...this.volumes.keys(), ...this.exports.keys()])].sort();
  }

  /** Closes every volume (checkpointing it), then the links and the listener. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.tickTimer);
    this.unwatchNodes?.();
    this.monitor?.close();
    for (const name of this.volumeNames()) {
      try {
        await this.closeVolume(name);
      } catch (error) {
        this.logger.error('replicated volume did not close cleanly; its logs will be replayed on next start', { volume: name, error: String(error) });
      }
    }
    await Promise.all([...this.links.values()].map((link) => link.close()));
    await this.listener.close();
  }

  private dial(peer: string, endpoint: Endpoint): void {
    const link = new PeerLink({
      identity: { clusterId: CLUSTER_ID, nodeId: this.options.self, clusterSecret: this.options.clusterSecret },
      peerId: peer,
      endpoint: { host: endpoint.host, port: endpoint.port },
      logger: this.logger.child('peer'),
      onMessage: (message) => {
        if (message.type === 'ACK' && !this.volumes.has(message.volume)) this.keepEarlyAck(peer, message);
        else this.route(peer, message);
      },
      onState: (state) => {
        if (state === 'down') this.forgetEarlyAcks(peer);
        for (const volume of this.volumes.values()) {
          if (state === 'up') volume.outboundUp(peer);
          else volume.outboundDown(peer);
        }
      },
      isStale: (volume, epoch) => this.isStale(volume, epoch),
      ...(this.options.timings ? { timings: this.options.timings } : {}),
    });
    this.links.set(peer, link);
    link.start();
  }

  private inbound(connection: PeerConnection): { onMessage: (message: PeerMessage) => void } {
    const peer = connection.peerId;
    // Called before any data frame of the connection is delivered, and after our AUTH went out
    // on it: the dialler repositions its stream on exactly the ACKs sent here.
    for (const volume of this.volumes.values()) volume.inboundUp(peer);
    // The peer is back: our link to it need not wait out its backoff.
    this.links.get(peer)?.dialNowIfWaiting();
    return { onMessage: (message) => this.route(peer, message) };
  }

  private keepEarlyAck(peer: string, message: PeerMessage & { type: 'ACK' }): void {
    let byPeer = this.earlyAcks.get(message.volume);
    if (!byPeer) {
      byPeer = new Map();
      this.earlyAcks.set(message.volume, byPeer);
    }
    if (!byPeer.has(peer)) {
      if (this.earlyAckCount >= EARLY_ACKS_MAX) {
        this.logger.warn('too many ACKs for volumes not open here; dropping one', { peer, volume: message.volume, limit: EARLY_ACKS_MAX });
        return;
      }
      this.earlyAckCount++;
    }
    byPeer.set(peer, message);
  }

  private forgetEarlyAcks(peer: string): void {
    for (const [volume, byPeer] of this.earlyAcks) {
      if (byPeer.delete(peer)) this.earlyAckCount--;
      if (byPeer.size === 0) this.earlyAcks.delete(volume);
    }
  }

  private route(peer: string, message: PeerMessage): void {
    if (message.type === 'ERROR') {
      this.logger.warn('peer sent an error', { peer, code: message.code, message: message.message });
      return;
    }
    const volume = this.volumes.get(message.volume);
    if (!volume) {
      this.logger.debug('frame for a volume not open here', { peer, volume: message.volume, type: message.type });
      return;
    }
    volume.receive(peer, message);
  }

  private isStale(volumeName: string, epoch: number): boolean {
    const volume = this.volumes.get(volumeName);
    return volume !== undefined && epoch < volume.epoch;
  }
}
