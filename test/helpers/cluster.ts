// `mirrorsan up` as a test fixture: a fresh temp dir and free ports, the JSON ready line
// parsed, and stop/kill/restart for crash tests. Every process it starts is stopped, and the
// temp dir removed, by stop(): call it in t.after or a finally.
//
// MIRRORSAN_TEST_SERVER=nbdkit runs the same suites against nbdkit instead (memory plugin, or
// file plugin when `persistent`), to check the tests themselves on a reference server.
import { mkdir, open } from 'node:fs/promises';
import path from 'node:path';
import { makeTempDir, removeDir } from './data.js';
import { CLI_PATH, ManagedProcess, processExists, sleep, waitUntil } from './process.js';
import { pickBasePort } from './ports.js';
import type { TlsFixture } from './tls.js';

/** One node as `up --json` (and `node --json`) describes it. */
export interface UpNode {
  id: string;
  pid: number;
  /** nbd://127.0.0.1:PORT/VOLUME */
  nbd: string;
  /** http://127.0.0.1:PORT (empty when emulated by nbdkit). */
  admin: string;
  /** Path of the node's config file, for `mirrorsan node --config`. */
  config: string;
}

export interface UpOptions {
  nodes?: number;
  volume?: string;
  /** As the CLI takes it: "64MiB", "1GiB", bytes. */
  size?: string;
  tls?: { fixture: TlsFixture; required?: boolean };
  /** More CLI arguments for `up`. */
  extraArgs?: readonly string[];
  readyTimeoutMs?: number;
  /** Emulation only: keep data across kill/restart (nbdkit file plugin instead of memory). */
  persistent?: boolean;
}

export interface ProcessExit {
  command: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True if it ignored SIGTERM and had to be SIGKILLed. */
  forced: boolean;
}

export interface UpCluster {
  readonly server: 'mirrorsan' | 'nbdkit';
  readonly nodes: UpNode[];
  /** The --dir given to `up`. */
  readonly dir: string;
  /** Scratch space for the test (images, certificates), removed by stop(). */
  readonly workDir: string;
  readonly basePort: number;
  readonly volume: string;
  readonly sizeBytes: number;
  nbdPort(index: number): number;
  /** stderr of every process this cluster started, in start order. */
  readonly stderr: string;
  /** stderr of the newest process serving node `index` (the restarted one after restart()). */
  nodeStderr(index: number): string;
  /** SIGTERM everything, await the exits, remove the temp dir. Idempotent. */
  stop(): Promise<ProcessExit[]>;
  /** SIGKILL node `index` and wait until it is gone. */
  kill(index: number): Promise<void>;
  /** SIGTERM the process serving node `index` (up itself for a node up started) and await its exit. */
  terminate(index: number): Promise<ProcessExit>;
  /** Start node `index` again from its config (`mirrorsan node --config F --json`). */
  restart(index: number): Promise<UpNode>;
}

const DEFAULT_READY_TIMEOUT_MS = 30_000;
const START_ATTEMPTS = 4;

export function testServerKind(): 'mirrorsan' | 'nbdkit' {
  return process.env.MIRRORSAN_TEST_SERVER === 'nbdkit' ? 'nbdkit' : 'mirrorsan';
}

export async function startUp(options: UpOptions = {}): Promise<UpCluster> {
  const workDir = await makeTempDir('up');
  try {
    return testServerKind() === 'nbdkit' ? await startEmulated(workDir, options) : await startMirrorsan(workDir, options);
  } catch (error) {
    await removeDir(workDir);
    throw error;
  }
}

function parseSizeBytes(size: string): number {
  const match = /^(\d+)\s*(|b|k|kib|m|mib|g|gib)$/i.exec(size.trim());
  if (!match) throw new Error(`test helper cannot parse size ${size}`);
  const unit = (match[2] ?? '').toLowerCase();
  const multiplier = unit.startsWith('k') ? 1024 : unit.startsWith('m') ? 1024 ** 2 : unit.startsWith('g') ? 1024 ** 3 : 1;
  return Number(match[1]) * multiplier;
}

/** Parses the single JSON ready line; throws with the line if it breaks the contract. */
export function parseReadyLine(line: string): UpNode[] {
  const parsed = JSON.parse(line) as { nodes?: unknown };
  if (!Array.isArray(parsed.nodes) || parsed.nodes.length === 0) throw new Error(`ready line has no nodes: ${line}`);
  return parsed.nodes.map((node: Record<string, unknown>) => {
    const ok = typeof node.id === 'string' && typeof node.pid === 'number' && typeof node.nbd === 'string' &&
      typeof node.admin === 'string' && typeof node.config === 'string';
    if (!ok) throw new Error(`ready line node lacks id/pid/nbd/admin/config: ${JSON.stringify(node)}`);
    return { id: node.id, pid: node.pid, nbd: node.nbd, admin: node.admin, config: node.config } as UpNode;
  });
}

