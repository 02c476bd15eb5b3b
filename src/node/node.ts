// A whole mirrorsan node: opens its volumes (replaying their logs), serves them over NBD,
// answers the admin API, and shuts down cleanly (every volume checkpointed) on request.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { AdminServer, MetricsText } from '../admin/http.js';
import { renderDashboard } from '../admin/dashboard.js';
import { MirrorsanError, isMirrorsanError } from '../errors.js';
import { NbdServer } from '../nbd/server.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, ExportRegistry } from '../volume/device.js';
import { LocalVolume } from '../volume/local-volume.js';
import type { NodeConfig } from './config.js';

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
  private readonly failedVolumes: { name: string; code: string; message: string }[] = [];
  private nbdServer: NbdServer | undefined;
  private adminServer: AdminServer | undefined;
  private peerServer: net.Server | undefined;
  private readonly startedAtMs = Date.now();
  private stopping: Promise<void> | undefined;

  constructor(config: NodeConfig, configPath: string, logger: Logger) {
    this.config = config;
    this.configPath = configPath;
    this.logger = logger;
  }

  async start(): Promise<NodeReadyInfo> {
    const { config } = this;
    fs.mkdirSync(config.dataDir, { recursive: true });
    for (const volumeConfig of config.volumes) {
      const volumeLogger = this.logger.child(`volume ${volumeConfig.name}`);
      let volume: LocalVolume;
      try {
        volume = await LocalVolume.open({
          dir: path.join(config.dataDir, 'volumes', volumeConfig.name),
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
        this.failedVolumes.push({ name: volumeConfig.name, code, message });
        continue;
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
      this.volumes.set(volumeConfig.name, volume);
      this.registry.add(volume);
    }

    const tls = config.tls
      ? { cert: fs.readFileSync(config.tls.certFile), key: fs.readFileSync(config.tls.keyFile), required: config.tls.required }
      : undefined;
    this.nbdServer = new NbdServer({ registry: this.registry, logger: this.logger, tls });
    await this.nbdServer.listen({ port: config.nbd.port, host: config.nbd.host });

    // The peer port belongs to the mirror engine; until replication is enabled on this node
    // it answers nothing and says why in the log, so a misconfigured peer is visible.
    this.peerServer = net.createServer((socket) => {
      this.logger.child('peer').warn('refused peer connection: replication is not enabled on this node', {
        remote: `${socket.remoteAddress}:${socket.remotePort}`,
      });
      socket.destroy();
    });
    await listenNet(this.peerServer, config.peer.port, config.peer.host);

    this.adminServer = new AdminServer(
      { status: () => this.status(), metrics: () => this.metrics(), dashboardHtml: () => renderDashboard(this.status()) },
      this.logger.child('admin'),
    );
    await this.adminServer.listen(config.admin.port, config.admin.host);

    const firstVolume = config.volumes[0]?.name ?? '';
    const info: NodeReadyInfo = {
      id: config.id,
      pid: process.pid,
      nbd: `nbd://${hostForUri(config.nbd.host)}:${config.nbd.port}/${firstVolume}`,
      admin: `http://${hostForUri(config.admin.host)}:${config.admin.port}`,
      config: this.configPath,
    };
    this.logger.info('node ready', { nbd: info.nbd, admin: info.admin, volumes: config.volumes.length });
    return info;
  }

  status(): object {
    return {
      node: { id: this.config.id, pid: process.pid, uptimeMs: Date.now() - this.startedAtMs },
      epoch: 0,
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
      failedVolumes: this.failedVolumes,
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
    return text.toString();
  }

  /** Stops accepting work, lets in-flight requests finish, checkpoints every volume. */
  stop(): Promise<void> {
    this.stopping ??= this.stopOnce();
    return this.stopping;
  }

  private async stopOnce(): Promise<void> {
    this.logger.info('stopping node');
    await this.nbdServer?.close();
    await new Promise<void>((resolve) => (this.peerServer ? this.peerServer.close(() => resolve()) : resolve()));
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
    this.logger.info('node stopped');
  }
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
