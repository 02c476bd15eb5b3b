// A whole mirrorsan node: opens its volumes (replaying their logs), serves them over NBD,
// answers the admin API, and shuts down cleanly (every volume checkpointed) on request.
// With a coordinator, the node registers under a lease and serves every volume spec the
// coordinator holds: `mirrorsan volume create` on a running cluster shows up as a new
// export within a second, and `volume delete` closes the export and removes its data.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { AdminServer, MetricsText, type AdminHandlers, type AdminReply } from '../admin/http.js';
import { renderDashboard } from '../admin/dashboard.js';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { createCoordinator, type Coordinator, type NodeSession, type VolumeSpec } from '../cluster/index.js';
import { NbdServer } from '../nbd/server.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, ExportRegistry } from '../volume/device.js';
import { LocalVolume } from '../volume/local-volume.js';
import type { NodeConfig, VolumeConfig } from './config.js';
import { FaultSwitch, faultInjectionEnabled, parseFaultRequest } from './faults.js';
import { NodeReplication, readClusterSecret } from './replication.js';

export interface NodeReadyInfo {
  id: string;
  pid: number;
  nbd: string;
  admin: string;
  config: string;
}

class VolumeRegistry implements ExportRegistry {
  private readonly volumes = new Map<string, BlockDevice>();
  add(device: BlockDevice): void {
    this.volumes.set(device.name, device);
  }
  list(): BlockDevice[] {
    return [...this.volumes.values()];
  }
  get(name: string): BlockDevice | undefined {
    return this.volumes.get(name);
  }
  remove(name: string): void {
    this.volumes.delete(name);
  }
  defaultName(): string | undefined {
    return this.volumes.size === 1 ? [...this.volumes.keys()][0] : undefined;
  }
}

export class MirrorsanNode {
  readonly config: NodeConfig;
  readonly configPath: string;
  private readonly logger: Logger;
  private readonly volumes = new Map<string, LocalVolume>();
  private readonly registry = new VolumeRegistry();
  private readonly failedVolumes = new Map<string, { name: string; code: string; message: string }>();
  /** Volumes that come from the coordinator's specs (the others come from the config file). */
  private readonly managedVolumes = new Set<string>();
  /** Replicated volumes whose record does not list this node. */
  private readonly volumesNotHere = new Set<string>();
  private coordinator: Coordinator | undefined;
  private session: NodeSession | undefined;
  private specPoll: NodeJS.Timeout | undefined;
  private specSync: Promise<void> | undefined;
  private registration: Promise<void> | undefined;
  private nbdServer: NbdServer | undefined;
  private adminServer: AdminServer | undefined;
  private peerServer: net.Server | undefined;
  /** Peer links and replicated volumes (replicas > 1); only with a cluster secret. */
  private replication: NodeReplication | undefined;
  private readonly startedAtMs = Date.now();
  private stopping: Promise<void> | undefined;
  /** Test configuration only (src/node/faults.ts): injected store faults; undefined in production. */
  private readonly faults: FaultSwitch | undefined;

  constructor(config: NodeConfig, configPath: string, logger: Logger) {
    this.config = config;
    this.configPath = configPath;
    this.logger = logger;
    this.faults = faultInjectionEnabled(config, process.env) ? new FaultSwitch() : undefined;
  }

