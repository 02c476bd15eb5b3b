// Proves epoch fencing of writes replayed by `mirrorsan attach` (issue 5, item 5) on a 3-node cluster of real processes: while a client rewrites a set of blocks with ever newer versions through attach, the node attach uses is SIGSTOPped (stopped, not dead) with writes in flight and more sent to it while it is stopped; attach gives up on it after its request timeout and replays those writes on another node, the client keeps overwriting the same blocks there, then the stopped node resumes (SIGCONT) and reads the stale requests still in its socket buffer. The client sees no error, every node (and attach) then returns the newest acknowledged version of every block (no write of the stopped node applied late), the stopped node left the in-sync set, caught up and rejoined, and the three image files are byte-identical at quiescence.
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { NbdClient } from '../src/nbd/client.js';
import { CLI_PATH, ManagedProcess, runOk, sha256File, sleep, startUp, testServerKind, waitUntil, withServerLog } from './helpers/index.js';

const MiB = 1024 * 1024;
const BLOCK_BYTES = 4096;
/** Blocks rewritten over and over, one every STRIDE_BYTES: they span two 1 MiB grant regions. */
const BLOCKS = 128;
const STRIDE_BYTES = 16 * 1024;
const MAGIC = 'MSFENCE1';

/** Block `block` at `version`: a header naming both, then bytes derived from them. */
function blockContent(block: number, version: number): Buffer {
  const data = Buffer.alloc(BLOCK_BYTES);
  if (version === 0) return data; // never written: zeros
  data.write(MAGIC, 0, 'latin1');
  data.writeUInt32BE(block, 8);
  data.writeUInt32BE(version, 12);
  let state = (block * 0x9e3779b1 + version * 0x85ebca6b) >>> 0 || 1;
  for (let at = 16; at < BLOCK_BYTES; at += 4) {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    data.writeUInt32BE(state >>> 0, at);
  }
  return data;
}

function describeBlock(data: Buffer): string {
  if (data.every((byte) => byte === 0)) return 'zeros';
  if (data.toString('latin1', 0, 8) !== MAGIC) return 'garbage';
  return `block ${data.readUInt32BE(8)} version ${data.readUInt32BE(12)}`;
}

/**
 * Writers ("lanes") that rewrite random blocks of the set with increasing versions through one
 * NBD connection. A block is never written by two lanes at once, so the newest version whose
 * write was acknowledged is what every replica must hold at the end.
 */
class VersionedWriter {
  readonly acked = new Uint32Array(BLOCKS);
  private readonly issued = new Uint32Array(BLOCKS);
  /** Block -> version of the write in flight. */
  readonly inFlight = new Map<number, number>();
  readonly errors: Error[] = [];
  ackCount = 0;
  lastAckAtMs = 0;
  /** The longest time without an acknowledged write: the pause the client saw. */
  longestGapMs = 0;
  private running = true;
  private readonly lanes: Promise<void>[] = [];
  private seed = 0x2545f491;
  private readonly client: NbdClient;

  constructor(client: NbdClient) {
    this.client = client;
  }

  start(lanes: number): void {
    for (let i = 0; i < lanes; i++) this.lanes.push(this.lane());
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.lanes);
  }

  private random(): number {
    this.seed ^= this.seed << 13;
    this.seed ^= this.seed >>> 17;
    this.seed ^= this.seed << 5;
    return (this.seed >>> 0) / 2 ** 32;
  }

  private async lane(): Promise<void> {
    while (this.running) {
      let block = Math.floor(this.random() * BLOCKS);
      for (let tries = 0; this.inFlight.has(block) && tries < BLOCKS; tries++) block = (block + 1) % BLOCKS;
      if (this.inFlight.has(block)) {
        await sleep(1);
        continue;
      }
      const version = ++this.issued[block]!;
      this.inFlight.set(block, version);
      try {
        await this.client.write(block * STRIDE_BYTES, blockContent(block, version));
      } catch (error) {
        this.errors.push(error as Error);
        this.running = false;
        return;
      } finally {
        this.inFlight.delete(block);
      }
      this.acked[block] = version;
      this.ackCount++;
      const nowMs = performance.now();
      if (this.lastAckAtMs > 0) this.longestGapMs = Math.max(this.longestGapMs, nowMs - this.lastAckAtMs);
      this.lastAckAtMs = nowMs;
    }
  }

  /** Blocks of `image` (the volume from offset 0) that differ from the newest acknowledged version. */
  mismatches(image: Buffer): string[] {
    const found: string[] = [];
    for (let block = 0; block < BLOCKS; block++) {
      const actual = image.subarray(block * STRIDE_BYTES, block * STRIDE_BYTES + BLOCK_BYTES);
      if (!actual.equals(blockContent(block, this.acked[block]!))) found.push(`block ${block}: holds ${describeBlock(actual)}, newest acknowledged is version ${this.acked[block]}`);
    }
    return found;
  }
}

