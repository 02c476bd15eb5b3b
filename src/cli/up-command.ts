// `mirrorsan up`: the embedded default. Writes one config per node under DIR/<id>/node.json,
// starts each node as its own OS process (so a test or an operator can SIGKILL one and
// restart it with `mirrorsan node --config`), prints where everything listens, and stops
// every node cleanly on SIGINT/SIGTERM.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { MirrorsanError } from '../errors.js';
import { createCoordinator } from '../cluster/index.js';
import { portsForNode, validateVolumeName, validateVolumeSize } from '../node/config.js';
import { defaultVolumeSpec, embeddedCoordinatorUrl, parseRegionSize } from './volume-command.js';
import type { NodeReadyInfo } from '../node/node.js';
import { createLogger } from '../util/log.js';
import { parseSize } from '../util/size.js';

export interface UpOptions {
  nodes: string;
  dir: string;
  volume: string;
  size: string;
  basePort: string;
  host: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsRequired?: boolean;
  coordinator?: string;
  /** Write-priority region size, or `single` (volume-command.ts parseRegionSize). */
  regionSize?: string;
  /** Written to every node config as leaseTtlMs / failureTimeoutMs (defaults: the config's). */
  leaseTtl?: string;
  failureTimeout?: string;
  json?: boolean;
}

/** Every node holds a replica of the volume `up` creates (issue 3: one host, up to 5 nodes). */
const NODES_MAX = 5;
const NODE_READY_TIMEOUT_MS = 120_000;

function parseIntegerOption(text: string, name: string, min: number, max: number): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new MirrorsanError('CONFIG_INVALID', `--${name} must be an integer ${min}..${max}, got "${text}"`);
  }
  return value;
}

export function binPath(): string {
  // dist/src/cli/up-command.js -> bin/mirrorsan.cjs
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'mirrorsan.cjs');
}

/**
 * The secret every node authenticates its peers with: DIR/cluster.secret, mode 0600, made once
 * (kept across `up` runs so that a node restarted from its node.json still joins).
 */
