// Real etcd servers for tests: Debian's etcd-server on loopback, random ports, temporary data
// directories; one member or several. A member can be killed (SIGKILL, as a crash) and
// started again on the same data and ports, which is how tests make etcd unreachable or lose
// a member (or the leader) of a quorum.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const HEALTHY_TIMEOUT_MS = 15_000;
const OUTPUT_KEPT_BYTES = 8192;

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

interface Member {
  name: string;
  clientPort: number;
  peerPort: number;
  child: ChildProcess | undefined;
  output: string;
}

export class EtcdCluster {
  private readonly size: number;
  /** The address etcd listens on: loopback, or a test network's bridge address (test/helpers/netns.ts). */
  private readonly host: string;
  private readonly members: Member[] = [];
  private dataDir = '';

  constructor(size = 1, host = '127.0.0.1') {
    this.size = size;
    this.host = host;
  }

  /** `host:port` of every member's client URL, for etcd:// coordinator URLs. */
  get endpoints(): string[] {
    return this.members.map((member) => `${this.host}:${member.clientPort}`);
  }

  /** Starts a fresh cluster; fails with a clear message if the `etcd` binary is missing. */
  async start(): Promise<void> {
    this.dataDir = await mkdtemp(join(tmpdir(), 'mirrorsan-etcd-'));
    for (let index = 0; index < this.size; index++) {
      this.members.push({ name: `m${index}`, clientPort: await freePort(), peerPort: await freePort(), child: undefined, output: '' });
    }
    // Members of a new cluster wait for each other: start them all, then wait for each.
    const started = this.members.map((member) => this.launch(member));
    await Promise.all(started);
  }

  /** SIGKILL: the member vanishes as in a crash; its data stays for restart(). */
  async kill(index = 0): Promise<void> {
    const member = this.member(index);
    const child = member.child;
    member.child = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
  }

  /** Starts the member again on the same data directory and ports. */
  async restart(index = 0): Promise<void> {
    await this.kill(index);
    await this.launch(this.member(index));
  }

  /** The index of the current leader, asked of the first member that answers. */
  async leaderIndex(): Promise<number> {
    for (const member of this.members) {
      if (!member.child) continue;
      try {
        const response = await fetch(`http://${this.host}:${member.clientPort}/v3/maintenance/status`, {
          method: 'POST',
          body: '{}',
          signal: AbortSignal.timeout(1000),
        });
        const status = (await response.json()) as { leader?: string; header?: { member_id?: string } };
        if (status.leader === undefined) continue;
        if (status.leader === status.header?.member_id) return this.members.indexOf(member);
        // Ask the others which of them is the leader.
        for (const other of this.members) {
          if (other === member || !other.child) continue;
          const answer = (await (
            await fetch(`http://${this.host}:${other.clientPort}/v3/maintenance/status`, { method: 'POST', body: '{}', signal: AbortSignal.timeout(1000) })
          ).json()) as { header?: { member_id?: string } };
          if (answer.header?.member_id === status.leader) return this.members.indexOf(other);
        }
      } catch {
        // try the next member
      }
    }
    throw new Error('no etcd member knows a leader');
  }

  /** Kills every member (nothing to shut down gracefully: the data goes too). */
  async stop(): Promise<void> {
    await Promise.all(this.members.map((_, index) => this.kill(index)));
    if (this.dataDir) await rm(this.dataDir, { recursive: true, force: true });
  }

  private member(index: number): Member {
    const member = this.members[index];
    if (!member) throw new Error(`no etcd member ${index}`);
    return member;
  }

  private async launch(member: Member): Promise<void> {
    const client = `http://${this.host}:${member.clientPort}`;
    const peer = `http://${this.host}:${member.peerPort}`;
    const initialCluster = this.members.map((m) => `${m.name}=http://${this.host}:${m.peerPort}`).join(',');
    const args = [
      '--name', member.name,
      '--data-dir', join(this.dataDir, member.name),
      '--listen-client-urls', client,
      '--advertise-client-urls', client,
      '--listen-peer-urls', peer,
      '--initial-advertise-peer-urls', peer,
      '--initial-cluster', initialCluster,
      '--initial-cluster-state', 'new',
      // One token per cluster (members of different test clusters must never join each other).
      '--initial-cluster-token', `mirrorsan-test-${this.members[0]?.peerPort ?? 0}`,
      // A short election timeout lowers etcd's minimum lease TTL to 1 s (it is
      // ceil(1.5 × election timeout)), so the lease tests run with 1 s TTLs.
      '--heartbeat-interval', '50',
      '--election-timeout', '500',
      '--logger', 'zap',
      '--log-level', 'error',
    ];
    const child = spawn('etcd', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    member.child = child;
    member.output = '';
    const append = (chunk: Buffer): void => {
      member.output = (member.output + chunk.toString()).slice(-OUTPUT_KEPT_BYTES);
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
      child.once('exit', (code, signal) => reject(new Error(`etcd ${member.name} exited early (code ${code}, signal ${signal}):\n${member.output}`)));
    });
    failed.catch(() => {}); // observed below; after start-up an exit is expected (kill)
    try {
      await Promise.race([this.waitHealthy(client, child, member), failed]);
    } catch (error) {
      await this.kill(this.members.indexOf(member));
      throw error;
    }
  }

  private async waitHealthy(clientUrl: string, child: ChildProcess, member: Member): Promise<void> {
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
    throw new Error(`etcd ${member.name} did not become healthy within ${HEALTHY_TIMEOUT_MS} ms:\n${member.output}`);
  }
}
