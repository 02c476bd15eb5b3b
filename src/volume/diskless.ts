// Diskless mode's data path (docs/replication.md, "Disk failure"): a BlockDevice that forwards
// every request of this node's clients to an in-sync peer's NBD export of the same volume,
// over our own NbdClient, while the local disk is detached. The switch-over (when to forward,
// leaving the in-sync set, re-attaching) is diskless-volume.ts; this file only moves requests.
//
// Which peer: the caller's `targets()` (the record's in-sync members other than this node, with
// the NBD endpoints of their live registrations), first one not recently failed. One
// connection at a time: FLUSH and FUA through it cover every write this node forwarded.
//
// Retrying without reordering writes. NBD does not order requests that are in flight together,
// so a client issues a write over bytes another in-flight write touches only after that one was
// answered. What we must never do is answer a write, or fail it, while an earlier copy of it
// may still be applied later: that copy could land after the client's next write to the same
// bytes. Hence two kinds of retry:
// - An error reply from the peer (EIO: it is fenced, rejoining, or lost its own disk; ESHUTDOWN:
//   it is stopping; ENOSPC) means the peer is done with that request: it is sent again, after a
//   backoff, on the same connection, or on another peer's once every request still in flight on
//   this one has been answered (a graceful switch: nothing is left behind on the old peer).
// - A lost connection leaves its unanswered requests in doubt: they are replayed on the next
//   connection, like `mirrorsan attach` does (src/attach/attach.ts), sound because a peer that
//   lost the connection is dead or stopping (a partitioned peer has lost its lease and fenced
//   itself, so it applies nothing more either: I2).
// Other errors (EINVAL, EPERM from a strict volume, ENOTSUP, EOVERFLOW) are the peer's answer
// and are passed to the client as they are.
//
// Bounds: every request waits at most `waitMaxMs` from its arrival for a peer to answer it, then
// fails with EIO (logged with the reason: no in-sync peer, or the last error); requests sent or
// held at once are limited (beyond it they wait in FIFO order, and beyond that they are refused
// with VOLUME_BUSY).
import { MirrorsanError, assert, type ErrorCode } from '../errors.js';
import { NbdClient, NbdClientError, type NbdClientTlsOptions, type NbdTarget } from '../nbd/client.js';
import { ERRNO } from '../nbd/protocol.js';
import { ForwardingBlockDevice, issueOperation, type Operation } from '../nbd/forwarded-operation.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry } from './device.js';

/** An in-sync peer's NBD export, as the caller knows it now. */
export interface ForwardTarget {
  node: string;
  target: NbdTarget;
}

export interface ForwardingDeviceOptions {
  /** The volume: this device's name and the export asked for on the peers. */
  name: string;
  description?: string;
  /** This export's geometry (the clients validated against it); a peer's size must be the same. */
  geometry: DeviceGeometry;
  /** The in-sync peers to forward to now, best first; asked at every (re)connect. */
  targets: () => readonly ForwardTarget[];
  logger: Logger;
  /** A request fails with EIO if no peer answered it within this time of its arrival (default 30 s). */
  waitMaxMs?: number;
  /** One connect and handshake (default 5 s). */
  connectTimeoutMs?: number;
  /** Delay before a request is retried or a failed peer is tried again; doubles up to retryDelayMaxMs. */
  retryDelayInitialMs?: number;
  retryDelayMaxMs?: number;
  /** Requests sent or held at once (default 1024); more wait in FIFO order without being sent. */
  requestsPendingMax?: number;
  /** Requests waiting behind those (default 4096); one more is refused with VOLUME_BUSY. */
  requestsWaitingMax?: number;
  /** STARTTLS to the peers (nodes that require TLS). */
  tls?: NbdClientTlsOptions;
}

interface ForwardTuning {
  waitMaxMs: number;
  connectTimeoutMs: number;
  retryDelayInitialMs: number;
  retryDelayMaxMs: number;
  requestsPendingMax: number;
  requestsWaitingMax: number;
}