  async start(): Promise<NodeReadyInfo> {
    const { config } = this;
    fs.mkdirSync(config.dataDir, { recursive: true });
    if (config.clusterSecretFile) {
      this.replication = new NodeReplication({
        self: config.id,
        clusterSecret: readClusterSecret(config.clusterSecretFile, this.logger),
        peerEndpoint: config.peer,
        logger: this.logger.child('replication'),
        checkpointIntervalMs: config.checkpointIntervalMs,
        failureTimeoutMs: config.failureTimeoutMs,
        catchUpRateBytesPerSec: config.catchUpRateBytesPerSec,
        ...(this.faults ? { faultsFor: (volume: string) => this.faults!.imageFaults(volume) } : {}),
      });
    }
    for (const volumeConfig of config.volumes) await this.openVolume(volumeConfig);
    if (config.coordinator) await this.joinCoordinator(config.coordinator);
    // Replicated volumes serve only under a lease, after rejoining under it (I2, I3): report
    // ready once that is done, so that a client does not meet a fenced export at start. After a
    // SIGKILL this waits for the previous incarnation's lease to run out (at most 2 TTL + 1 s).
    if (this.replication && this.registration) await this.registration;

    const tls = config.tls
      ? { cert: fs.readFileSync(config.tls.certFile), key: fs.readFileSync(config.tls.keyFile), required: config.tls.required }
      : undefined;
    this.nbdServer = new NbdServer({ registry: this.registry, logger: this.logger, tls });
    await this.nbdServer.listen({ port: config.nbd.port, host: config.nbd.host });

    if (this.replication) {
      await this.replication.listen();
    } else {
      // The peer port belongs to the mirror engine; until replication is enabled on this node
      // it answers nothing and says why in the log, so a misconfigured peer is visible.
      this.peerServer = net.createServer((socket) => {
        this.logger.child('peer').warn('refused peer connection: replication is not enabled on this node', {
          remote: `${socket.remoteAddress}:${socket.remotePort}`,
        });
        socket.destroy();
      });
      await listenNet(this.peerServer, config.peer.port, config.peer.host);
    }

    if (this.faults) this.logger.warn('fault injection is ENABLED on this node (test configuration): POST /v1/faults can fail its disks');
    this.adminServer = new AdminServer(this.adminHandlers(), this.logger.child('admin'));
    await this.adminServer.listen(config.admin.port, config.admin.host);

    const firstVolume = config.volumes[0]?.name ?? [...this.volumes.keys()].sort()[0] ?? '';
    const info: NodeReadyInfo = {
      id: config.id,
      pid: process.pid,
      nbd: `nbd://${hostForUri(config.nbd.host)}:${config.nbd.port}/${firstVolume}`,
      admin: `http://${hostForUri(config.admin.host)}:${config.admin.port}`,
      config: this.configPath,
    };
    this.logger.info('node ready', { nbd: info.nbd, admin: info.admin, volumes: this.registry.list().length });
    return info;
  }

  /** Opens (creating if new) and exports one volume; a failure is logged and reported, not thrown. */
  private async openVolume(volumeConfig: VolumeConfig): Promise<boolean> {
    const { config } = this;
    const volumeLogger = this.logger.child(`volume ${volumeConfig.name}`);
    let volume: LocalVolume;
    try {
      volume = await LocalVolume.open({
        dir: this.volumeDir(volumeConfig.name),
        name: volumeConfig.name,
        sizeBytes: volumeConfig.sizeBytes,
        description: volumeConfig.description,
        readOnly: volumeConfig.readOnly,
        logger: volumeLogger,
        checkpointLogBytes: config.checkpointLogBytes,
        checkpointIntervalMs: config.checkpointIntervalMs,
        directWriteMinBytes: config.directWriteMinBytes,
      });
    } catch (error) {
      // One volume that cannot open (a corrupt log, a missing image) must not take the
      // others down: it is left unexported, with the reason in the log and in /v1/status.
      const code = isMirrorsanError(error) ? error.code : 'STORE_IO';
      const message = error instanceof Error ? error.message : String(error);
      volumeLogger.error('volume failed to open; it is not exported', { code, error: message });
      this.failedVolumes.set(volumeConfig.name, { name: volumeConfig.name, code, message });
      return false;
    }
    const { recovery } = volume;
    if (recovery.replayedEntries > 0 || recovery.cutTail) {
      volumeLogger.info('log replay done', {
        replayedEntries: recovery.replayedEntries,
        replayedBytes: recovery.replayedBytes,
        cutTail: recovery.cutTail,
        durationMs: recovery.durationMs,
      });
    }
    this.failedVolumes.delete(volumeConfig.name);
    this.volumes.set(volumeConfig.name, volume);
    this.registry.add(volume);
    return true;
  }

