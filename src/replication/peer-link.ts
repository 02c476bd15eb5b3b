// Peer links: the I/O shell around the wire codec (codec.ts) and the handshake (auth.ts).
//
// - PeerListener listens on the node's peer endpoint (which may be an address of a dedicated
//   replication interface, DESIGN.md §1 A3), authenticates each connection and hands the
//   authenticated ones to its owner. Garbage, a wrong HMAC, an unknown node id, another
//   cluster or protocol version are refused with a log line naming the remote address and the
//   reason, and nothing such a connection sent is delivered.
// - PeerLink dials one peer, authenticates, and keeps the connection up: reconnects with
//   jittered exponential backoff, and reports `up`/`down`.
// - Both ends of an authenticated connection are a PeerConnection: `send` is pipelined (no
//   waiting for replies) and batched (every frame queued in one event-loop turn leaves in one
//   vectored write: cork now, uncork in the check phase; SYNC and SYNC_ACK, which a durable
//   write waits for, uncork at the end of the current run instead), with a byte cap on the send queue
//   and a drain signal; heartbeats (PING/PONG) every `heartbeatIntervalMs`, and a connection
//   on which nothing arrived for `deadAfterMs` is declared dead and closed; frames whose epoch
//   is stale for their volume (the owner's `isStale`) are answered with
//   ERROR(REPL_EPOCH_STALE) and dropped, never delivered (invariant I2); a stale stream frame
//   (WRITE, SYNC, CHECKPOINT) also closes the connection, so that its source repositions.
//
// Memory per connection is bounded: before authentication the decoder accepts only HELLO and
// AUTH (a few hundred bytes each); after it, one frame of at most FRAME_BODY_MAX_BYTES is
// buffered, and the send queue refuses new frames past `sendQueueMaxBytes`.
import net from 'node:net';
import type { Server, Socket } from 'node:net';
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import type { ErrorCode } from '../errors.js';
import type { Logger } from '../util/log.js';
import { DialerHandshake, ListenerHandshake } from './auth.js';
import type { PeerIdentity, PeerRole } from './auth.js';
import { FRAME_BODY_MAX_BYTES, FrameDecoder, encodeFrame, frameLengthBytes, isVolumeMessage } from './codec.js';
import type { AuthMessage, HelloMessage, MessageType, PingMessage, PongMessage, ReplicationMessage, VolumeMessage } from './codec.js';

/** What a link delivers to its owner: everything but the handshake and heartbeat frames. */
export type PeerMessage = Exclude<ReplicationMessage, HelloMessage | AuthMessage | PingMessage | PongMessage>;

/** True when `epoch` is older than this node's current epoch for `volume`. */
export type StaleEpochCheck = (volume: string, epoch: number) => boolean;

export type PeerLinkState = 'up' | 'down';

export interface PeerTimings {
  /** A connection that has not authenticated within this is closed. */
  handshakeTimeoutMs: number;
  /** PING period on an authenticated connection (sub-second: DESIGN.md §5). */
  heartbeatIntervalMs: number;
  /** A connection on which no byte arrived for this long is declared dead and closed. */
  deadAfterMs: number;
  /** First reconnect delay; doubled per failed attempt up to reconnectMaxMs (then jittered). */
  reconnectMinMs: number;
  reconnectMaxMs: number;
}

export interface PeerLimits {
  /**
   * `send` refuses (returns false) while this many bytes wait in the socket's queue; the queue
   * therefore never holds more than this plus one frame. At least 64 KiB.
   */
  sendQueueMaxBytes: number;
  /** Connections accepted but not yet authenticated, at once; more are refused (REPL_BUSY). */
  unauthenticatedMax: number;
  /** Largest frame body accepted after authentication (at most FRAME_BODY_MAX_BYTES). */
  bodyMaxBytes: number;
}

export const DEFAULT_PEER_TIMINGS: Readonly<PeerTimings> = Object.freeze({
  handshakeTimeoutMs: 5000,
  heartbeatIntervalMs: 200,
  deadAfterMs: 1500,
  reconnectMinMs: 50,
  reconnectMaxMs: 2000,
});

