// `mirrorsan attach`'s core: a BlockDevice that forwards every request to one node over an
// NbdClient and, when that node goes away, keeps the unanswered requests, reconnects (to the
// next node in the list, with backoff) and replays them in their original order. Served by the
// ordinary NbdServer, it is a local multipath endpoint for any NBD client (DESIGN.md §5,
// "Client failover"): the client sees a pause, not an error, unless no node comes back
// within the failover timeout.
//
// Why replaying is sound here:
// - Every request the client sent is answered exactly once by this device; a request the node
//   answered is never resent. A request whose answer was lost with the connection may have been
//   applied by the node already; replaying it is safe because every NBD command is idempotent
//   (READ, WRITE, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS, and FLUSH) as long as no other
//   writer changed the same range in between, which NBD does not order anyway for requests in
//   flight at the same time.
// - FLUSH is replayed like any other request. A FLUSH only promises durability of writes that
//   were *answered* before it was sent; those answers came from a node, and a node answers a
//   write only once it is in its log file (the OS page cache at least), which survives a SIGKILL
//   of the node process, so the replayed FLUSH on the restarted (or another) node makes them
//   durable. A power loss of the node before its fsync is the replication layer's job (the write
//   is on the other in-sync members), not this device's.
//
// When a node is given up on (issue 5, item 5), for one of three signs: its connection closed
// (the process died, or its server is stopping: ESHUTDOWN); it answered nothing for
// `requestTimeoutMs` while requests were outstanding (stopped, hung, or cut off from us); or it
// refused a request because it does not serve the volume now (it fenced itself: lease lost, out
// of the in-sync set, catching up). Such a refusal means the node did not execute the request
// and never will (ReplicatedVolume refuses before admission), so it is replayed elsewhere rather
// than passed to the client as an EIO. The connection is then reset (RST on TCP, so requests
// still in our kernel's send queue are dropped instead of reaching the node after a partition
// heals) and the unanswered requests go to the next node.
//
// Why a write replayed on node B cannot be overtaken by the same write applied late by the node
// A that was given up on (epoch fencing; docs/replication.md, "Client failover and fencing"):
// 1. A write A admitted holds A's region grant, and A sent its WRITE frames to every member
//    when it admitted it. B's replay needs the same grant. The arbiter moves it only after A
//    released it (which A does only once every member acknowledged A's writes to the region, so
//    they are applied everywhere before B's), or after A left the in-sync set by an
//    epoch-incrementing CAS, which the others make only once A's lease ran out (A has fenced
//    itself by then). From that epoch on every member drops A's stream frames (A is no longer
//    a stream member, and frames of an older epoch are refused), and grant messages of the old
//    epoch are ignored by the new arbiter and the holders: nothing A sends on resuming lands.
//    A's own image may hold the write; A serves nothing until it has caught up, and catch-up
//    overwrites every chunk that differs from an in-sync member.
// 2. A write A received but had not admitted (waiting for its grant, or still unread in A's
//    socket buffer while A was stopped: Linux hands it to the process after SIGCONT even when
//    we reset the connection) is never executed once A stopped serving: A checks its lease on
//    every request it reads, and refuses a waiting write at admission if it stopped serving at
//    any moment since the write was submitted (the volume's serving term) or does not serve now.
// 3. Timing, the one assumption: `requestTimeoutMs` must exceed the nodes' lease TTL plus their
//    failure timeout. A node stopped for that long has lost its lease (point 2 applies to all it
//    holds). A live node that answers nothing for that long (cut off from us only, or slow)
//    keeps its lease and could still admit a write that waits for its grant after our replay;
//    the bound is that no live node keeps a write waiting for a grant that long (a grant waits
//    at most for a dead holder's removal: about its lease TTL plus the failure timeout). NVMe-oF
//    multipath rests on the same kind of bound (its command quiesce time).
// 4. Answers are taken only from the connection a request was last sent on: a node given up on
//    cannot acknowledge anything late (its connection is gone; a new connection to it is a new
//    generation).
import * as net from 'node:net';
import { MirrorsanError, assert, type ErrorCode } from '../errors.js';
import { NbdClient, NbdClientError, type NbdTarget } from '../nbd/client.js';
import { ERRNO } from '../nbd/protocol.js';
import { ForwardingBlockDevice, issueOperation, type Operation } from '../nbd/forwarded-operation.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry } from '../volume/device.js';