  private volumeDir(name: string): string {
    return path.join(this.config.dataDir, 'volumes', name);
  }

  private async joinCoordinator(url: string): Promise<void> {
    const log = this.logger.child('coordinator');
    this.coordinator = await createCoordinator(url, { logger: log });
    // Volume specs need no lease: serve them first. Registration runs in the background,
    // because after a SIGKILL the previous incarnation's lease on this node id must run out
    // first (up to a TTL), and a restarting node should not keep its clients waiting for that.
    // Replicated volumes stay fenced until the lease is held (see register and MembershipMonitor).
    await this.syncVolumeSpecs();
    this.replication?.watchPeers(this.coordinator);
    this.specPoll = setInterval(() => {
      this.specSync ??= this.syncVolumeSpecs()
        .catch((error: unknown) => log.warn('could not read volume specs', { error: String(error) }))
        .finally(() => (this.specSync = undefined));
    }, SPEC_POLL_INTERVAL_MS);
    this.specPoll.unref();
    this.registration = this.register(log);
  }

  private async register(log: Logger): Promise<void> {
    const { config } = this;
    const coordinator = this.coordinator;
    while (coordinator && !this.stopping) {
      try {
        this.session = await coordinator.registerNode(
          { id: config.id, nbd: config.nbd, peer: config.peer, admin: config.admin },
          { leaseTtlMs: config.leaseTtlMs },
        );
        const session = this.session;
        log.info('registered at the coordinator', { leaseTtlMs: session.ttlMs });
        session.onLost((reason) => {
          if (this.stopping) return;
          // Self-fencing (I2, I3): the others may remove this node once the lease has run out on
          // their side, so from now on nothing is acknowledged or read here until it rejoins.
          log.error('lost the coordinator lease: fencing replicated volumes, registering again', { reason });
          void this.replication?.setSession(undefined);
          this.registration = this.register(log);
        });
        // Every replicated volume rejoins (a new epoch) under the new lease before it serves.
        await this.replication?.setSession(session);
        return;
      } catch (error) {
        if (this.stopping) return;
        log.warn('registration at the coordinator failed; retrying', { error: String(error) });
        await new Promise((resolve) => setTimeout(resolve, 1000).unref());
      }
    }
  }

  /** Serves every volume the coordinator specifies, and retires those it no longer does. */
  private async syncVolumeSpecs(): Promise<void> {
    const coordinator = this.coordinator;
    if (!coordinator || this.stopping) return;
    const specs = new Map((await coordinator.listVolumeSpecs()).map((spec) => [spec.name, spec]));
    for (const spec of specs.values()) {
      if (this.stopping) return;
      if (this.volumes.has(spec.name) || this.failedVolumes.has(spec.name)) continue;
      if (spec.replicas > 1) {
        if (this.replication?.has(spec.name) || this.volumesNotHere.has(spec.name)) continue;
        if (await this.openReplicatedVolume(coordinator, spec)) this.managedVolumes.add(spec.name);
        continue;
      }
      if (await this.openVolume(volumeConfigOf(spec))) {
        this.managedVolumes.add(spec.name);
        this.logger.info('volume added from the coordinator', { volume: spec.name, sizeBytes: spec.sizeBytes });
      }
    }
    for (const name of this.volumesNotHere) if (!specs.has(name)) this.volumesNotHere.delete(name);
    for (const name of [...this.managedVolumes]) {
      if (specs.has(name) || this.stopping) continue;
      const volume = this.volumes.get(name);
      this.registry.remove(name);
      this.volumes.delete(name);
      this.managedVolumes.delete(name);
      await volume?.close();
      await this.replication?.closeVolume(name);
      await fs.promises.rm(this.volumeDir(name), { recursive: true, force: true });
      this.logger.info('volume deleted at the coordinator: export closed and data removed', { volume: name });
    }
  }

