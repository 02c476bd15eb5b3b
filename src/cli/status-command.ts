// `mirrorsan status`: a node's /v1/status as a table (or raw JSON with --json).
import { MirrorsanError } from '../errors.js';
import { formatSize } from '../util/size.js';

interface ReplicatedVolumeStatus {
  name: string;
  sizeBytes: number;
  epoch: number;
  inSync: string[];
  arbiter?: string;
  grant?: { holder: string | null; heldHere: boolean; waitingWrites: number };
  source?: { lastSequence: number };
  sources?: Record<string, { lastAppliedSequence: number; partitionEntries: number }>;
}

interface VolumeStatus {
  name: string;
  sizeBytes: number;
  inSync?: string[];
  lastSequence?: number;
  checkpointSequence?: number;
  walBytes?: number;
}

export async function runStatusCommand(options: { admin: string; json?: boolean }): Promise<void> {
  const url = new URL('/v1/status', options.admin);
  let status: { node: { id: string }; epoch: number; volumes: VolumeStatus[]; replicatedVolumes?: ReplicatedVolumeStatus[] };
  try {
    const response = await fetch(url, { signal: AbortSignal.timeout(5000) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    status = (await response.json()) as typeof status;
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `cannot read status from ${url}: ${(error as Error).message}`);
  }
  if (options.json) {
    process.stdout.write(JSON.stringify(status, null, 2) + '\n');
    return;
  }
  process.stdout.write(`node ${status.node.id}  epoch ${status.epoch}\n`);
  const rows = [['VOLUME', 'SIZE', 'IN-SYNC', 'LAST SEQ', 'CHECKPOINT', 'LOG']];
  for (const volume of status.volumes) {
    rows.push([
      volume.name,
      formatSize(volume.sizeBytes),
      (volume.inSync ?? []).join(','),
      String(volume.lastSequence ?? '-'),
      String(volume.checkpointSequence ?? '-'),
      volume.walBytes === undefined ? '-' : formatSize(volume.walBytes),
    ]);
  }
  const replicated = status.replicatedVolumes ?? [];
  if (status.volumes.length > 0 || replicated.length === 0) printTable(rows);
  if (replicated.length > 0) {
    process.stdout.write(status.volumes.length > 0 ? '\nreplicated volumes\n' : 'replicated volumes\n');
    const replicatedRows = [['VOLUME', 'SIZE', 'EPOCH', 'IN-SYNC', 'ARBITER', 'GRANT HOLDER', 'OWN SEQ', 'APPLIED FROM PEERS']];
    for (const volume of replicated) {
      const applied = Object.entries(volume.sources ?? {}).map(([source, state]) => `${source}:${state.lastAppliedSequence}`);
      replicatedRows.push([
        volume.name,
        formatSize(volume.sizeBytes),
        String(volume.epoch),
        volume.inSync.join(','),
        volume.arbiter ?? '-',
        volume.grant?.holder ?? (volume.grant?.heldHere ? status.node.id : '-'),
        String(volume.source?.lastSequence ?? '-'),
        applied.join(' ') || '-',
      ]);
    }
    printTable(replicatedRows);
  }
}

function printTable(rows: string[][]): void {
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  for (const row of rows) process.stdout.write(row.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd() + '\n');
}