const isReadyLine = (line: string): boolean => line.trimStart().startsWith('{') && line.includes('"nodes"');

async function startMirrorsan(workDir: string, options: UpOptions): Promise<UpCluster> {
  const nodeCount = options.nodes ?? 1;
  const volume = options.volume ?? 'vol0';
  const size = options.size ?? '64MiB';
  const readyTimeoutMs = options.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS;
  const portOffsets: number[] = [];
  for (let i = 0; i < nodeCount; i++) portOffsets.push(i, 100 + i, 200 + i);

  let lastError: Error | undefined;
  for (let attempt = 0; attempt < START_ATTEMPTS; attempt++) {
    // A fresh --dir per attempt: a failed start may have left half a cluster behind.
    const dir = path.join(workDir, attempt === 0 ? 'cluster' : `cluster-${attempt}`);
    const basePort = await pickBasePort(portOffsets);
    const args = [CLI_PATH, 'up', '--nodes', String(nodeCount), '--dir', dir, '--volume', volume, '--size', size, '--base-port', String(basePort), '--json'];
    if (options.tls) {
      args.push('--tls-cert', options.tls.fixture.serverCertPath, '--tls-key', options.tls.fixture.serverKeyPath);
      if (options.tls.required) args.push('--tls-required');
    }
    args.push(...(options.extraArgs ?? []));
    const up = new ManagedProcess(process.execPath, args);
    let nodes: UpNode[];
    try {
      const line = await up.waitForLine(isReadyLine, { timeoutMs: readyTimeoutMs, what: 'the JSON ready line' });
      nodes = parseReadyLine(line);
    } catch (error) {
      await up.stop('SIGKILL');
      lastError = error as Error;
      // Only a lost race for a port is worth another try; anything else is the bug to report.
      if (/EADDRINUSE|address already in use/i.test(up.stderr + up.stdout)) continue;
      throw error;
    }
    if (nodes.length !== nodeCount) {
      await up.stop('SIGKILL');
      throw new Error(`asked for ${nodeCount} nodes, ready line lists ${nodes.length}`);
    }
    return new MirrorsanCluster({ up, nodes, dir, workDir, basePort, volume, sizeBytes: parseSizeBytes(size), readyTimeoutMs });
  }
  throw lastError ?? new Error('could not start mirrorsan up');
}

interface ClusterState {
  up: ManagedProcess;
  nodes: UpNode[];
  dir: string;
  workDir: string;
  basePort: number;
  volume: string;
  sizeBytes: number;
  readyTimeoutMs: number;
}

class MirrorsanCluster implements UpCluster {
  readonly server = 'mirrorsan' as const;
  readonly nodes: UpNode[];
  readonly dir: string;
  readonly workDir: string;
  readonly basePort: number;
  readonly volume: string;
  readonly sizeBytes: number;
  private readonly up: ManagedProcess;
  private readonly processes: ManagedProcess[] = [];
  /** The process that serves each node now (up itself until a node is restarted). */
  private readonly nodeProcess: ManagedProcess[];
  private readonly readyTimeoutMs: number;
  private stopped: Promise<ProcessExit[]> | undefined;

  constructor(state: ClusterState) {
    this.up = state.up;
    this.nodes = state.nodes;
    this.dir = state.dir;
    this.workDir = state.workDir;
    this.basePort = state.basePort;
    this.volume = state.volume;
    this.sizeBytes = state.sizeBytes;
    this.readyTimeoutMs = state.readyTimeoutMs;
    this.processes.push(state.up);
    this.nodeProcess = state.nodes.map(() => state.up);
  }

  nbdPort(index: number): number {
    return this.basePort + index;
  }

  get stderr(): string {
    return this.processes.map((p) => p.stderr).join('');
  }

  nodeStderr(index: number): string {
    return this.nodeProcess[index]?.stderr ?? '';
  }

  async kill(index: number): Promise<void> {
    const node = this.nodes[index];
    if (!node) throw new Error(`no node ${index}`);
    process.kill(node.pid, 'SIGKILL');
    const owner = this.processes.find((p) => p.pid === node.pid);
    if (owner) await owner.exited;
    else await waitUntil(() => !processExists(node.pid), { timeoutMs: 10_000, what: `pid ${node.pid} to die` });
  }

  async terminate(index: number): Promise<ProcessExit> {
    const node = this.nodes[index];
    const owner = this.nodeProcess[index];
    if (!node || !owner) throw new Error(`no node ${index}`);
    if (owner.pid === node.pid) return { command: owner.command, ...(await owner.stop('SIGTERM')) };
    // A node that up runs as its own process: signal it, and wait for it to disappear.
    process.kill(node.pid, 'SIGTERM');
    await waitUntil(() => !processExists(node.pid), { timeoutMs: 15_000, what: `pid ${node.pid} to exit` });
    return { command: `pid ${node.pid}`, code: null, signal: null, forced: false };
  }