  /** A volume with replicas > 1: served through the replication shell, not LocalVolume. */
  private async openReplicatedVolume(coordinator: Coordinator, spec: VolumeSpec): Promise<boolean> {
    const volumeLogger = this.logger.child(`volume ${spec.name}`);
    try {
      if (!this.replication) {
        throw new MirrorsanError('CONFIG_INVALID', `volume ${spec.name} has ${spec.replicas} replicas but this node has no clusterSecretFile`);
      }
      const record = await coordinator.getVolumeRecord(spec.name);
      if (!record) {
        // `volume create` writes the spec, then the record: look again at the next poll.
        volumeLogger.debug('replicated volume has no record yet');
        return false;
      }
      if (!record.replicas.includes(this.config.id)) {
        // Every node should export every volume (DESIGN §5: a node without a replica
        // forwards to one); until forwarding exists, a non-replica node does not export it.
        if (!this.volumesNotHere.has(spec.name)) {
          this.volumesNotHere.add(spec.name);
          volumeLogger.info('this node holds no replica of the volume; not exported here', { replicas: record.replicas.join(',') });
        }
        return false;
      }
      const volume = await this.replication.openVolume(spec, record, this.volumeDir(spec.name), coordinator);
      this.failedVolumes.delete(spec.name);
      // The export survives a disk failure (diskless mode: it forwards to an in-sync peer).
      this.registry.add(this.replication.exportOf(spec.name) ?? volume);
      volumeLogger.info('replicated volume opened', { epoch: record.epoch, replicas: record.replicas.join(','), inSync: record.inSync.join(',') });
      return true;
    } catch (error) {
      const code = isMirrorsanError(error) ? error.code : 'STORE_IO';
      const message = error instanceof Error ? error.message : String(error);
      volumeLogger.error('volume failed to open; it is not exported', { code, error: message });
      this.failedVolumes.set(spec.name, { name: spec.name, code, message });
      return false;
    }
  }

  status(): object {
    return {
      node: { id: this.config.id, pid: process.pid, uptimeMs: Date.now() - this.startedAtMs },
      // The newest epoch among the replicated volumes' records (each volume shows its own).
      epoch: this.replication?.highestEpoch ?? 0,
      nbd: { endpoint: `${this.config.nbd.host}:${this.config.nbd.port}`, ...this.nbdServer?.stats() },
      volumes: [...this.volumes.values()].map((volume) => ({
        name: volume.name,
        sizeBytes: volume.geometry().sizeBytes,
        readOnly: volume.geometry().readOnly,
        replicas: [{ node: this.config.id, state: 'in-sync' }],
        inSync: [this.config.id],
        recovery: volume.recovery,
        ...volume.stats(),
      })),
      replicatedVolumes: this.replication?.status() ?? [],
      volumesWithoutReplicaHere: [...this.volumesNotHere],
      failedVolumes: [...this.failedVolumes.values()],
      coordinator: this.config.coordinator
        ? { url: this.config.coordinator, leaseValid: this.session?.isValid() ?? false, leaseRemainingMs: this.session?.remainingMs() ?? 0 }
        : null,
    };
  }

  metrics(): string {
    const text = new MetricsText();
    const nbd = this.nbdServer?.stats();
    text.add('mirrorsan_up', 'gauge', 'Whether the node is serving.', 1, { node: this.config.id });
    if (nbd) {
      for (const [key, value] of Object.entries(nbd)) {
        if (typeof value === 'number') {
          text.add(`mirrorsan_nbd_${snakeCase(key)}`, 'gauge', `NBD server ${key}.`, value, { node: this.config.id });
        }
      }
    }
    for (const volume of this.volumes.values()) {
      for (const [key, value] of Object.entries(volume.stats())) {
        if (typeof value === 'number') {
          text.add(`mirrorsan_volume_${snakeCase(key)}`, 'gauge', `Volume ${key}.`, value, { node: this.config.id, volume: volume.name });
        }
      }
    }
    for (const volume of this.replication?.volumeStats() ?? []) {
      for (const [key, value] of Object.entries(volume.values)) {
        text.add(`mirrorsan_replicated_volume_${snakeCase(key)}`, 'gauge', `Replicated volume ${key}.`, value, { node: this.config.id, volume: volume.name });
      }
    }
    return text.toString();
  }

