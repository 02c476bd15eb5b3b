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
import type { Logger } from '../util/log.js';
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
      this.monitor?.tick();
    }, TICK_INTERVAL_MS);
    this.tickTimer.unref();
  }

  /** Follows the coordinator's live nodes: dials every new one, and tells the membership monitor who holds a lease. */
  watchPeers(coordinator: Coordinator): void {
    const monitor = this.monitorFor(coordinator);
    this.unwatchNodes = coordinator.watchNodes((nodes) => {
      monitor.setLiveNodes(nodes.map((node) => node.id));
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
    assert(!this.volumes.has(spec.name), `volume ${spec.name} is open already`);
    if (!record.replicas.includes(this.options.self)) {
      throw new MirrorsanError('CONFIG_INVALID', `volume ${spec.name}: this node (${this.options.self}) is not one of its replicas (${record.replicas.join(', ')})`);
    }
    for (const replica of record.replicas) if (replica !== this.options.self) this.knownPeers.add(replica);
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

  async closeVolume(name: string): Promise<void> {
    const volume = this.volumes.get(name);
    if (!volume) return;
    this.volumes.delete(name);
    this.monitor?.remove(name);
    this.recordWatches.get(name)?.();
    this.recordWatches.delete(name);
    await volume.close();
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
    return this.volumes.has(name);
  }

  status(): object[] {
    const links: Record<string, object> = {};
    for (const [peer, link] of this.links) {
      links[peer] = { outbound: link.state, inbound: this.listener.connectionFor(peer) ? 'up' : 'down', connectionsOpened: link.connectionsOpened, rttMs: link.stats?.lastRttMs ?? -1 };
    }
    return [...this.volumes.values()].map((volume) => {
      const membership = volume.currentMembership;
      return {
        ...volume.status(),
        // Per replica as this node sees it: in-sync, out-of-sync (not in the record's in-sync
        // set: needs catch-up) or fenced (this node, while it may not serve).
        replicaStates: replicaStates(membership, this.options.self, volume.fenceReason !== undefined),
        degraded: membership.inSync.length < membership.replicas.length,
        membership: this.monitor?.status(volume.name) ?? null,
        links,
      };
    });
  }

  /** Closes every volume (checkpointing it), then the links and the listener. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.tickTimer);
    this.unwatchNodes?.();
    this.monitor?.close();
    for (const name of [...this.volumes.keys()]) {
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
