// A real etcd server for tests: Debian's etcd-server on loopback, random ports, a temporary
// data directory. It can be killed (SIGKILL, as a crash) and started again on the same data
// and ports, which is how the tests make the coordinator unreachable.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const HEALTHY_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

export class EtcdProcess {
  private child: ChildProcess | undefined;
  private output = '';
  private dataDir = '';
  clientPort = 0;
  private peerPort = 0;

  get endpoint(): string {
    return `127.0.0.1:${this.clientPort}`;
  }

  /** Starts a fresh server; fails with a clear message if the `etcd` binary is missing. */
  async start(): Promise<void> {
    this.dataDir = await mkdtemp(join(tmpdir(), 'mirrorsan-etcd-'));
    this.clientPort = await freePort();
    this.peerPort = await freePort();
    await this.launch();
  }

  /** SIGKILL: the server vanishes as in a crash; its data stays for restart(). */
  async kill(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
  }

  /** Starts the server again on the same data directory and ports. */
  async restart(): Promise<void> {
    await this.kill();
    await this.launch();
  }

  async stop(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
    }
    if (this.dataDir) await rm(this.dataDir, { recursive: true, force: true });
  }

  private async launch(): Promise<void> {
    const client = `http://127.0.0.1:${this.clientPort}`;
    const peer = `http://127.0.0.1:${this.peerPort}`;
    const args = [
      '--name', 'default',
      '--data-dir', join(this.dataDir, 'data'),
      '--listen-client-urls', client,
      '--advertise-client-urls', client,
      '--listen-peer-urls', peer,
      '--initial-advertise-peer-urls', peer,
      '--initial-cluster', `default=${peer}`,
      // A short election timeout lowers etcd's minimum lease TTL to 1 s (it is
      // ceil(1.5 × election timeout)), so the lease tests run with 1 s TTLs.
      '--heartbeat-interval', '50',
      '--election-timeout', '500',
      '--logger', 'zap',
      '--log-level', 'error',
    ];
    const child = spawn('etcd', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    this.output = '';
    const append = (chunk: Buffer): void => {
      this.output = (this.output + chunk.toString()).slice(-8192);
    };
    child.stdout?.on('data', append);
    child.stderr?.on('data', append);
    const failed = new Promise<never>((_, reject) => {
      child.once('error', (error: NodeJS.ErrnoException) => {
        reject(
          error.code === 'ENOENT'
            ? new Error('the etcd binary is not on PATH: install etcd (Debian/Ubuntu: apt-get install etcd-server) to run the etcd coordinator tests')
            : error,
        );
      });
      child.once('exit', (code, signal) => reject(new Error(`etcd exited early (code ${code}, signal ${signal}):\n${this.output}`)));
    });
    failed.catch(() => {}); // observed below; after start-up an exit is expected (kill)
    try {
      await Promise.race([this.waitHealthy(client, child), failed]);
    } catch (error) {
      await this.kill();
      throw error;
    }
  }

  private async waitHealthy(clientUrl: string, child: ChildProcess): Promise<void> {
    const deadline = Date.now() + HEALTHY_TIMEOUT_MS;
    while (Date.now() < deadline && child.exitCode === null && child.signalCode === null) {
      try {
        const response = await fetch(`${clientUrl}/health`, { signal: AbortSignal.timeout(1000) });
        const body = (await response.json()) as { health?: string };
        if (body.health === 'true') return;
      } catch {
        // not listening yet
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    throw new Error(`etcd did not become healthy within ${HEALTHY_TIMEOUT_MS} ms:\n${this.output}`);
  }
}