function ensureClusterSecret(dir: string): string {
  const file = path.join(dir, 'cluster.secret');
  try {
    fs.writeFileSync(file, randomBytes(32).toString('hex') + '\n', { mode: 0o600, flag: 'wx' });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  fs.chmodSync(file, 0o600);
  return file;
}

function writeNodeConfig(options: UpOptions, dir: string, index: number, coordinatorUrl: string, clusterSecretFile: string | null): string {
  const id = `n${index + 1}`;
  const basePort = parseIntegerOption(options.basePort, 'base-port', 1, 65535 - 300);
  const ports = portsForNode(basePort, index);
  const dataDir = path.join(dir, id);
  const configPath = path.join(dataDir, 'node.json');
  fs.mkdirSync(dataDir, { recursive: true });
  const config = {
    id,
    dataDir,
    nbd: { host: options.host, port: ports.nbd },
    peer: { host: options.host, port: ports.peer },
    admin: { host: options.host, port: ports.admin },
    // Volumes come from the coordinator (`mirrorsan volume create|delete` while running).
    volumes: [],
    coordinator: coordinatorUrl,
    tls: options.tlsCert
      ? { certFile: path.resolve(options.tlsCert), keyFile: path.resolve(options.tlsKey as string), required: options.tlsRequired === true }
      : null,
    ...(clusterSecretFile ? { clusterSecretFile } : {}),
    ...(options.leaseTtl !== undefined ? { leaseTtlMs: parseIntegerOption(options.leaseTtl, 'lease-ttl', 1000, 600_000) } : {}),
    ...(options.failureTimeout !== undefined ? { failureTimeoutMs: parseIntegerOption(options.failureTimeout, 'failure-timeout', 100, 600_000) } : {}),
  };
  fs.writeFileSync(configPath, JSON.stringify(config, null, 2) + '\n');
  return configPath;
}

/**
 * Creates the volume at the coordinator, or checks that the existing one matches. With several
 * nodes every one holds a replica: the spec says so, and the record starts at epoch 1 with all
 * of them in sync and n1 arbitrating write priority.
 */
async function ensureVolumeSpec(coordinatorUrl: string, name: string, sizeBytes: number, regionSizeBytes: number, nodeIds: readonly string[]): Promise<void> {
  const coordinator = await createCoordinator(coordinatorUrl, { logger: createLogger({ component: 'coordinator', level: 'warn' }) });
  try {
    const existing = await coordinator.getVolumeSpec(name);
    if (existing && existing.sizeBytes !== sizeBytes) {
      throw new MirrorsanError(
        'CONFIG_INVALID',
        `volume ${name} already has size ${existing.sizeBytes} bytes; resizing is not supported yet (asked for ${sizeBytes})`,
      );
    }
    if (existing && existing.replicas !== nodeIds.length) {
      throw new MirrorsanError('CONFIG_INVALID', `volume ${name} already has ${existing.replicas} replicas; changing that is not supported yet (asked for ${nodeIds.length} nodes)`);
    }
    if (!existing) await coordinator.putVolumeSpec({ ...defaultVolumeSpec(name, sizeBytes), replicas: nodeIds.length, regionSizeBytes }, { createOnly: true });
    if (nodeIds.length > 1 && !(await coordinator.getVolumeRecord(name))) {
      const result = await coordinator.casVolumeRecord(name, null, { epoch: 1, replicas: [...nodeIds], inSync: [...nodeIds], arbiter: nodeIds[0]!, updatedAtMs: Date.now() });
      if (!result.ok && !result.current) throw new MirrorsanError('COORD_UNAVAILABLE', `could not create the volume record of ${name}`);
    }
  } finally {
    await coordinator.close();
  }
}

function startNodeProcess(configPath: string): { child: ChildProcess; ready: Promise<NodeReadyInfo> } {
  const child = spawn(process.execPath, [binPath(), 'node', '--config', configPath, '--json'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const ready = new Promise<NodeReadyInfo>((resolve, reject) => {
    const timer = setTimeout(() => reject(new MirrorsanError('CONFIG_INVALID', `node ${configPath} not ready after ${NODE_READY_TIMEOUT_MS} ms`)), NODE_READY_TIMEOUT_MS);
    const lines = readline.createInterface({ input: child.stdout! });
    lines.once('line', (line) => {
      clearTimeout(timer);
      try {
        const parsed = JSON.parse(line) as { nodes: NodeReadyInfo[] };
        const info = parsed.nodes[0];
        if (!info) throw new Error('empty ready line');
        resolve(info);
      } catch (error) {
        reject(new MirrorsanError('CONFIG_INVALID', `node ${configPath} printed an unreadable ready line: ${line}`, { cause: error }));
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new MirrorsanError('CONFIG_INVALID', `node ${configPath} exited before it was ready (code ${code}, signal ${signal})`));
    });
  });
  return { child, ready };
}

export async function runUpCommand(options: UpOptions): Promise<void> {
  const logger = createLogger({ component: 'up' });
  const nodeCount = parseIntegerOption(options.nodes, 'nodes', 1, 64);
  if (nodeCount > NODES_MAX) {
    throw new MirrorsanError('CONFIG_INVALID', `--nodes ${nodeCount}: this version runs at most ${NODES_MAX} nodes on one host`);
  }
  validateVolumeName(options.volume);
  const sizeBytes = validateVolumeSize(parseSize(options.size), options.volume);
  if ((options.tlsCert === undefined) !== (options.tlsKey === undefined)) {
    throw new MirrorsanError('CONFIG_INVALID', '--tls-cert and --tls-key go together');
  }
  if (options.tlsRequired && options.tlsCert === undefined) {
    throw new MirrorsanError('CONFIG_INVALID', '--tls-required needs --tls-cert and --tls-key');
  }
  parseIntegerOption(options.basePort, 'base-port', 1, 65535 - 300);
  if (options.leaseTtl !== undefined) parseIntegerOption(options.leaseTtl, 'lease-ttl', 1000, 600_000);
  if (options.failureTimeout !== undefined) parseIntegerOption(options.failureTimeout, 'failure-timeout', 100, 600_000);
  const dir = path.resolve(options.dir);
  fs.mkdirSync(dir, { recursive: true });
  const coordinatorUrl = options.coordinator ?? embeddedCoordinatorUrl(dir);
  const nodeIds = Array.from({ length: nodeCount }, (_, index) => `n${index + 1}`);
  const regionSizeBytes = parseRegionSize(options.regionSize, sizeBytes);
  await ensureVolumeSpec(coordinatorUrl, options.volume, sizeBytes, regionSizeBytes, nodeIds);
  const clusterSecretFile = nodeCount > 1 ? ensureClusterSecret(dir) : null;

  const configPaths = Array.from({ length: nodeCount }, (_, index) => writeNodeConfig(options, dir, index, coordinatorUrl, clusterSecretFile));
  const started = configPaths.map((configPath) => startNodeProcess(configPath));
  const children = started.map((entry) => entry.child);

  let stopping = false;
  const stopAll = async (signal: NodeJS.Signals): Promise<void> => {
    if (stopping) return;
    stopping = true;
    logger.info('stopping nodes', { signal });
    await Promise.all(
      children.map(
        (child) =>
          new Promise<void>((resolve) => {
            if (child.exitCode !== null || child.signalCode !== null) return resolve();
            child.once('exit', () => resolve());
            child.kill('SIGTERM');
          }),
      ),
    );
    process.exit(0);
  };
  process.on('SIGINT', () => void stopAll('SIGINT'));
  process.on('SIGTERM', () => void stopAll('SIGTERM'));

  let infos: NodeReadyInfo[];
  try {
    infos = await Promise.all(started.map((entry) => entry.ready));
  } catch (error) {
    for (const child of children) child.kill('SIGTERM');
    throw error;
  }
  children.forEach((child, index) => {
    child.on('exit', (code, signal) => {
      if (stopping) return;
      logger.warn('node exited; restart it with `mirrorsan node --config FILE`', {
        node: infos[index]?.id,
        code,
        signal,
        config: configPaths[index],
      });
    });
  });
  // Each node names some export in its URI; `up` names the volume it was asked for.
  infos = infos.map((info) => ({ ...info, nbd: info.nbd.replace(/\/[^/]*$/, `/${options.volume}`) }));
  if (options.json) {
    process.stdout.write(JSON.stringify({ nodes: infos }) + '\n');
  } else {
    process.stdout.write(`mirrorsan is up with ${infos.length} node(s), volume ${options.volume} (${options.size}):\n`);
    for (const info of infos) {
      process.stdout.write(`  ${info.id}  NBD ${info.nbd}  dashboard ${info.admin}/  config ${info.config}\n`);
    }
    process.stdout.write('Press Ctrl-C to stop (every volume is checkpointed on the way out).\n');
  }
}