export const DEFAULT_PEER_LIMITS: Readonly<PeerLimits> = Object.freeze({
  sendQueueMaxBytes: 64 * 1024 * 1024,
  unauthenticatedMax: 32,
  bodyMaxBytes: FRAME_BODY_MAX_BYTES,
});

function invalid(message: string): never {
  throw new MirrorsanError('CONFIG_INVALID', message);
}

function positiveInteger(value: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < 1) invalid(`${what} must be a positive integer, got ${value}`);
}

/** Validated once, then frozen (config errors are CONFIG_INVALID, not crashes later). */
export function resolvePeerTimings(partial: Partial<PeerTimings> = {}): Readonly<PeerTimings> {
  const timings = { ...DEFAULT_PEER_TIMINGS, ...partial };
  for (const [key, value] of Object.entries(timings)) positiveInteger(value, key);
  if (timings.deadAfterMs <= timings.heartbeatIntervalMs) invalid('deadAfterMs must be longer than heartbeatIntervalMs');
  if (timings.reconnectMaxMs < timings.reconnectMinMs) invalid('reconnectMaxMs must be at least reconnectMinMs');
  return Object.freeze(timings);
}

export function resolvePeerLimits(partial: Partial<PeerLimits> = {}): Readonly<PeerLimits> {
  const limits = { ...DEFAULT_PEER_LIMITS, ...partial };
  for (const [key, value] of Object.entries(limits)) positiveInteger(value, key);
  if (limits.sendQueueMaxBytes < 64 * 1024) invalid('sendQueueMaxBytes must be at least 64 KiB');
  if (limits.bodyMaxBytes > FRAME_BODY_MAX_BYTES) invalid(`bodyMaxBytes must be at most ${FRAME_BODY_MAX_BYTES}`);
  return Object.freeze(limits);
}

/** Frames an authenticated connection reads; HELLO and AUTH again would be a protocol violation. */
const DATA_PHASE_TYPES: readonly MessageType[] = [
  'WRITE', 'ACK', 'SYNC', 'SYNC_ACK', 'CHECKPOINT', 'CHECKPOINT_ACK',
  'GRANT_REQUEST', 'GRANT', 'REVOKE', 'RELEASE', 'REGION_REQUEST', 'REGION_REPLY', 'PING', 'PONG', 'ERROR',
];

/** Stale (volume, epoch) pairs logged at warn per connection; later ones at debug. */
const STALE_LOG_KEYS_MAX = 256;

function monotonicMs(): number {
  return performance.now();
}

export interface PeerConnectionHandlers {
  /** A data frame, in arrival order. A WRITE payload may be a view of a socket chunk. */
  onMessage(message: PeerMessage): void;
  /** The connection ended (by either side, or declared dead); called once. */
  onClose?(reason: string, code: ErrorCode): void;
  /** The send queue emptied after `send` returned false. */
  onDrain?(): void;
}

export interface PeerConnectionStats {
  framesSent: number;
  bytesSent: number;
  /** Vectored writes issued: frames sent in one event-loop turn share one. */
  writeBatches: number;
  framesReceived: number;
  bytesReceived: number;
  staleFramesRefused: number;
  /** Round trip of the last PING, or -1 before the first PONG. */
  lastRttMs: number;
}

/** What a PeerConnection needs from whoever created it (the listener or a link). */
interface ConnectionHost {
  role: PeerRole;
  logger: Logger;
  timings: Readonly<PeerTimings>;
  limits: Readonly<PeerLimits>;
  isStale: StaleEpochCheck;
  handshake: DialerHandshake | ListenerHandshake;
  /** Called once authenticated, before any data frame is delivered; returns the handlers. */
  authenticated(connection: PeerConnection): PeerConnectionHandlers;
  /** Called once when the connection ends, whatever the phase. */
  ended(connection: PeerConnection, phase: 'handshake' | 'open', reason: string, code: ErrorCode): void;
}