export const FORWARD_DEFAULTS: Readonly<ForwardTuning> = Object.freeze({
  waitMaxMs: 30_000,
  connectTimeoutMs: 5_000,
  retryDelayInitialMs: 50,
  retryDelayMaxMs: 1_000,
  requestsPendingMax: 1024,
  requestsWaitingMax: 4096,
});

/** How often requests are checked against their deadline. */
const DEADLINE_CHECK_INTERVAL_MS = 100;

export type ForwardState = 'held' | 'connecting' | 'connected' | 'no-peer' | 'closed';

export interface ForwardStats {
  state: ForwardState;
  /** The peer requests go to now (null while none). */
  node: string | null;
  /** Requests answered by a peer (successfully or with an error passed on). */
  forwardedRequests: number;
  /** Requests sent again after an error reply. */
  retriedRequests: number;
  /** Requests replayed after a lost connection. */
  replayedRequests: number;
  /** Requests failed with EIO because no peer answered them in time. */
  failedRequests: number;
  /** Connections opened to peers. */
  connections: number;
  pending: number;
  waiting: number;
  lastError: string | null;
}

interface Request {
  readonly seq: number;
  readonly operation: Operation;
  readonly deadlineMs: number;
  /** The connection generation it is in flight on; 0 while held (not sent, or to be sent again). */
  sentGeneration: number;
  /** Not sent again before this time (backoff after an error reply). */
  notBeforeMs: number;
  retries: number;
  lastError: string | undefined;
  settled: boolean;
  resolve(value: Buffer | undefined): void;
  reject(error: Error): void;
}

interface Connection {
  readonly client: NbdClient;
  readonly node: string;
  readonly generation: number;
  /** Requests in flight on it. */
  readonly inFlight: Set<number>;
}

/** What to do with a peer's error reply: retry elsewhere or later, or pass it to the client. */
export function classifyPeerError(nbdError: number): 'retry' | 'pass' {
  // EIO: the peer cannot serve now (fenced, rejoining, its own disk failed). ESHUTDOWN: it is
  // stopping. ENOSPC: our NBD server refused every request past the end before it reached us,
  // so this is the peer's own full disk (a node that handles it goes diskless itself).
  return nbdError === ERRNO.EIO || nbdError === ERRNO.ESHUTDOWN || nbdError === ERRNO.ENOSPC ? 'retry' : 'pass';
}

/**
 * The peer to connect to: the first target not failed recently (`avoidUntilMs` in the future),
 * or undefined with the time the earliest of them may be tried again (undefined: no target).
 */
export function chooseTarget(targets: readonly ForwardTarget[], avoidUntilMs: ReadonlyMap<string, number>, nowMs: number): { target: ForwardTarget } | { retryAtMs: number | undefined } {
  let retryAtMs: number | undefined;
  for (const target of targets) {
    const until = avoidUntilMs.get(target.node) ?? 0;
    if (until <= nowMs) return { target };
    retryAtMs = retryAtMs === undefined ? until : Math.min(retryAtMs, until);
  }
  return { retryAtMs };
}

/** NBD error replies passed to our client as they are (the NbdServer turns the codes back into errnos). */
const CODE_BY_NBD_ERRNO = new Map<number, ErrorCode>([
  [ERRNO.EPERM, 'NBD_EPERM'],
  [ERRNO.EINVAL, 'NBD_EINVAL'],
  [ERRNO.EOVERFLOW, 'NBD_EOVERFLOW'],
  [ERRNO.ENOTSUP, 'NBD_ENOTSUP'],
]);