export interface FailoverDeviceOptions {
  /** Export name on the nodes (the volume); also this device's export name. */
  name: string;
  /** Nodes serving the volume, tried in order, cycling. */
  nodes: readonly NbdTarget[];
  logger: Logger;
  /** How long requests wait for a node to come back before they fail with EIO (default 60 s). */
  failoverTimeoutMs?: number;
  /** First reconnect delay; doubles per failed attempt up to backoffMaxMs (default 50 ms). */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** One connect + handshake attempt (default 5 s). */
  connectTimeoutMs?: number;
  /**
   * A node that answers nothing for this long while requests are outstanding is given up on
   * (stopped, hung or cut off) and its requests are replayed on the next node (default 15 s).
   * Must exceed the nodes' lease TTL plus failure timeout: see the header, point 3.
   */
  requestTimeoutMs?: number;
  /**
   * Requests sent to the node (or held for replay) at once. Beyond it, requests wait in FIFO
   * order without being sent: backpressure. The waiting list itself is bounded by the NbdServer,
   * which stops reading from a client with too many requests in flight (default 1024).
   */
  requestsPendingMax?: number;
}

export type FailoverState = 'connected' | 'reconnecting' | 'down' | 'closed';

export interface FailoverStats {
  state: FailoverState;
  /** The node connected to ('' when none). */
  node: string;
  /** Completed failovers (reconnected after losing a node). */
  failovers: number;
  /** Requests resent after a failover, over all failovers. */
  replayed: number;
  /** Time from losing the node (for a stall: from its last answer) to replaying on the next one, for the last failover. */
  pauseMsLast: number;
  /** Requests sent or held for replay. */
  pending: number;
  /** Requests waiting for room among the pending (backpressure). */
  waiting: number;
  /** Requests failed with EIO because no node came back in time. */
  failedRequests: number;
  /** Nodes given up on because they answered nothing for the request timeout. */
  stalls: number;
  /** Nodes given up on because they refused a request as not serving the volume (fenced). */
  notServing: number;
}

interface FailoverTuning {
  failoverTimeoutMs: number;
  backoffInitialMs: number;
  backoffMaxMs: number;
  connectTimeoutMs: number;
  requestTimeoutMs: number;
  requestsPendingMax: number;
}

export const FAILOVER_DEFAULTS: Readonly<FailoverTuning> = Object.freeze({
  failoverTimeoutMs: 60_000,
  backoffInitialMs: 50,
  backoffMaxMs: 1_000,
  connectTimeoutMs: 5_000,
  // Three default lease TTLs (5 s): above TTL + failure timeout with room for the removal's polls.
  requestTimeoutMs: 15_000,
  requestsPendingMax: 1024,
});

/**
 * What ReplicatedVolume says when it refuses a request because this node may not serve the
 * volume now (lease lost, not in the in-sync set, catching up, a write whose admission came
 * after a fence). Such a request was not executed and never will be on that node, so another
 * node may serve it. The NBD error carries no more than an errno, so the structured reply's
 * message is the only channel; src/attach/attach.test.ts checks this text against the volume.
 */
export const NOT_SERVING_MARKER = 'not serving on this node';

/** Payload sizes the NBD spec lets clients assume when a server sends no INFO_BLOCK_SIZE. */
const BLOCK_SIZE_DEFAULTS = Object.freeze({ minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 });