  private adminHandlers(): AdminHandlers {
    const handlers: AdminHandlers = {
      status: () => this.status(),
      metrics: () => this.metrics(),
      dashboardHtml: () => renderDashboard(this.status()),
      reattach: (volume) => this.reattach(volume),
    };
    const faults = this.faults;
    if (faults) {
      const current = (): AdminReply => ({ status: 200, body: { node: this.config.id, faults: faults.list(), injectedFailures: faults.injected } });
      handlers.faults = {
        set: (body) => {
          try {
            faults.set(parseFaultRequest(body));
          } catch (error) {
            return { status: 400, body: { error: (error as Error).message, code: isMirrorsanError(error) ? error.code : 'CONFIG_INVALID' } };
          }
          this.logger.warn('fault injected', { faults: JSON.stringify(faults.list()) });
          return current();
        },
        clear: (volume) => {
          faults.clear(volume);
          this.logger.warn('faults cleared', { volume: volume ?? 'all', faults: JSON.stringify(faults.list()) });
          return current();
        },
        list: current,
      };
    }
    return handlers;
  }

  /** POST /v1/volumes/NAME/reattach: re-opens a diskless volume's replica, which then catches up. */
  private async reattach(volume: string): Promise<AdminReply> {
    const replication = this.replication;
    if (!replication?.has(volume)) {
      return { status: 404, body: { error: `no replicated volume ${volume} on node ${this.config.id}`, code: 'VOLUME_NOT_FOUND' } };
    }
    try {
      const result = await replication.reattach(volume);
      if (!result) return { status: 409, body: { error: `volume ${volume} runs without a coordinator: it cannot go diskless or re-attach`, code: 'CONFIG_INVALID' } };
      return { status: 200, body: { node: this.config.id, volume, mode: result.mode, changed: result.changed } };
    } catch (error) {
      return { status: 503, body: { node: this.config.id, volume, error: (error as Error).message, code: isMirrorsanError(error) ? error.code : 'STORE_IO' } };
    }
  }

  /** Stops accepting work, lets in-flight requests finish, checkpoints every volume. */
  stop(): Promise<void> {
    this.stopping ??= this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    this.logger.info('stopping node');
    if (this.specPoll) clearInterval(this.specPoll);
    await this.specSync;
    await this.nbdServer?.close();
    await new Promise<void>((resolve) => (this.peerServer ? this.peerServer.close(() => resolve()) : resolve()));
    await this.replication?.close();
    await this.adminServer?.close();
    for (const volume of this.volumes.values()) {
      try {
        await volume.close();
      } catch (error) {
        this.logger.error('volume did not close cleanly; its log will be replayed on next start', {
          volume: volume.name,
          error: String(error),
        });
      }
    }
    // A registration still waiting for an old lease to expire ends when the client closes.
    await this.session?.revoke().catch(() => undefined);
    await this.coordinator?.close().catch(() => undefined);
    this.logger.info('node stopped');
  }
}

/** How often a node re-reads the coordinator's volume specs. */
const SPEC_POLL_INTERVAL_MS = 500;

function volumeConfigOf(spec: VolumeSpec): VolumeConfig {
  return { name: spec.name, sizeBytes: spec.sizeBytes, description: `mirrorsan volume ${spec.name}`, readOnly: false };
}

function snakeCase(name: string): string {
  return name.replace(/[A-Z]/g, (letter) => `_${letter.toLowerCase()}`);
}

function hostForUri(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

function listenNet(server: net.Server, port: number, host: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', (error) =>
      reject(new MirrorsanError('CONFIG_INVALID', `cannot listen on ${host}:${port}: ${error.message}`, { cause: error })),
    );
    server.listen(port, host, () => resolve());
  });
}