interface ReplicatedStatus {
  epoch: number;
  inSync: string[];
  fence: string | null;
  replicaState: string;
}

let serverLog = (): string => '';

test('a write replayed by attach after its node was SIGSTOPped is never overtaken by that node applying it late', { skip: testServerKind() !== 'mirrorsan', timeout: 90_000 }, withServerLog(() => serverLog(), async (t) => {
  const cluster = await startUp({ nodes: 3, size: '16MiB', extraArgs: ['--lease-ttl', '2000', '--failure-timeout', '500'] });
  t.after(() => cluster.stop());
  serverLog = () => cluster.stderr;
  const status = async (index: number): Promise<ReplicatedStatus> => {
    const response = await fetch(`${cluster.nodes[index]!.admin}/v1/status`);
    return ((await response.json()) as { replicatedVolumes: ReplicatedStatus[] }).replicatedVolumes[0]!;
  };
  await waitUntil(async () => (await Promise.all([0, 1, 2].map(status))).every((view) => view.inSync.length === 3 && view.fence === null), { timeoutMs: 15_000, what: 'the cluster to settle' });
  const epochBefore = (await status(1)).epoch;

  // Request timeout 4 s: above the lease TTL (2 s) plus the failure timeout (0.5 s), as attach requires.
  const socketPath = path.join(cluster.workDir, 'attach.sock');
  const attach = new ManagedProcess(process.execPath, [
    CLI_PATH, 'attach', cluster.volume, '--listen', `unix:${socketPath}`,
    '--nodes', cluster.nodes.map((node) => node.nbd).join(','), '--failover-timeout', '30s', '--request-timeout', '4s', '--json',
  ]);
  t.after(() => attach.stop('SIGKILL'));
  serverLog = () => `${cluster.stderr}\n--- attach ---\n${attach.stderr}`;
  await attach.waitForLine((line) => line.startsWith('{'), { what: 'the attach ready line' });
  const client = await NbdClient.connect({ path: socketPath }, { exportName: cluster.volume });
  t.after(() => client.close());
  const writer = new VersionedWriter(client);
  writer.start(8);
  await waitUntil(() => writer.ackCount > 500, { timeoutMs: 15_000, what: '500 writes through attach' });

  // n1 (attach's node) stops with writes in flight; 8 more lanes send it writes while it is
  // stopped (they wait, unread, in its socket buffer).
  const pid = cluster.nodes[0]!.pid;
  process.kill(pid, 'SIGSTOP');
  let stopped = true;
  t.after(() => {
    if (stopped) process.kill(pid, 'SIGCONT');
  });
  const stoppedAtMs = performance.now();
  const ackedAtStop = writer.ackCount;
  const inFlightAtStop = new Map(writer.inFlight);
  await sleep(200);
  writer.start(8);

  // attach gives up on n1 after its request timeout and replays on n2; writes go on there.
  await waitUntil(() => writer.ackCount > ackedAtStop + 16, { timeoutMs: 20_000, what: 'writes to complete again after the failover' });
  const pauseMs = Math.round(writer.longestGapMs);
  t.diagnostic(`SIGSTOP of attach's node: the client saw a pause of ${pauseMs} ms (request timeout 4000 ms); ${inFlightAtStop.size} writes were in flight at the stop`);
  assert.ok(pauseMs >= 3_500 && pauseMs < 10_000, `a pause of about the request timeout (${pauseMs} ms)`);
  assert.ok(!(await status(1)).inSync.includes('n1'), 'n1 left the in-sync set');
  // Every block that had a write in flight at the stop is overwritten with a newer version.
  await waitUntil(() => [...inFlightAtStop].every(([block, version]) => writer.acked[block]! > version), { timeoutMs: 10_000, what: 'newer versions of the blocks in flight at the stop' });
  await waitUntil(() => writer.ackCount > ackedAtStop + 2_000, { timeoutMs: 20_000, what: '2000 more writes through the next node' });

  // n1 resumes: it reads the stale requests, its peer links and its timers fire.
  process.kill(pid, 'SIGCONT');
  stopped = false;
  const ackedAtResume = writer.ackCount;
  await waitUntil(() => writer.ackCount > ackedAtResume + 2_000, { timeoutMs: 20_000, what: '2000 writes after n1 resumed' });
  await writer.stop();
  assert.deepEqual(writer.errors.map((error) => error.message), [], 'the client saw no error');

  // n1 catches up and rejoins; it serves again.
  await waitUntil(async () => {
    const view = await status(0);
    return view.replicaState === 'in-sync' && view.fence === null;
  }, { timeoutMs: 30_000, what: 'n1 back in sync and serving' });
  assert.ok((await status(1)).epoch >= epochBefore + 3, 'removal, catching up and promotion each moved the epoch');
  const log = cluster.stderr;
  assert.match(attach.stderr, /node lost .*reason="no answer for \d+ ms/, 'attach gave up on the stopped node');
  const loggedPauseMs = Number(/ failover .*pauseMs=(\d+)/.exec(attach.stderr)?.[1]);
  assert.ok(loggedPauseMs >= 3_500 && loggedPauseMs <= pauseMs + 100, `attach logs the pause from the node's last answer: ${loggedPauseMs} ms`);
  assert.match(log, /n1\S*\] .*lease lost/, 'n1 noticed its lease was gone on resuming');

  // Every node, and attach, return the newest acknowledged version of every block.
  for (let index = 0; index < 3; index++) {
    const copy = path.join(cluster.workDir, `read-through-n${index + 1}.img`);
    await runOk('nbdcopy', [cluster.nodes[index]!.nbd, copy]);
    assert.deepEqual(writer.mismatches(await readFile(copy)), [], `data read through n${index + 1}`);
  }
  assert.deepEqual(writer.mismatches(await client.read(0, BLOCKS * STRIDE_BYTES)), [], 'data read through attach');

  // Quiescence: the three images are the same bytes.
  client.close();
  await attach.stop('SIGTERM');
  t.diagnostic(`attach: ${attach.stderr.split('\n').find((line) => / shutting down /.test(line))?.replace(/^.*shutting down/, '') ?? '?'}`);
  for (let index = 0; index < 3; index++) {
    const exit = await cluster.terminate(index);
    assert.equal(exit.forced, false, `node ${index + 1} stopped on SIGTERM`);
  }
  const images = await Promise.all(['n1', 'n2', 'n3'].map((id) => sha256File(path.join(cluster.dir, id, 'volumes', cluster.volume, 'volume.img'), 16 * MiB)));
  assert.deepEqual(images, [images[0], images[0], images[0]], 'byte-identical replicas');

  // The scenario did what it is for: the writes sent to n1 while it was stopped were read when
  // it resumed, and refused (lease lost), not executed.
  const refusedOnResume = log.split('\n').filter((line) => /\[node n1\S*\] device refused a request .*command=WRITE.*not serving on this node/.test(line));
  t.diagnostic(`n1 refused ${refusedOnResume.length} stale writes on resuming: ${refusedOnResume[0]?.replace(/^.*reason=/, '') ?? '-'}`);
  assert.ok(refusedOnResume.length > 0, 'n1 read stale writes on resuming and refused them');
}));