  async restart(index: number): Promise<UpNode> {
    const node = this.nodes[index];
    if (!node) throw new Error(`no node ${index}`);
    let child: ManagedProcess;
    let restarted: UpNode[];
    for (let attempt = 1; ; attempt++) {
      child = new ManagedProcess(process.execPath, [CLI_PATH, 'node', '--config', node.config, '--json']);
      this.processes.push(child);
      try {
        restarted = parseReadyLine(await child.waitForLine(isReadyLine, { timeoutMs: this.readyTimeoutMs, what: 'the JSON ready line' }));
        break;
      } catch (error) {
        await child.stop('SIGKILL');
        // A port of the killed process may take a moment to be bindable again; retry that only.
        if (attempt < START_ATTEMPTS && /EADDRINUSE|address already in use/i.test(child.stderr)) {
          await sleep(250);
          continue;
        }
        throw error;
      }
    }
    const fresh = restarted.find((n) => n.id === node.id) ?? restarted[0]!;
    this.nodes[index] = fresh;
    this.nodeProcess[index] = child;
    return fresh;
  }

  stop(): Promise<ProcessExit[]> {
    this.stopped ??= this.stopAll();
    return this.stopped;
  }

  private async stopAll(): Promise<ProcessExit[]> {
    // Restarted nodes first (newest first), then up, which stops the nodes it started.
    const exits: ProcessExit[] = [];
    for (const managed of [...this.processes].reverse()) {
      const exit = await managed.stop('SIGTERM');
      exits.push({ command: managed.command, ...exit });
    }
    // Nodes that `up` ran as separate processes must not outlive the test.
    for (const node of this.nodes) {
      if (processExists(node.pid) && !this.processes.some((p) => p.pid === node.pid)) {
        process.kill(node.pid, 'SIGKILL');
      }
    }
    await removeDir(this.workDir);
    return exits;
  }
}

/** The nbdkit stand-in: one node, no admin API, restart = start nbdkit again on the same image. */
async function startEmulated(workDir: string, options: UpOptions): Promise<UpCluster> {
  if ((options.nodes ?? 1) !== 1) throw new Error('nbdkit emulation runs one node only');
  const volume = options.volume ?? 'vol0';
  const sizeBytes = parseSizeBytes(options.size ?? '64MiB');
  const dir = path.join(workDir, 'cluster');
  const nodeDir = path.join(dir, 'n1');
  await mkdir(nodeDir, { recursive: true });
  const imagePath = path.join(nodeDir, 'image.raw');
  const image = await open(imagePath, 'w');
  await image.truncate(sizeBytes);
  await image.close();
  const plugin = options.persistent ? ['file', imagePath] : ['memory', String(sizeBytes)];
  const processes: ManagedProcess[] = [];
  let port: number | undefined;

  const launch = async (): Promise<UpNode> => {
    const { startNbdkit } = await import('./nbdkit.js');
    const server = await startNbdkit({
      plugin,
      exportName: volume,
      // Advertise the block sizes the mirrorsan contract fixes, so the same assertions hold.
      filters: ['blocksize-policy'],
      pluginArgs: ['blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=33554432', 'blocksize-error-policy=error'],
      port,
      tls: options.tls ? { fixture: options.tls.fixture, required: options.tls.required ?? false } : undefined,
    });
    port = server.port;
    processes.push(server.process);
    return { id: 'n1', pid: server.process.pid!, nbd: server.uri(), admin: '', config: imagePath };
  };

  const nodes = [await launch()];
  let stopped: Promise<ProcessExit[]> | undefined;
  return {
    server: 'nbdkit',
    nodes,
    dir,
    workDir,
    basePort: port!,
    volume,
    sizeBytes,
    nbdPort: () => port!,
    get stderr() {
      return processes.map((p) => p.stderr).join('');
    },
    nodeStderr: () => processes.at(-1)?.stderr ?? '',
    kill: async () => {
      await processes.at(-1)?.stop('SIGKILL');
    },
    terminate: async () => {
      const last = processes.at(-1)!;
      return { command: last.command, ...(await last.stop('SIGTERM')) };
    },
    restart: async () => {
      // A killed nbdkit's port can take a moment to be bindable again.
      for (let attempt = 0; ; attempt++) {
        try {
          nodes[0] = await launch();
          return nodes[0];
        } catch (error) {
          if (attempt >= 5) throw error;
          await sleep(200);
        }
      }
    },
    stop: () => {
      stopped ??= (async () => {
        const exits: ProcessExit[] = [];
        for (const managed of processes) exits.push({ command: managed.command, ...(await managed.stop('SIGTERM')) });
        await removeDir(workDir);
        return exits;
      })();
      return stopped;
    },
  };
}
