// `mirrorsan status`: a node's /v1/status as a table (or raw JSON with --json).
import { MirrorsanError } from '../errors.js';
import { formatSize, formatSizeApprox } from '../util/size.js';

interface ReplicatedVolumeStatus {
  name: string;
  sizeBytes: number;
  epoch: number;
  inSync: string[];
  arbiter?: string;
  fence?: string | null;
  strict?: boolean;
  degraded?: boolean;
  /** Per replica as the node sees it (issue 5). */
  replicaStates?: { node: string; state: 'in-sync' | 'catching-up' | 'out-of-sync' | 'fenced' | 'diskless' }[];
  /** This node's disk for the volume is detached: requests are forwarded (src/volume/diskless-volume.ts). */
  diskless?: {
    mode: string;
    sinceMs: number;
    error: { code: string; message: string };
    forwardingTo: string | null;
    reattachError: string | null;
    forwarder: { forwardedRequests: number; failedRequests: number; pending: number } | null;
  } | null;
  /** This replica's catch-up, while (or after) it copies what it missed. */
  catchUp?: { state: string; mode?: string | null; fullReason?: string | null; percent: number; bytesTotal: number; bytesCompared: number; bytesCopied: number; rateBytesPerSec: number; etaSeconds: number | null; lastError: string | null } | null;
  policing?: {
    mode: 'single-writer' | 'regions';
    regionSizeBytes: number;
    regionsHeldHere: number;
    waitingWrites: number;
    arbiter: { regionsHeld: Record<string, number>; waiters: number; awaitingDrained: string[] } | null;
  };
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
    const replicatedRows = [['VOLUME', 'SIZE', 'EPOCH', 'IN-SYNC', 'ARBITER', 'REGIONS', 'HOLDERS', 'HELD HERE', 'WAITING', 'OWN SEQ', 'APPLIED FROM PEERS', 'REPLICAS']];
    for (const volume of replicated) {
      const applied = Object.entries(volume.sources ?? {}).map(([source, state]) => `${source}:${state.lastAppliedSequence}`);
      replicatedRows.push([
        volume.name,
        formatSize(volume.sizeBytes),
        String(volume.epoch),
        volume.inSync.join(','),
        volume.arbiter ?? '-',
        policingMode(volume),
        holders(volume),
        String(volume.policing?.regionsHeldHere ?? '-'),
        String(volume.policing?.waitingWrites ?? '-'),
        String(volume.source?.lastSequence ?? '-'),
        applied.join(' ') || '-',
        (volume.replicaStates ?? []).map((replica) => `${replica.node}:${replica.state}`).join(' ') || '-',
      ]);
    }
    printTable(replicatedRows);
    for (const volume of replicated) {
      const here = volume.replicaStates?.find((replica) => replica.node === status.node.id)?.state;
      const catchUp = volume.catchUp;
      const diskless = volume.diskless;
      if (diskless) {
        const since = new Date(diskless.sinceMs).toISOString();
        const forwarded = diskless.forwarder ? `, ${diskless.forwarder.forwardedRequests} requests forwarded, ${diskless.forwarder.pending} pending, ${diskless.forwarder.failedRequests} failed` : '';
        const next = diskless.mode === 'diskless' ? `; re-attach with: mirrorsan volume reattach ${volume.name} --admin ADMIN_URL` : '';
        process.stdout.write(
          `${volume.name}: ${status.node.id} is DISKLESS (${diskless.mode}) since ${since}: disk error ${diskless.error.code}: ${diskless.error.message}; ` +
            `I/O is forwarded to ${diskless.forwardingTo ?? 'no peer yet'}${forwarded}${diskless.reattachError ? `; last re-attach failed: ${diskless.reattachError}` : ''}${next}\n`,
        );
      }
      if (here === 'catching-up' && catchUp) {
        const eta = catchUp.etaSeconds === null ? 'unknown' : `${catchUp.etaSeconds} s`;
        process.stdout.write(
          `${volume.name}: ${status.node.id} is CATCHING UP (${catchUp.state}): ${catchUp.percent}% compared ` +
            `(${formatSizeApprox(catchUp.bytesCompared)} of ${formatSizeApprox(catchUp.bytesTotal)}), ${formatSizeApprox(catchUp.bytesCopied)} copied, ` +
            `${formatSizeApprox(catchUp.rateBytesPerSec)}/s, ETA ${eta}` +
            `${catchUp.mode === 'full' ? `; comparing the whole volume: ${catchUp.fullReason}` : catchUp.mode === 'dirty-regions' ? '; only the regions written while it was away' : ''}` +
            `${catchUp.lastError ? `; last error: ${catchUp.lastError}` : ''}\n`,
        );
      } else if (here === 'out-of-sync' && !diskless) process.stdout.write(`${volume.name}: ${status.node.id} is OUT OF SYNC and fenced: I/O here is refused until it catches up (${volume.fence ?? 'not in the in-sync set'})\n`);
      else if (volume.fence) process.stdout.write(`${volume.name}: ${status.node.id} is FENCED: I/O here is refused: ${volume.fence}\n`);
      if (volume.degraded) {
        const missing = (volume.replicaStates ?? []).filter((replica) => replica.state === 'out-of-sync' || replica.state === 'diskless').map((replica) => replica.node);
        const policy = volume.strict ? 'strict: writes are refused until every replica is back' : 'writes continue on the in-sync replicas';
        process.stdout.write(`${volume.name}: DEGRADED, out of sync: ${missing.join(',') || '-'} (${policy})\n`);
      }
    }
  }
}

function policingMode(volume: ReplicatedVolumeStatus): string {
  const policing = volume.policing;
  if (!policing) return '-';
  return policing.mode === 'single-writer' ? 'single-writer' : formatSize(policing.regionSizeBytes);
}

/** Regions held per node, as the arbiter sees them (`n1:12 n2:3`); '-' on other nodes. */
function holders(volume: ReplicatedVolumeStatus): string {
  const table = volume.policing?.arbiter;
  if (!table) return '-';
  const held = Object.entries(table.regionsHeld).sort(([a], [b]) => a.localeCompare(b)).map(([node, count]) => `${node}:${count}`);
  if (table.awaitingDrained.length > 0) held.push(`(fenced: waiting for ${table.awaitingDrained.join(',')})`);
  else if (table.waiters > 0) held.push(`(${table.waiters} queued)`);
  return held.join(' ') || 'none';
}

function printTable(rows: string[][]): void {
  const widths = rows[0]!.map((_, column) => Math.max(...rows.map((row) => row[column]!.length)));
  for (const row of rows) process.stdout.write(row.map((cell, column) => cell.padEnd(widths[column]!)).join('  ').trimEnd() + '\n');
}