type ConnectionPhase = 'handshake' | 'open' | 'closed';

/** One TCP connection between two nodes, from either end. Created by PeerListener and PeerLink. */
export class PeerConnection {
  /** "address:port" of the other end, for logs. */
  readonly remoteAddress: string;
  readonly role: PeerRole;
  readonly stats: PeerConnectionStats = {
    framesSent: 0,
    bytesSent: 0,
    writeBatches: 0,
    framesReceived: 0,
    bytesReceived: 0,
    staleFramesRefused: 0,
    lastRttMs: -1,
  };

  private readonly socket: Socket;
  private readonly host: ConnectionHost;
  private readonly log: Logger;
  private readonly decoder: FrameDecoder;
  private phase: ConnectionPhase = 'handshake';
  private peerIdValue: string | undefined = undefined;
  private handlers: PeerConnectionHandlers | undefined = undefined;
  private corked = false;
  private wantDrain = false;
  private readingPaused = false;
  private lastReceivedAtMs = monotonicMs();
  private socketError: string | undefined = undefined;
  private handshakeTimer: NodeJS.Timeout | undefined = undefined;
  private heartbeatTimer: NodeJS.Timeout | undefined = undefined;
  private readonly staleLogged = new Set<string>();
  private readonly closedPromise: Promise<void>;