export class ForwardingDevice extends ForwardingBlockDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  private readonly geometryValue: DeviceGeometry;
  private readonly targets: () => readonly ForwardTarget[];
  private readonly log: Logger;
  private readonly tuning: Readonly<ForwardTuning>;
  private readonly tls: NbdClientTlsOptions | undefined;

  private started = false;
  private closed = false;
  private connection: Connection | undefined;
  private connecting = false;
  /** Once the current connection has nothing in flight, it is closed and another peer is tried. */
  private switchAway = false;
  private generation = 0;
  /** Sent or held, in arrival (= replay) order. */
  private readonly pending = new Map<number, Request>();
  /** Beyond requestsPendingMax, in FIFO order. */
  private readonly waiting: Request[] = [];
  private nextSeq = 1;
  /** Peers that failed recently (connect failure, error reply, lost connection): avoided until then. */
  private readonly avoidUntilMs = new Map<string, number>();
  private readonly failureStreak = new Map<string, number>();
  private pumpTimer: NodeJS.Timeout | undefined;
  private pumpAtMs = Number.POSITIVE_INFINITY;
  private readonly deadlineTimer: NodeJS.Timeout;
  private readonly idleWaiters: (() => void)[] = [];
  private noPeerSinceMs: number | undefined;
  private readonly counters = { forwardedRequests: 0, retriedRequests: 0, replayedRequests: 0, failedRequests: 0, connections: 0 };
  private lastError: string | undefined;

  constructor(options: ForwardingDeviceOptions) {
    super();
    this.tuning = resolveTuning(options);
    this.name = options.name;
    this.description = options.description ?? `${options.name} (diskless: forwarded to an in-sync peer)`;
    this.geometryValue = Object.freeze({ ...options.geometry });
    this.targets = options.targets;
    this.log = options.logger;
    this.tls = options.tls;
    this.deadlineTimer = setInterval(() => this.checkDeadlines(), DEADLINE_CHECK_INTERVAL_MS);
    this.deadlineTimer.unref();
  }

  /** Requests are held (their deadlines running) until start(): the caller is still leaving the in-sync set. */
  start(): void {
    if (this.closed || this.started) return;
    this.started = true;
    this.pump();
  }

  geometry(): DeviceGeometry {
    return this.geometryValue;
  }

  stats(): ForwardStats {
    let state: ForwardState;
    if (this.closed) state = 'closed';
    else if (!this.started) state = 'held';
    else if (this.connection) state = 'connected';
    else if (this.connecting) state = 'connecting';
    else state = 'no-peer';
    return {
      state,
      node: this.connection?.node ?? null,
      ...this.counters,
      pending: this.pending.size,
      waiting: this.waiting.length,
      lastError: this.lastError ?? null,
    };
  }

  /** Resolves once every request that arrived so far has been answered (or failed). */
  drain(): Promise<void> {
    if (this.pending.size === 0 && this.waiting.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Fails whatever is pending with NBD_SHUTDOWN and disconnects. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.deadlineTimer);
    clearTimeout(this.pumpTimer);
    const error = new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name}: forwarding stopped`);
    for (const request of [...this.pending.values(), ...this.waiting]) this.settle(request, error);
    this.pending.clear();
    this.waiting.length = 0;
    this.connection?.client.close();
    this.connection = undefined;
    this.notifyIdle();
  }

  // ---- requests ------------------------------------------------------------------------------

  protected submit(operation: Operation): Promise<Buffer | undefined> {
    if (this.closed) return Promise.reject(new MirrorsanError('NBD_SHUTDOWN', `volume ${this.name}: forwarding stopped`));
    if (this.waiting.length >= this.tuning.requestsWaitingMax) {
      return Promise.reject(new MirrorsanError('VOLUME_BUSY', `volume ${this.name}: ${this.waiting.length} forwarded requests already wait`));
    }
    return new Promise((resolve, reject) => {
      const request: Request = {
        seq: this.nextSeq++,
        operation,
        deadlineMs: performance.now() + this.tuning.waitMaxMs,
        sentGeneration: 0,
        notBeforeMs: 0,
        retries: 0,
        lastError: undefined,
        settled: false,
        resolve,
        reject,
      };
      if (this.waiting.length === 0 && this.pending.size < this.tuning.requestsPendingMax) {
        this.pending.set(request.seq, request);
        this.pump();
      } else {
        this.waiting.push(request);
      }
    });
  }

  /** Sends what can go now, and connects or switches peers when that is what is needed. */
  private pump(): void {
    if (this.closed || !this.started) return;
    const nowMs = performance.now();
    while (this.waiting.length > 0 && this.pending.size < this.tuning.requestsPendingMax) {
      const request = this.waiting.shift()!;
      this.pending.set(request.seq, request);
    }
    const connection = this.connection;
    if (connection && !this.switchAway && !this.targets().some((target) => target.node === connection.node)) {
      this.log.info('forwarding peer is no longer an in-sync target: switching once its requests are answered', { peer: connection.node });
      this.switchAway = true;
    }
    if (connection && this.switchAway && connection.inFlight.size === 0) {
      this.log.info('leaving forwarding peer', { peer: connection.node });
      this.dropConnection();
    }
    if (!this.connection) {
      if (this.pending.size > 0) this.connect(nowMs);
      return;
    }
    if (this.switchAway) return; // nothing new on a connection being left
    const live = this.connection;
    let nextAtMs = Number.POSITIVE_INFINITY;
    for (const request of this.pending.values()) {
      if (request.sentGeneration !== 0) continue;
      if (request.notBeforeMs > nowMs) {
        nextAtMs = Math.min(nextAtMs, request.notBeforeMs);
        continue;
      }
      this.send(live, request);
    }
    if (nextAtMs !== Number.POSITIVE_INFINITY) this.schedulePump(nextAtMs - nowMs);
  }

  private schedulePump(delayMs: number): void {
    const atMs = performance.now() + Math.max(0, delayMs);
    if (this.pumpTimer !== undefined && this.pumpAtMs <= atMs) return;
    clearTimeout(this.pumpTimer);
    this.pumpAtMs = atMs;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = undefined;
      this.pumpAtMs = Number.POSITIVE_INFINITY;
      this.pump();
    }, Math.max(0, delayMs));
    this.pumpTimer.unref();
  }

  private send(connection: Connection, request: Request): void {
    request.sentGeneration = connection.generation;
    connection.inFlight.add(request.seq);
    issueOperation(connection.client, request.operation).then(
      (value) => this.answered(connection, request, value),
      (error: unknown) => this.failed(connection, request, error),
    );
  }

  private answered(connection: Connection, request: Request, value: Buffer | undefined): void {
    connection.inFlight.delete(request.seq);
    if (request.settled || request.sentGeneration !== connection.generation) return;
    this.failureStreak.delete(connection.node);
    this.avoidUntilMs.delete(connection.node);
    this.counters.forwardedRequests++;
    this.pending.delete(request.seq);
    this.settle(request, undefined, value);
    this.afterProgress();
  }

  private failed(connection: Connection, request: Request, error: unknown): void {
    connection.inFlight.delete(request.seq);
    if (request.settled || request.sentGeneration !== connection.generation) {
      this.afterProgress();
      return;
    }
    const nbdError = error instanceof NbdClientError ? error.nbdError : undefined;
    const message = error instanceof Error ? error.message : String(error);
    if (nbdError === undefined) {
      // The connection broke: the request is in doubt and is replayed with the others.
      this.connectionLost(connection, message);
      return;
    }
    if (classifyPeerError(nbdError) === 'pass') {
      this.counters.forwardedRequests++;
      this.pending.delete(request.seq);
      this.settle(request, new MirrorsanError(CODE_BY_NBD_ERRNO.get(nbdError) ?? 'NBD_EIO', message, { cause: error }));
      this.afterProgress();
      return;
    }
    // The peer is done with it and could not serve it: again later, maybe elsewhere.
    request.sentGeneration = 0;
    request.retries++;
    request.lastError = `${connection.node}: ${message}`;
    request.notBeforeMs = performance.now() + this.backoffMs(request.retries);
    this.counters.retriedRequests++;
    this.lastError = request.lastError;
    const avoidMs = this.notePeerFailure(connection.node);
    const others = this.targets().filter((target) => target.node !== connection.node && (this.avoidUntilMs.get(target.node) ?? 0) <= performance.now());
    if (others.length > 0 && !this.switchAway) {
      this.log.warn('forwarding peer refused a request: moving to another in-sync peer once its requests are answered', { peer: connection.node, error: message, next: others[0]!.node });
      this.switchAway = true;
    } else {
      this.log.debug('forwarding peer refused a request: retrying', { peer: connection.node, error: message, retryInMs: avoidMs });
    }
    this.afterProgress();
  }

  /** After any answer: more may be sent, a switch may complete, a drain may end. */
  private afterProgress(): void {
    this.pump();
    this.notifyIdle();
  }

  private settle(request: Request, error: Error | undefined, value?: Buffer): void {
    assert(!request.settled, 'a forwarded request answered twice');
    request.settled = true;
    if (error === undefined) request.resolve(value);
    else request.reject(error);
  }

  private notifyIdle(): void {
    if (this.pending.size > 0 || this.waiting.length > 0) return;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }

  private backoffMs(attempt: number): number {
    return Math.min(this.tuning.retryDelayMaxMs, this.tuning.retryDelayInitialMs * 2 ** Math.max(0, attempt - 1));
  }

  /** A peer failed (connect, error reply, lost connection): avoided for a growing while. */
  private notePeerFailure(node: string): number {
    const streak = (this.failureStreak.get(node) ?? 0) + 1;
    this.failureStreak.set(node, streak);
    const avoidMs = this.backoffMs(streak);
    this.avoidUntilMs.set(node, performance.now() + avoidMs);
    return avoidMs;
  }

  // ---- connections -----------------------------------------------------------------------------

  private connect(nowMs: number): void {
    if (this.connecting || this.closed) return;
    const choice = chooseTarget(this.targets(), this.avoidUntilMs, nowMs);
    if (!('target' in choice)) {
      if (this.noPeerSinceMs === undefined) {
        this.noPeerSinceMs = nowMs;
        this.log.warn(choice.retryAtMs === undefined ? 'no in-sync peer to forward to: requests wait' : 'every in-sync peer failed recently: requests wait', { pending: this.pending.size, waitMaxMs: this.tuning.waitMaxMs });
      }
      // A target may appear (a record change, a registration): look again soon.
      this.schedulePump(choice.retryAtMs === undefined ? this.tuning.retryDelayMaxMs : Math.min(this.tuning.retryDelayMaxMs, choice.retryAtMs - nowMs));
      return;
    }
    const { node, target } = choice.target;
    this.connecting = true;
    NbdClient.connect(target, { exportName: this.name, timeoutMs: this.tuning.connectTimeoutMs, ...(this.tls ? { tls: this.tls } : {}) }).then(
      (client) => {
        this.connecting = false;
        const problem = this.incompatibility(client);
        if (this.closed || problem !== undefined) {
          client.close();
          if (problem !== undefined) this.connectFailed(node, problem);
          return;
        }
        this.joined(node, target, client);
      },
      (error: unknown) => {
        this.connecting = false;
        this.connectFailed(node, error instanceof Error ? error.message : String(error));
      },
    );
  }

  private connectFailed(node: string, reason: string): void {
    if (this.closed) return;
    this.lastError = `${node}: ${reason}`;
    const retryInMs = this.notePeerFailure(node);
    this.log.warn('cannot forward to peer', { peer: node, error: reason, retryInMs });
    this.pump();
  }

  private incompatibility(client: NbdClient): string | undefined {
    if (client.sizeBytes !== this.geometryValue.sizeBytes) return `its export is ${client.sizeBytes} bytes, not ${this.geometryValue.sizeBytes}`;
    if (client.readOnly && !this.geometryValue.readOnly) return 'its export is read-only';
    return undefined;
  }

  private joined(node: string, target: NbdTarget, client: NbdClient): void {
    const generation = ++this.generation;
    const connection: Connection = { client, node, generation, inFlight: new Set() };
    this.connection = connection;
    this.switchAway = false;
    this.counters.connections++;
    const waitedMs = this.noPeerSinceMs === undefined ? 0 : Math.round(performance.now() - this.noPeerSinceMs);
    this.noPeerSinceMs = undefined;
    this.log.info('forwarding to in-sync peer', { peer: node, target: 'path' in target ? target.path : `${target.host}:${target.port}`, pending: this.pending.size, waitedMs });
    void client.closed().then(() => {
      if (this.connection === connection) this.connectionLost(connection, 'connection closed');
    });
    this.pump();
  }

  /** The connection broke: what was in flight on it is replayed on the next one. */
  private connectionLost(connection: Connection, reason: string): void {
    if (this.connection !== connection) return;
    this.connection = undefined;
    this.switchAway = false;
    connection.client.close();
    let replayed = 0;
    for (const request of this.pending.values()) {
      if (request.sentGeneration !== connection.generation) continue;
      request.sentGeneration = 0;
      request.lastError = `${connection.node}: ${reason}`;
      replayed++;
    }
    connection.inFlight.clear();
    this.counters.replayedRequests += replayed;
    this.lastError = `${connection.node}: ${reason}`;
    this.notePeerFailure(connection.node);
    if (!this.closed) this.log.warn('forwarding connection lost: replaying its requests on the next in-sync peer', { peer: connection.node, reason, replayed });
    this.pump();
  }

  /** Leaves the current peer on purpose (nothing in flight on it). */
  private dropConnection(): void {
    const connection = this.connection;
    if (!connection) return;
    assert(connection.inFlight.size === 0, 'a forwarding connection is left with requests in flight');
    this.connection = undefined;
    this.switchAway = false;
    void connection.client.disconnect().catch(() => undefined);
  }

  // ---- deadlines -------------------------------------------------------------------------------

  private checkDeadlines(): void {
    if (this.closed || (this.pending.size === 0 && this.waiting.length === 0)) return;
    const nowMs = performance.now();
    const expired: Request[] = [];
    for (const request of [...this.pending.values(), ...this.waiting]) if (request.deadlineMs <= nowMs) expired.push(request);
    if (expired.length === 0) return;
    // A request still in flight past its deadline: the peer hangs. Its connection goes (what else
    // was in flight there is replayed elsewhere, or fails here too if it is as old).
    const stuck = this.connection && expired.some((request) => request.sentGeneration === this.connection!.generation);
    const reason = this.noPeerSinceMs !== undefined ? 'no in-sync peer could be reached' : (expired[0]!.lastError ?? this.lastError ?? 'the peer did not answer');
    const error = new MirrorsanError('NBD_EIO', `volume ${this.name} (diskless): no in-sync peer answered within ${this.tuning.waitMaxMs} ms: ${reason}`);
    for (const request of expired) {
      this.pending.delete(request.seq);
      const index = this.waiting.indexOf(request);
      if (index !== -1) this.waiting.splice(index, 1);
      this.settle(request, error);
    }
    this.counters.failedRequests += expired.length;
    this.log.error('forwarded requests failed: no in-sync peer answered in time', { failed: expired.length, waitMaxMs: this.tuning.waitMaxMs, reason });
    if (stuck && this.connection) {
      const connection = this.connection;
      this.connectionLost(connection, `a request got no answer within ${this.tuning.waitMaxMs} ms`);
    }
    this.afterProgress();
  }
}

function resolveTuning(options: ForwardingDeviceOptions): Readonly<ForwardTuning> {
  const tuning: ForwardTuning = {
    waitMaxMs: options.waitMaxMs ?? FORWARD_DEFAULTS.waitMaxMs,
    connectTimeoutMs: options.connectTimeoutMs ?? FORWARD_DEFAULTS.connectTimeoutMs,
    retryDelayInitialMs: options.retryDelayInitialMs ?? FORWARD_DEFAULTS.retryDelayInitialMs,
    retryDelayMaxMs: options.retryDelayMaxMs ?? FORWARD_DEFAULTS.retryDelayMaxMs,
    requestsPendingMax: options.requestsPendingMax ?? FORWARD_DEFAULTS.requestsPendingMax,
    requestsWaitingMax: options.requestsWaitingMax ?? FORWARD_DEFAULTS.requestsWaitingMax,
  };
  for (const [key, value] of Object.entries(tuning)) {
    if (!Number.isSafeInteger(value) || value <= 0) throw new MirrorsanError('CONFIG_INVALID', `forwarding option ${key} must be a positive integer, got ${value}`);
  }
  if (tuning.retryDelayMaxMs < tuning.retryDelayInitialMs) throw new MirrorsanError('CONFIG_INVALID', 'forwarding retryDelayMaxMs is below retryDelayInitialMs');
  if (options.name === '') throw new MirrorsanError('CONFIG_INVALID', 'forwarding needs a volume name');
  return Object.freeze(tuning);
}
