// `mirrorsan volume create|list|delete`: volume specs at the coordinator. Running nodes pick
// up a change within a second (they poll the specs): a created volume becomes an NBD export,
// a deleted one is closed and its data removed.
import path from 'node:path';
import { createCoordinator, type Coordinator, type ReplicationMode, type VolumeSpec } from '../cluster/index.js';
import { MirrorsanError } from '../errors.js';
import { validateVolumeName, validateVolumeSize } from '../node/config.js';
import { validateRegionSize } from '../policing/regions.js';
import { createLogger } from '../util/log.js';
import { formatSize, parseSize } from '../util/size.js';

/**
 * Write-priority region size when none is given (bench/RESULTS.md, "Region size"): large enough
 * that a writer streaming through a volume asks the arbiter once per MiB, small enough that
 * writers on different parts of a volume (VMs' disks, a file system's allocation groups) rarely
 * share a region.
 */
export const DEFAULT_REGION_SIZE_BYTES = 1024 * 1024;

/**
 * `--region-size`: a size (a power of two of at least 4 KiB), or `single` for single-writer
 * mode (one region as large as the volume, rounded up to a power of two).
 */
export function parseRegionSize(text: string | undefined, volumeSizeBytes: number): number {
  if (text === undefined) return DEFAULT_REGION_SIZE_BYTES;
  if (text === 'single') return 2 ** Math.ceil(Math.log2(Math.max(4096, volumeSizeBytes)));
  const bytes = parseSize(text);
  validateRegionSize(bytes);
  return bytes;
}

export function embeddedCoordinatorUrl(dataDir: string): string {
  return `embedded://${path.join(path.resolve(dataDir), 'coordinator')}`;
}

export function defaultVolumeSpec(name: string, sizeBytes: number): VolumeSpec {
  return { name, sizeBytes, replicas: 1, mode: 'sync', strict: false, regionSizeBytes: DEFAULT_REGION_SIZE_BYTES };
}

export interface CoordinatorTargetOptions {
  coordinator?: string;
  dir: string;
}

async function withCoordinator<T>(options: CoordinatorTargetOptions, work: (coordinator: Coordinator) => Promise<T>): Promise<T> {
  const coordinator = await createCoordinator(options.coordinator ?? embeddedCoordinatorUrl(options.dir), {
    logger: createLogger({ component: 'coordinator', level: 'warn' }),
  });
  try {
    return await work(coordinator);
  } finally {
    await coordinator.close();
  }
}

export async function runVolumeCreate(
  name: string,
  options: CoordinatorTargetOptions & { size: string; replicas: string; mode: string; strict?: boolean; regionSize?: string; json?: boolean },
): Promise<void> {
  validateVolumeName(name);
  const sizeBytes = validateVolumeSize(parseSize(options.size), name);
  const replicas = Number(options.replicas);
  if (!Number.isInteger(replicas) || replicas < 1) {
    throw new MirrorsanError('CONFIG_INVALID', `--replicas must be a positive integer, got "${options.replicas}"`);
  }
  if (options.mode !== 'sync' && options.mode !== 'async') {
    throw new MirrorsanError('CONFIG_INVALID', `--mode must be sync or async, got "${options.mode}"`);
  }
  const spec: VolumeSpec = {
    ...defaultVolumeSpec(name, sizeBytes),
    replicas,
    mode: options.mode as ReplicationMode,
    strict: options.strict === true,
    regionSizeBytes: parseRegionSize(options.regionSize, sizeBytes),
  };
  const created = await withCoordinator(options, async (coordinator) => {
    // A replicated volume lives on live nodes: the first `replicas` of them (by id) hold it,
    // all in sync from epoch 1, the first arbitrating write priority.
    let members: string[] = [];
    if (replicas > 1) {
      const live = (await coordinator.liveNodes()).map((node) => node.id).sort();
      if (replicas > live.length) {
        throw new MirrorsanError('CONFIG_INVALID', `--replicas ${replicas}: only ${live.length} live node(s) can hold a replica`);
      }
      members = live.slice(0, replicas);
    }
    if (!(await coordinator.putVolumeSpec(spec, { createOnly: true }))) return false;
    if (members.length > 0) {
      const result = await coordinator.casVolumeRecord(name, null, { epoch: 1, replicas: members, inSync: members, arbiter: members[0]!, updatedAtMs: Date.now() });
      if (!result.ok && !result.current) throw new MirrorsanError('COORD_UNAVAILABLE', `could not create the volume record of ${name}`);
    }
    return true;
  });
  if (!created) throw new MirrorsanError('CONFIG_INVALID', `volume ${name} already exists`);
  process.stdout.write(options.json ? JSON.stringify(spec) + '\n' : `created volume ${name} (${formatSize(sizeBytes)}, ${spec.mode})\n`);
}

export async function runVolumeList(options: CoordinatorTargetOptions & { json?: boolean }): Promise<void> {
  const specs = await withCoordinator(options, (coordinator) => coordinator.listVolumeSpecs());
  if (options.json) {
    process.stdout.write(JSON.stringify(specs) + '\n');
    return;
  }
  const rows = [['VOLUME', 'SIZE', 'REPLICAS', 'MODE', 'STRICT'], ...specs.map((spec) => [
    spec.name, formatSize(spec.sizeBytes), String(spec.replicas), spec.mode, spec.strict ? 'yes' : 'no',
  ])];
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  for (const row of rows) process.stdout.write(row.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd() + '\n');
}

export async function runVolumeDelete(name: string, options: CoordinatorTargetOptions): Promise<void> {
  validateVolumeName(name);
  const deleted = await withCoordinator(options, (coordinator) => coordinator.deleteVolume(name));
  if (!deleted) throw new MirrorsanError('VOLUME_NOT_FOUND', `no volume named ${name}`);
  process.stdout.write(`deleted volume ${name}; nodes close its export and remove its data\n`);
}