  private readonly onData = (chunk: Buffer): void => {
    if (this.phase === 'closed') return;
    this.stats.bytesReceived += chunk.length;
    this.lastReceivedAtMs = monotonicMs();
    this.decoder.push(chunk);
    this.pump();
  };
  private readonly onSocketDrain = (): void => {
    if (this.phase !== 'open' || !this.wantDrain) return;
    this.wantDrain = false;
    this.handlers?.onDrain?.();
  };
  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    this.stats.writeBatches++;
    this.socket.uncork();
  };
  /** A microtask uncork is queued (see send). */
  private urgentUncork = false;
  private readonly uncorkUrgent = (): void => {
    this.urgentUncork = false;
    this.uncork();
  };

  /** @internal Use PeerListener or PeerLink. */
  constructor(socket: Socket, remoteAddress: string, host: ConnectionHost) {
    this.socket = socket;
    this.remoteAddress = remoteAddress;
    this.host = host;
    this.role = host.role;
    this.log = host.logger;
    // Bounded before authentication by acceptOnly (HELLO/AUTH bodies are tiny), after it by bodyMaxBytes.
    this.decoder = new FrameDecoder({ bodyMaxBytes: host.limits.bodyMaxBytes });
    this.decoder.acceptOnly(['HELLO']);
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  /** The authenticated node id of the other end. */
  get peerId(): string {
    assert(this.peerIdValue !== undefined, 'peerId read before authentication');
    return this.peerIdValue;
  }

  get isOpen(): boolean {
    return this.phase === 'open';
  }

  /** Bytes queued in the socket and not yet handed to the kernel. */
  get queuedBytes(): number {
    return this.socket.writableLength;
  }

  /** @internal */
  start(): void {
    this.socket.setNoDelay(true);
    this.socket.on('data', this.onData);
    this.socket.on('drain', this.onSocketDrain);
    this.socket.on('error', (error: Error) => {
      this.socketError = error.message;
    });
    this.socket.on('close', () => {
      this.end('REPL_PEER_CLOSED', this.socketError ?? `peer closed the connection${this.phase === 'handshake' ? ' during the handshake' : ''}`, false);
    });
    this.handshakeTimer = setTimeout(() => {
      this.fail('REPL_HANDSHAKE_TIMEOUT', `handshake not finished within ${this.host.timings.handshakeTimeoutMs} ms`);
    }, this.host.timings.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    const handshake = this.host.handshake;
    // The dialer speaks first; writes before 'connect' are queued by the socket.
    if (handshake instanceof DialerHandshake) this.writeFrame(handshake.start());
  }

  /**
   * Queues `message` (pipelined: no waiting for a reply). Returns false, and queues nothing,
   * when the connection is not open or the send queue is at its cap; then `onDrain` follows
   * once the queue has emptied (if the connection is still open).
   */
  send(message: PeerMessage): boolean {
    if (this.phase !== 'open') return false;
    if (this.queueFull()) {
      this.wantDrain = true;
      return false;
    }
    this.writeFrame(message);
    // A durable write (FLUSH, FUA) waits for SYNC and SYNC_ACK: they leave, with whatever is
    // corked ahead of them, once the current synchronous run and its microtasks are done,
    // instead of after the whole event-loop turn (on a node doing local I/O for the same
    // write, that was a fifth of the FUA latency). Streams of WRITEs still batch per turn.
    if ((message.type === 'SYNC' || message.type === 'SYNC_ACK') && !this.urgentUncork) {
      this.urgentUncork = true;
      queueMicrotask(this.uncorkUrgent);
    }
    return true;
  }

  /** Stops delivering messages (the owner's memory is full); the peer then sees TCP backpressure. */
  pauseReading(): void {
    this.readingPaused = true;
    this.socket.pause();
  }

  resumeReading(): void {
    if (!this.readingPaused) return;
    this.readingPaused = false;
    // Nothing was read while paused: liveness restarts from now, not from before the pause.
    this.lastReceivedAtMs = monotonicMs();
    this.socket.resume();
    // Frames already decoded-ready are delivered outside the caller's stack.
    queueMicrotask(() => this.pump());
  }

  /** Closes the connection (queued frames of an open connection are still flushed). */
  close(reason = 'closed by this node'): void {
    this.end('REPL_PEER_CLOSED', reason, true);
  }

  /** Resolves once the socket is closed. */
  whenClosed(): Promise<void> {
    return this.closedPromise;
  }

  // -------------------------------------------------------------------------------------------
  // Reading

  private pump(): void {
    while (this.phase !== 'closed' && !(this.phase === 'open' && this.readingPaused)) {
      let message: ReplicationMessage | undefined;
      try {
        message = this.decoder.next();
      } catch (error) {
        if (!isMirrorsanError(error)) throw error;
        this.fail(error.code, error.message);
        return;
      }
      if (message === undefined) return;
      if (this.phase === 'handshake') this.handshakeStep(message);
      else this.receive(message);
    }
  }

  private handshakeStep(message: ReplicationMessage): void {
    const step = this.host.handshake.receive(message);
    if (step.kind === 'refused') {
      this.fail(step.code, step.reason);
      return;
    }
    for (const reply of step.send) this.writeFrame(reply);
    if (step.kind === 'continue') {
      this.decoder.acceptOnly(['AUTH']);
      return;
    }
    clearTimeout(this.handshakeTimer);
    this.peerIdValue = step.peerId;
    this.phase = 'open';
    this.decoder.acceptOnly(DATA_PHASE_TYPES);
    this.lastReceivedAtMs = monotonicMs();
    this.heartbeatTimer = setInterval(() => this.heartbeat(), this.host.timings.heartbeatIntervalMs);
    this.heartbeatTimer.unref();
    const handlers = this.host.authenticated(this);
    if (this.phase === 'open') this.handlers = handlers;
  }

  private receive(message: ReplicationMessage): void {
    this.stats.framesReceived++;
    switch (message.type) {
      case 'PING':
        this.writeInternal({ type: 'PONG', timestampMs: message.timestampMs });
        return;
      case 'PONG': {
        const rttMs = Math.floor(monotonicMs()) - message.timestampMs;
        if (rttMs >= 0) this.stats.lastRttMs = rttMs;
        return;
      }
      case 'HELLO':
      case 'AUTH':
        throw new Error(`assertion failed: ${message.type} delivered after authentication`);
    }
    if (isVolumeMessage(message) && this.host.isStale(message.volume, message.epoch)) {
      this.refuseStale(message);
      return;
    }
    assert(this.handlers !== undefined, 'data frame before the owner attached its handlers');
    this.handlers.onMessage(message);
  }

  /** [I2] A frame from an older epoch is never applied: answer with an ERROR and drop it. */
  private refuseStale(message: VolumeMessage): void {
    this.stats.staleFramesRefused++;
    const key = `${message.volume}\u0000${message.epoch}`;
    const fields = { remote: this.remoteAddress, peer: this.peerIdValue, code: 'REPL_EPOCH_STALE', type: message.type, volume: message.volume, epoch: message.epoch };
    if (!this.staleLogged.has(key) && this.staleLogged.size < STALE_LOG_KEYS_MAX) {
      this.staleLogged.add(key);
      this.log.warn('refused frame with a stale epoch', fields);
    } else {
      this.log.debug('refused frame with a stale epoch', fields);
    }
    this.writeInternal({ type: 'ERROR', code: 'REPL_EPOCH_STALE', message: `${message.type} for volume ${message.volume} at epoch ${message.epoch} refused: stale epoch` });
    if (message.type === 'WRITE' || message.type === 'SYNC' || message.type === 'CHECKPOINT') {
      // The source's stream now has a hole here, and nothing else tells it: its later frames
      // would be refused as a gap, or (at the new epoch) never be resent, and its writes hang
      // (found by test/attach-fencing.test.ts: a target that adopted an epoch before the
      // writer did). Closing the connection makes the source reposition from the ACK of the
      // next link-up and resend, as the target engine's resyncNeeded does for the same case.
      this.log.warn('peer connection closed', { remote: this.remoteAddress, peer: this.peerIdValue, code: 'REPL_EPOCH_STALE', reason: 'a stream frame of an older epoch was refused: the source must reposition' });
      this.end('REPL_EPOCH_STALE', `${message.type} of volume ${message.volume} at the older epoch ${message.epoch} refused`, true);
    }
  }

  private heartbeat(): void {
    if (this.phase !== 'open') return;
    const now = monotonicMs();
    const silentMs = now - this.lastReceivedAtMs;
    // While our owner paused reading, silence is ours, not the peer's.
    if (!this.readingPaused && silentMs > this.host.timings.deadAfterMs) {
      this.fail('REPL_PEER_CLOSED', `no frame received for ${Math.round(silentMs)} ms (dead after ${this.host.timings.deadAfterMs} ms)`);
      return;
    }
    this.writeInternal({ type: 'PING', timestampMs: Math.floor(now) });
  }

  // -------------------------------------------------------------------------------------------
  // Writing

  private queueFull(): boolean {
    // Never below the socket's own high-water mark, so that a refusal always has a 'drain' to end it.
    return this.socket.writableLength >= Math.max(this.host.limits.sendQueueMaxBytes, this.socket.writableHighWaterMark);
  }

  /** PONG, PING and ERROR replies: dropped when the queue is full (the peer is not reading anyway). */
  private writeInternal(message: ReplicationMessage): void {
    if (this.phase !== 'open' || this.queueFull()) return;
    this.writeFrame(message);
  }

  /** Everything queued in one event-loop turn leaves in one vectored write. */
  private writeFrame(message: ReplicationMessage): void {
    if (this.socket.destroyed || !this.socket.writable) return;
    const parts = encodeFrame(message);
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    for (const part of parts) this.socket.write(part);
    this.stats.framesSent++;
    this.stats.bytesSent += frameLengthBytes(parts);
  }

  // -------------------------------------------------------------------------------------------
  // Closing

  /** A refusal or a broken connection: logged with the reason, the socket destroyed at once. */
  private fail(code: ErrorCode, reason: string): void {
    if (this.phase === 'closed') return;
    const fields = { remote: this.remoteAddress, role: this.role, peer: this.peerIdValue ?? this.claimedPeer(), code, reason };
    if (this.phase === 'handshake') this.log.warn('peer connection refused', fields);
    else this.log.warn('peer connection closed', fields);
    this.end(code, reason, false);
  }

  private claimedPeer(): string | undefined {
    const handshake = this.host.handshake;
    return handshake instanceof ListenerHandshake ? handshake.claimedPeerId : undefined;
  }

  private end(code: ErrorCode, reason: string, graceful: boolean): void {
    if (this.phase === 'closed') return;
    const phase = this.phase;
    this.phase = 'closed';
    clearTimeout(this.handshakeTimer);
    clearInterval(this.heartbeatTimer);
    this.decoder.acceptOnly([]);
    // Only an open connection has frames worth flushing; a handshake is cut at once.
    if (graceful && phase === 'open' && !this.socket.destroyed) {
      this.uncork();
      this.socket.end();
      // A peer that does not finish its side must not hold the socket forever.
      setTimeout(() => this.socket.destroy(), 1000).unref();
    } else {
      this.corked = false;
      this.socket.destroy();
    }
    const handlers = this.handlers;
    this.handlers = undefined;
    if (phase === 'open') handlers?.onClose?.(reason, code);
    this.host.ended(this, phase, reason, code);
  }
}

// =============================================================================================
// Listener

export interface PeerListenerOptions {
  identity: PeerIdentity;
  /** The node's peer endpoint; host may be the address of a dedicated replication interface. */
  endpoint: { host: string; port: number };
  /** Whether `nodeId` may connect (a member of the cluster, not this node). */
  isKnownPeer: (nodeId: string) => boolean;
  /**
   * An authenticated connection; return its handlers. Called synchronously, before any of its
   * data frames is delivered. A newer connection from the same node closes the older one.
   */
  onConnection: (connection: PeerConnection) => PeerConnectionHandlers;
  isStale?: StaleEpochCheck;
  logger: Logger;
  timings?: Partial<PeerTimings>;
  limits?: Partial<PeerLimits>;
}

export class PeerListener {
  private readonly options: PeerListenerOptions;
  private readonly timings: Readonly<PeerTimings>;
  private readonly limits: Readonly<PeerLimits>;
  private readonly log: Logger;
  private readonly server: Server;
  private readonly unauthenticated = new Set<PeerConnection>();
  private readonly byPeer = new Map<string, PeerConnection>();
  private readonly all = new Set<PeerConnection>();
  private closing = false;

  constructor(options: PeerListenerOptions) {
    this.options = options;
    this.timings = resolvePeerTimings(options.timings);
    this.limits = resolvePeerLimits(options.limits);
    this.log = options.logger;
    this.server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
  }

  /** Starts listening; resolves with the bound endpoint (port 0 picks a free one). */
  listen(): Promise<{ host: string; port: number }> {
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(new MirrorsanError('CONFIG_INVALID', `cannot listen on peer endpoint ${this.options.endpoint.host}:${this.options.endpoint.port}: ${error.message}`, { cause: error }));
      this.server.once('error', onError);
      this.server.listen(this.options.endpoint.port, this.options.endpoint.host, () => {
        this.server.off('error', onError);
        this.server.on('error', (error) => this.log.error('peer listener error', { error: error.message }));
        const endpoint = this.endpoint;
        this.log.info('peer listener ready', { host: endpoint.host, port: endpoint.port });
        resolve(endpoint);
      });
    });
  }

  get endpoint(): { host: string; port: number } {
    const address = this.server.address();
    assert(address !== null && typeof address === 'object', 'peer listener is not listening on TCP');
    return { host: address.address, port: address.port };
  }

  /** The current authenticated connection from `peerId`, if any. */
  connectionFor(peerId: string): PeerConnection | undefined {
    return this.byPeer.get(peerId);
  }

  get unauthenticatedCount(): number {
    return this.unauthenticated.size;
  }

  /** Stops accepting and closes every connection. */
  async close(): Promise<void> {
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    const connections = [...this.all];
    for (const connection of connections) connection.close('peer listener closing');
    await Promise.all(connections.map((c) => c.whenClosed()));
    await closed;
  }

  private accept(socket: Socket): void {
    const remote = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`;
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.unauthenticated.size >= this.limits.unauthenticatedMax) {
      this.log.warn('peer connection refused', { remote, role: 'listener', code: 'REPL_BUSY', reason: `${this.unauthenticated.size} connections already authenticating (limit ${this.limits.unauthenticatedMax})` });
      socket.destroy();
      return;
    }
    const connection = new PeerConnection(socket, remote, {
      role: 'listener',
      logger: this.log,
      timings: this.timings,
      limits: this.limits,
      isStale: this.options.isStale ?? (() => false),
      handshake: new ListenerHandshake({ identity: this.options.identity, isKnownPeer: this.options.isKnownPeer }),
      authenticated: (c) => this.authenticated(c),
      ended: (c, phase, reason) => this.ended(c, phase, reason),
    });
    this.unauthenticated.add(connection);
    this.all.add(connection);
    connection.start();
  }

  private authenticated(connection: PeerConnection): PeerConnectionHandlers {
    this.unauthenticated.delete(connection);
    const peerId = connection.peerId;
    const previous = this.byPeer.get(peerId);
    this.byPeer.set(peerId, connection);
    this.log.info('peer connected', { remote: connection.remoteAddress, peer: peerId });
    // The peer reconnected: its old connection is half-open or about to be declared dead.
    previous?.close('replaced by a newer connection from the same node');
    return this.options.onConnection(connection);
  }

  private ended(connection: PeerConnection, phase: 'handshake' | 'open', reason: string): void {
    this.unauthenticated.delete(connection);
    this.all.delete(connection);
    if (phase === 'open') {
      if (this.byPeer.get(connection.peerId) === connection) this.byPeer.delete(connection.peerId);
      this.log.info('peer disconnected', { remote: connection.remoteAddress, peer: connection.peerId, reason });
    } else {
      this.log.debug('unauthenticated connection ended', { remote: connection.remoteAddress, reason });
    }
  }
}

// =============================================================================================
// Dialer

export interface PeerLinkOptions {
  identity: PeerIdentity;
  /** The node this link dials; its HELLO must carry this id. */
  peerId: string;
  endpoint: { host: string; port: number };
  /** Dial from this local address: the dedicated replication interface (unset: the OS picks). */
  localAddress?: string;
  logger: Logger;
  onMessage: (message: PeerMessage) => void;
  onState?: (state: PeerLinkState, reason: string) => void;
  /** The send queue emptied after `send` returned false. */
  onDrain?: () => void;
  isStale?: StaleEpochCheck;
  timings?: Partial<PeerTimings>;
  limits?: Partial<PeerLimits>;
  /** Randomness for backoff jitter (tests and the simulator pass a seeded one). */
  random?: () => number;
}

/** A dialled, authenticated, self-healing link to one peer. */
export class PeerLink {
  private readonly options: PeerLinkOptions;
  private readonly timings: Readonly<PeerTimings>;
  private readonly limits: Readonly<PeerLimits>;
  private readonly log: Logger;
  private readonly random: () => number;
  private connection: PeerConnection | undefined = undefined;
  private openConnection: PeerConnection | undefined = undefined;
  private reconnectTimer: NodeJS.Timeout | undefined = undefined;
  private failedAttempts = 0;
  private started = false;
  private closing = false;
  private readingPaused = false;
  private connectionsOpenedCount = 0;

  constructor(options: PeerLinkOptions) {
    this.options = options;
    this.timings = resolvePeerTimings(options.timings);
    this.limits = resolvePeerLimits(options.limits);
    this.log = options.logger;
    this.random = options.random ?? Math.random;
    assert(options.peerId !== options.identity.nodeId, 'a node does not dial itself');
  }

  get state(): PeerLinkState {
    return this.openConnection !== undefined ? 'up' : 'down';
  }

  /** Authenticated connections so far (1 after the first, 2 after one reconnect, ...). */
  get connectionsOpened(): number {
    return this.connectionsOpenedCount;
  }

  /** Statistics of the current connection (undefined while none is open). */
  get stats(): Readonly<PeerConnectionStats> | undefined {
    return this.openConnection?.stats;
  }

  start(): void {
    assert(!this.started, 'PeerLink.start called twice');
    this.started = true;
    this.dial();
  }

  /**
   * Queues `message` on the open connection. False (nothing queued) while the link is down or
   * its send queue is full; `onDrain` follows a full queue, `onState('up')` a down link.
   * Frames are never kept across connections: after a reconnect the owner resends from its log.
   */
  send(message: PeerMessage): boolean {
    return this.openConnection?.send(message) ?? false;
  }

  pauseReading(): void {
    this.readingPaused = true;
    this.openConnection?.pauseReading();
  }

  resumeReading(): void {
    this.readingPaused = false;
    this.openConnection?.resumeReading();
  }

  /**
   * Drops the open connection and dials again (the usual reconnect path): the peer's side then
   * re-announces its stream positions on the fresh connection. For an owner that waited too
   * long for such an announcement.
   */
  reconnect(reason: string): void {
    if (this.closing) return;
    this.connection?.close(`reconnecting: ${reason}`);
  }

  /**
   * The peer is evidently up (it just dialled us): a link waiting out its reconnect backoff
   * dials now instead (a restarted peer would otherwise wait up to reconnectMaxMs for the
   * link its stream positions and grants travel on).
   */
  dialNowIfWaiting(): void {
    if (this.closing || this.connection !== undefined || this.reconnectTimer === undefined) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.failedAttempts = 0;
    this.dial();
  }

  /** Closes the link for good. */
  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.reconnectTimer);
    const connection = this.connection;
    connection?.close('link closed by this node');
    await connection?.whenClosed();
  }

  private dial(): void {
    if (this.closing) return;
    const { host, port } = this.options.endpoint;
    const socket = net.connect({ host, port, localAddress: this.options.localAddress, noDelay: true });
    const connection = new PeerConnection(socket, `${host}:${port}`, {
      role: 'dialer',
      logger: this.log,
      timings: this.timings,
      limits: this.limits,
      isStale: this.options.isStale ?? (() => false),
      handshake: new DialerHandshake({ identity: this.options.identity, listenerId: this.options.peerId }),
      authenticated: (c) => this.authenticated(c),
      ended: (c, phase, reason) => this.ended(c, phase, reason),
    });
    this.connection = connection;
    connection.start();
  }

  private authenticated(connection: PeerConnection): PeerConnectionHandlers {
    this.openConnection = connection;
    this.failedAttempts = 0;
    this.connectionsOpenedCount++;
    if (this.readingPaused) connection.pauseReading();
    this.log.info('peer link up', { peer: this.options.peerId, remote: connection.remoteAddress });
    this.options.onState?.('up', 'authenticated');
    return {
      onMessage: (message) => this.options.onMessage(message),
      onDrain: () => this.options.onDrain?.(),
    };
  }

  private ended(connection: PeerConnection, phase: 'handshake' | 'open', reason: string): void {
    if (this.connection === connection) this.connection = undefined;
    if (phase === 'open') {
      this.openConnection = undefined;
      this.log.warn('peer link down', { peer: this.options.peerId, remote: connection.remoteAddress, reason });
      this.options.onState?.('down', reason);
    } else {
      this.failedAttempts++;
      // The first failure of a streak is news; the rest (every backoff period) is noise.
      const level = this.failedAttempts === 1 ? 'warn' : 'debug';
      this.log[level]('peer link attempt failed', { peer: this.options.peerId, remote: connection.remoteAddress, attempt: this.failedAttempts, reason });
    }
    if (this.closing) return;
    const exponent = Math.min(Math.max(this.failedAttempts - 1, 0), 20);
    const ceilingMs = Math.min(this.timings.reconnectMaxMs, this.timings.reconnectMinMs * 2 ** exponent);
    // Jitter in [ceiling/2, ceiling): nodes restarting together do not dial in lockstep.
    const delayMs = Math.max(1, Math.floor(ceilingMs / 2 + (this.random() * ceilingMs) / 2));
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      this.dial();
    }, delayMs);
  }
}