/** NBD error replies passed to our client as they are; the codes the NbdServer turns back into errnos. */
const CODE_BY_NBD_ERRNO = new Map<number, ErrorCode>([
  [ERRNO.EIO, 'NBD_EIO'],
  [ERRNO.ENOSPC, 'NBD_ENOSPC'],
  [ERRNO.EPERM, 'NBD_EPERM'],
  [ERRNO.EINVAL, 'NBD_EINVAL'],
  [ERRNO.EOVERFLOW, 'NBD_EOVERFLOW'],
  [ERRNO.ENOTSUP, 'NBD_ENOTSUP'],
]);

interface Request {
  readonly seq: number;
  readonly operation: Operation;
  /** The connection generation it was last sent on; 0 = not sent yet. */
  sentGeneration: number;
  settled: boolean;
  resolve(value: Buffer | undefined): void;
  reject(error: Error): void;
}

export function describeTarget(target: NbdTarget): string {
  return 'path' in target ? `unix:${target.path}` : `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
}

export class FailoverDevice extends ForwardingBlockDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  private readonly nodes: readonly NbdTarget[];
  private readonly log: Logger;
  private readonly failoverTimeoutMs: number;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private readonly connectTimeoutMs: number;
  private readonly requestTimeoutMs: number;
  private readonly requestsPendingMax: number;
  private readonly geometryValue: DeviceGeometry;

  private client: NbdClient;
  private socket: net.Socket;
  private nodeIndex: number;
  /** Bumped on every new connection: answers and failures of an older one are stale. */
  private generation = 1;
  private stateValue: FailoverState = 'connected';
  /** Sent or held for replay, in admission (= replay) order. */
  private readonly pending = new Map<number, Request>();
  /** Admitted later, when `pending` has room. */
  private readonly waiting: Request[] = [];
  private nextSeq = 1;
  private outageStartedMs = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private outageTimer: NodeJS.Timeout | undefined;
  /**
   * The node we failed over to has not answered anything yet: if it is lost too (or refuses as
   * not serving), the outage goes on (its start, its failover timeout) rather than starting anew,
   * and reconnects back off, so nodes that all refuse cannot keep the requests alive for ever.
   */
  private awaitingFirstAnswer = false;
  private continuedLosses = 0;
  /** When the connected node last showed progress: an answer, or the first request of a busy spell. */
  private progressAtMs = 0;
  private stallTimer: NodeJS.Timeout | undefined;
  private readonly counters = { failovers: 0, replayed: 0, pauseMsLast: 0, failedRequests: 0, stalls: 0, notServing: 0 };

  private constructor(options: FailoverDeviceOptions, resolved: Readonly<FailoverTuning>, first: Connected) {
    super();
    this.name = options.name;
    this.nodes = options.nodes;
    this.log = options.logger;
    this.failoverTimeoutMs = resolved.failoverTimeoutMs;
    this.backoffInitialMs = resolved.backoffInitialMs;
    this.backoffMaxMs = resolved.backoffMaxMs;
    this.connectTimeoutMs = resolved.connectTimeoutMs;
    this.requestTimeoutMs = resolved.requestTimeoutMs;
    this.requestsPendingMax = resolved.requestsPendingMax;
    this.client = first.client;
    this.socket = first.socket;
    this.nodeIndex = first.nodeIndex;
    this.description = first.client.description ?? `${options.name} via mirrorsan attach`;
    const sizes = first.client.blockSizes ?? BLOCK_SIZE_DEFAULTS;
    this.geometryValue = Object.freeze({
      sizeBytes: first.client.sizeBytes,
      blockSizeMin: sizes.minimum,
      blockSizePreferred: sizes.preferred,
      payloadMaxBytes: sizes.maximum,
      readOnly: first.client.readOnly,
      // All our clients share this one backend connection, so FLUSH/FUA on any of them covers
      // them all; across a failover the promise is the nodes', so we pass on theirs.
      multiConn: first.client.canMultiConn,
    });
    this.watch(first.socket, this.generation);
  }

  /**
   * Connects to the first node that answers (cycling through the list with backoff for up to
   * the failover timeout) and takes the export's geometry from it.
   */
  static async open(options: FailoverDeviceOptions): Promise<FailoverDevice> {
    const resolved = resolveOptions(options);
    const log = options.logger;
    const deadlineMs = Date.now() + resolved.failoverTimeoutMs;
    let delayMs = resolved.backoffInitialMs;
    for (let attempt = 0; ; attempt++) {
      const nodeIndex = attempt % options.nodes.length;
      const target = options.nodes[nodeIndex]!;
      try {
        const connected = await connectNode(target, options.name, resolved.connectTimeoutMs, nodeIndex);
        log.info('connected', { node: describeTarget(target), export: options.name, sizeBytes: connected.client.sizeBytes });
        return new FailoverDevice(options, resolved, connected);
      } catch (error) {
        if (!isConnectionFailure(error) || Date.now() + delayMs > deadlineMs) {
          throw new MirrorsanError('NBD_EIO', `no node serves ${options.name}: ${(error as Error).message}`, { cause: error });
        }
        log.warn('node unavailable', { node: describeTarget(target), error: (error as Error).message, retryInMs: delayMs });
      }
      await sleep(delayMs);
      delayMs = Math.min(delayMs * 2, resolved.backoffMaxMs);
    }
  }

  geometry(): DeviceGeometry {
    return this.geometryValue;
  }

  stats(): FailoverStats {
    return {
      state: this.stateValue,
      node: this.stateValue === 'connected' ? describeTarget(this.nodes[this.nodeIndex]!) : '',
      ...this.counters,
      pending: this.pending.size,
      waiting: this.waiting.length,
    };
  }


  /** Fails whatever is pending with ESHUTDOWN and disconnects from the node. */
  async close(): Promise<void> {
    if (this.stateValue === 'closed') return;
    this.stateValue = 'closed';
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.outageTimer);
    clearTimeout(this.stallTimer);
    const error = new MirrorsanError('NBD_SHUTDOWN', 'mirrorsan attach is shutting down');
    for (const request of [...this.pending.values(), ...this.waiting]) this.settle(request, error);
    this.pending.clear();
    this.waiting.length = 0;
    this.socket.destroy();
  }

  // ---------------------------------------------------------------------------------------------
  // Requests

  protected submit(operation: Operation): Promise<Buffer | undefined> {
    if (this.stateValue === 'closed') return Promise.reject(new MirrorsanError('NBD_SHUTDOWN', 'mirrorsan attach is shutting down'));
    if (this.stateValue === 'down') {
      return Promise.reject(new MirrorsanError('NBD_EIO', `no node serving ${this.name} came back within ${this.failoverTimeoutMs} ms`));
    }
    return new Promise((resolve, reject) => {
      const request: Request = { seq: this.nextSeq++, operation, sentGeneration: 0, settled: false, resolve, reject };
      if (this.pending.size < this.requestsPendingMax && this.waiting.length === 0) this.admit(request);
      else this.waiting.push(request);
    });
  }

  private admit(request: Request): void {
    this.pending.set(request.seq, request);
    if (this.stateValue === 'connected') this.send(request);
    // Otherwise it is held, and replayed with the others once a node is back.
  }

  private admitWaiting(): void {
    while (this.waiting.length > 0 && this.pending.size < this.requestsPendingMax && (this.stateValue === 'connected' || this.stateValue === 'reconnecting')) {
      this.admit(this.waiting.shift()!);
    }
  }

  private send(request: Request): void {
    const generation = this.generation;
    request.sentGeneration = generation;
    this.watchProgress();
    issueOperation(this.client, request.operation).then(
      (value) => this.answered(request, generation, value),
      (error: unknown) => this.failed(request, generation, error),
    );
  }

  private answered(request: Request, generation: number, value: Buffer | undefined): void {
    // Only the connection the request was last sent on speaks for it (header, point 4).
    if (request.settled || request.sentGeneration !== generation) return;
    this.progressed(generation);
    this.pending.delete(request.seq);
    this.settle(request, undefined, value);
    this.admitWaiting();
  }

  private failed(request: Request, generation: number, error: unknown): void {
    if (request.settled || request.sentGeneration !== generation) return;
    const nbdError = error instanceof NbdClientError ? error.nbdError : undefined;
    if (nbdError === ERRNO.EIO && (error as Error).message.includes(NOT_SERVING_MARKER)) {
      // The node fenced itself and did not execute the request: keep it for the next node.
      if (generation === this.generation && this.stateValue === 'connected') {
        this.counters.notServing++;
        this.connectionLost(generation, (error as Error).message);
      }
      return;
    }
    // ESHUTDOWN: the node is stopping; like a lost connection, another node will answer.
    if (nbdError !== undefined && nbdError !== ERRNO.ESHUTDOWN) {
      // The node's own answer: passed on as it is, never retried.
      this.progressed(generation);
      this.pending.delete(request.seq);
      const code = CODE_BY_NBD_ERRNO.get(nbdError) ?? 'NBD_EIO';
      this.settle(request, new MirrorsanError(code, (error as Error).message, { cause: error }));
      this.admitWaiting();
      return;
    }
    // The connection broke (or is stopping) before this request was answered: keep it for replay.
    if (generation === this.generation) this.connectionLost(generation, (error as Error).message);
  }

  private settle(request: Request, error: Error | undefined, value?: Buffer): void {
    assert(!request.settled, 'a request answered twice');
    request.settled = true;
    if (error === undefined) request.resolve(value);
    else request.reject(error);
  }

  // ---------------------------------------------------------------------------------------------
  // Stall detection (see requestTimeoutMs)

  /** A request goes out (it is in `pending` already): if no other was outstanding, the node's clock starts now. */
  private watchProgress(): void {
    if (this.pending.size === 1) this.progressAtMs = performance.now();
    if (this.stallTimer === undefined) this.armStallTimer(this.requestTimeoutMs - (performance.now() - this.progressAtMs));
  }

  /** The node answered something on the current connection: it is alive and serving. */
  private progressed(generation: number): void {
    if (generation !== this.generation) return;
    this.progressAtMs = performance.now();
    if (this.awaitingFirstAnswer) {
      // The failover is over: the new node serves.
      this.awaitingFirstAnswer = false;
      this.continuedLosses = 0;
      clearTimeout(this.outageTimer);
      this.outageTimer = undefined;
    }
  }

  private armStallTimer(delayMs: number): void {
    const generation = this.generation;
    this.stallTimer = setTimeout(() => {
      this.stallTimer = undefined;
      if (generation !== this.generation || this.stateValue !== 'connected' || this.pending.size === 0) return;
      const silentMs = performance.now() - this.progressAtMs;
      if (silentMs < this.requestTimeoutMs) {
        this.armStallTimer(this.requestTimeoutMs - silentMs);
        return;
      }
      this.counters.stalls++;
      // The outage began when the node went silent, not now: the pause reported is the client's.
      this.connectionLost(generation, `no answer for ${Math.round(silentMs)} ms with ${this.pending.size} requests outstanding (request timeout ${this.requestTimeoutMs} ms)`, this.progressAtMs);
    }, Math.max(1, Math.ceil(delayMs)));
  }

  // ---------------------------------------------------------------------------------------------
  // Failover

  /** Notices a node that closed the connection even when no request is in flight. */
  private watch(socket: net.Socket, generation: number): void {
    socket.on('error', () => {}); // reported through 'close' and the client's rejections
    socket.on('close', () => this.connectionLost(generation, 'connection closed'));
  }

  private connectionLost(generation: number, reason: string, silentSinceMs = performance.now()): void {
    if (generation !== this.generation || this.stateValue !== 'connected') return;
    const left = describeTarget(this.nodes[this.nodeIndex]!);
    this.stateValue = 'reconnecting';
    clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
    this.dropConnection();
    // Lost again before the node we failed over to answered anything: the same outage goes on.
    const continuing = this.awaitingFirstAnswer;
    this.awaitingFirstAnswer = false;
    if (continuing) this.continuedLosses++;
    else {
      this.outageStartedMs = silentSinceMs;
      this.continuedLosses = 0;
    }
    this.log.warn('node lost', { node: left, reason, pending: this.pending.size, waiting: this.waiting.length });
    clearTimeout(this.outageTimer);
    const remainingMs = Math.max(0, this.failoverTimeoutMs - (performance.now() - this.outageStartedMs));
    this.outageTimer = setTimeout(() => this.giveUp(left), remainingMs);
    const delayBeforeMs = continuing ? Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** Math.min(this.continuedLosses - 1, 20)) : 0;
    this.reconnect(left, this.nodeIndex + 1, this.backoffInitialMs, delayBeforeMs);
  }

  /**
   * Closes the connection for good. On TCP with a reset (RST), not a FIN: requests still in our
   * kernel's send queue are dropped rather than retransmitted to the node once a partition
   * heals, after we replayed them elsewhere. (What the node's kernel already received stays
   * readable there; the node's own fencing deals with that: header, point 2.)
   */
  private dropConnection(): void {
    const socket = this.socket;
    if (socket.destroyed) return;
    if ('path' in this.nodes[this.nodeIndex]! || socket.connecting) socket.destroy();
    else socket.resetAndDestroy();
  }

  private reconnect(left: string, nodeIndex: number, delayMs: number, delayBeforeMs: number): void {
    this.reconnectTimer = setTimeout(() => {
      void this.attempt(left, nodeIndex % this.nodes.length, delayMs);
    }, delayBeforeMs);
  }

  private async attempt(left: string, nodeIndex: number, delayMs: number): Promise<void> {
    if (this.stateValue === 'closed') return;
    const target = this.nodes[nodeIndex]!;
    let connected: Connected | undefined;
    let failure: string;
    try {
      connected = await connectNode(target, this.name, this.connectTimeoutMs, nodeIndex);
      failure = this.incompatibility(connected.client) ?? '';
    } catch (error) {
      failure = (error as Error).message;
    }
    // close() may have run while we were connecting.
    if ((this.stateValue as FailoverState) === 'closed') {
      connected?.socket.destroy();
      return;
    }
    if (connected !== undefined && failure === '') {
      this.joined(left, connected);
      return;
    }
    connected?.socket.destroy();
    this.log.debug('reconnect failed', { node: describeTarget(target), error: failure, retryInMs: delayMs });
    // After giving up keep looking, at the slowest pace, so the device recovers on its own.
    const nextDelayMs = this.stateValue === 'down' ? this.backoffMaxMs : Math.min(delayMs * 2, this.backoffMaxMs);
    this.reconnect(left, nodeIndex + 1, nextDelayMs, delayMs);
  }

  /** A node whose export differs would answer our clients' validated requests differently. */
  private incompatibility(client: NbdClient): string | undefined {
    const geometry = this.geometryValue;
    const sizes = client.blockSizes ?? BLOCK_SIZE_DEFAULTS;
    if (client.sizeBytes !== geometry.sizeBytes) return `its export is ${client.sizeBytes} bytes, not ${geometry.sizeBytes}`;
    if (client.readOnly && !geometry.readOnly) return 'its export is read-only';
    if (sizes.minimum > geometry.blockSizeMin || sizes.maximum < geometry.payloadMaxBytes) {
      return `its block sizes (${sizes.minimum}..${sizes.maximum}) do not cover ${geometry.blockSizeMin}..${geometry.payloadMaxBytes}`;
    }
    return undefined;
  }

  private joined(left: string, connected: Connected): void {
    const wasDown = this.stateValue === 'down';
    this.generation++;
    this.client = connected.client;
    this.socket = connected.socket;
    this.nodeIndex = connected.nodeIndex;
    this.stateValue = 'connected';
    this.watch(connected.socket, this.generation);
    // In admission order: what the lost node may not have applied goes first.
    const replay = [...this.pending.values()];
    this.progressAtMs = performance.now();
    // The outage ends with this node's first answer (progressed); with nothing to replay, now.
    this.awaitingFirstAnswer = replay.length > 0 && !wasDown;
    if (!this.awaitingFirstAnswer) {
      clearTimeout(this.outageTimer);
      this.outageTimer = undefined;
      this.continuedLosses = 0;
    }
    for (const request of replay) this.send(request);
    const pauseMs = Math.round(performance.now() - this.outageStartedMs);
    this.counters.failovers++;
    this.counters.replayed += replay.length;
    this.counters.pauseMsLast = pauseMs;
    this.log.info(wasDown ? 'node back after the failover timeout' : 'failover', {
      left,
      joined: describeTarget(connected.target),
      replayed: replay.length,
      pauseMs,
    });
    this.admitWaiting();
  }

  /** The failover timeout passed: every request held fails with EIO, new ones fail at once. */
  private giveUp(left: string): void {
    if (this.stateValue !== 'reconnecting') return;
    this.stateValue = 'down';
    const error = new MirrorsanError('NBD_EIO', `no node serving ${this.name} came back within ${this.failoverTimeoutMs} ms`);
    const held = [...this.pending.values(), ...this.waiting];
    this.pending.clear();
    this.waiting.length = 0;
    for (const request of held) this.settle(request, error);
    this.counters.failedRequests += held.length;
    this.log.error('failover timed out', { left, failedRequests: held.length, failoverTimeoutMs: this.failoverTimeoutMs });
  }
}

interface Connected {
  client: NbdClient;
  socket: net.Socket;
  target: NbdTarget;
  nodeIndex: number;
}

/** Connect and handshake within `timeoutMs`; we keep the socket to notice its close. */
async function connectNode(target: NbdTarget, exportName: string, timeoutMs: number, nodeIndex: number): Promise<Connected> {
  const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port, noDelay: true });
  socket.on('error', () => {}); // surfaces as the rejection below
  const timer = setTimeout(() => socket.destroy(new Error(`connect timed out after ${timeoutMs} ms`)), timeoutMs);
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('close', () => reject(new NbdClientError('cannot connect: connection closed')));
      socket.once('error', (error) => reject(new NbdClientError(`cannot connect: ${error.message}`, { cause: error })));
    });
    const client = await NbdClient.over(socket, { exportName });
    return { client, socket, target, nodeIndex };
  } catch (error) {
    socket.destroy();
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** A refused or broken connection is worth another node; a refused export is a mistake. */
function isConnectionFailure(error: unknown): boolean {
  return error instanceof NbdClientError && error.optionReply === undefined && error.nbdError === undefined;
}

function resolveOptions(options: FailoverDeviceOptions): Readonly<FailoverTuning> {
  const resolved = {
    failoverTimeoutMs: options.failoverTimeoutMs ?? FAILOVER_DEFAULTS.failoverTimeoutMs,
    backoffInitialMs: options.backoffInitialMs ?? FAILOVER_DEFAULTS.backoffInitialMs,
    backoffMaxMs: options.backoffMaxMs ?? FAILOVER_DEFAULTS.backoffMaxMs,
    connectTimeoutMs: options.connectTimeoutMs ?? FAILOVER_DEFAULTS.connectTimeoutMs,
    requestTimeoutMs: options.requestTimeoutMs ?? FAILOVER_DEFAULTS.requestTimeoutMs,
    requestsPendingMax: options.requestsPendingMax ?? FAILOVER_DEFAULTS.requestsPendingMax,
  };
  for (const [key, value] of Object.entries(resolved)) {
    if (!Number.isSafeInteger(value) || value <= 0) throw new MirrorsanError('CONFIG_INVALID', `attach option ${key} must be a positive integer, got ${value}`);
  }
  if (resolved.backoffMaxMs < resolved.backoffInitialMs) throw new MirrorsanError('CONFIG_INVALID', 'attach backoffMaxMs is below backoffInitialMs');
  if (options.nodes.length === 0) throw new MirrorsanError('CONFIG_INVALID', 'attach needs at least one node');
  if (options.name === '') throw new MirrorsanError('CONFIG_INVALID', 'attach needs a volume name');
  return Object.freeze(resolved);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
