// The NBD server: accepts connections (TCP, unix socket, or any Duplex handed in), enforces
// the server-wide limits and keeps the counters. Each connection's protocol work happens in
// Connection (connection.ts); the wire format in codec.ts.
import * as net from 'node:net';
import type { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { MirrorsanError, assert } from '../errors.js';
import type { Logger } from '../util/log.js';
import type { ExportRegistry } from '../volume/device.js';
import { Connection, type ConnectionHost, type ConnectionLimits, type ConnectionStats } from './connection.js';

export interface NbdServerLimits extends ConnectionLimits {
  /** Option data longer than this closes the connection (default 64 KiB). */
  readonly optionDataBytesMax: number;
  /** Bytes of admitted requests plus queued reply bytes per connection before it stops reading (default 64 MiB). */
  readonly inflightBytesPerConnectionMax: number;
  /** Bytes of admitted requests over all connections before they stop reading (default 512 MiB). */
  readonly inflightBytesTotalMax: number;
  /** Requests in flight per connection before it stops reading (default 256). */
  readonly requestsInflightPerConnectionMax: number;
  /** Connections beyond this are closed as they arrive (default 4096). */
  readonly connectionsMax: number;
  /** A connection that has not entered transmission by then is closed (default 30 s). */
  readonly handshakeTimeoutMs: number;
}

export const NBD_SERVER_LIMITS_DEFAULT: NbdServerLimits = Object.freeze({
  optionDataBytesMax: 64 * 1024,
  inflightBytesPerConnectionMax: 64 * 1024 * 1024,
  inflightBytesTotalMax: 512 * 1024 * 1024,
  requestsInflightPerConnectionMax: 256,
  connectionsMax: 4096,
  handshakeTimeoutMs: 30_000,
});

export interface NbdServerTlsOptions {
  cert: string | Buffer;
  key: string | Buffer;
  /** true: FORCEDTLS (every option but STARTTLS/ABORT needs TLS); false: TLS at the client's choice. */
  required: boolean;
}

export interface NbdServerOptions {
  registry: ExportRegistry;
  logger: Logger;
  tls?: NbdServerTlsOptions;
  limits?: Partial<NbdServerLimits>;
}

export type NbdListenTarget = { port: number; host?: string; backlog?: number } | { path: string; backlog?: number };
export type NbdListenAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdServerStats {
  connectionsOpen: number;
  connectionsAccepted: number;
  /** Refused because connectionsMax was reached. */
  connectionsRefused: number;
  /** Requests answered (successfully or with an error). */
  requestsServed: number;
  /** Requests answered with an error. */
  requestErrors: number;
  /** Connections closed for breaking the protocol (bad magic, oversized option, timeout, ...). */
  protocolViolations: number;
  inflightBytesTotal: number;
  connections: ConnectionStats[];
}

/** Validates limits once; the result is frozen. */
export function resolveLimits(overrides: Partial<NbdServerLimits> = {}): NbdServerLimits {
  const limits = { ...NBD_SERVER_LIMITS_DEFAULT, ...overrides };
  for (const [key, value] of Object.entries(limits)) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new MirrorsanError('CONFIG_INVALID', `NBD server limit ${key} must be a positive integer, got ${value}`);
    }
  }
  return Object.freeze(limits);
}

export class NbdServer {
  private readonly host: ConnectionHost & { inflightBytesTotal: number };
  private readonly limits: NbdServerLimits;
  private readonly log: Logger;
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  /** Connections waiting for server-wide in-flight bytes to fall below the cap. */
  private readonly waitingForInflight = new Set<Connection>();
  private readonly whenEmpty: Array<() => void> = [];
  private nextConnectionId = 1;
  private closing = false;
  private readonly counters = { connectionsAccepted: 0, connectionsRefused: 0, requestsServed: 0, requestErrors: 0, protocolViolations: 0 };

  constructor(options: NbdServerOptions) {
    this.limits = resolveLimits(options.limits);
    this.log = options.logger.child('nbd');
    let tlsConfig: ConnectionHost['tls'];
    if (options.tls !== undefined) {
      try {
        const context = tls.createSecureContext({ cert: options.tls.cert, key: options.tls.key, minVersion: 'TLSv1.2' });
        tlsConfig = Object.freeze({ context, required: options.tls.required });
      } catch (error) {
        throw new MirrorsanError('NBD_TLS', `cannot load the TLS certificate or key: ${(error as Error).message}`, { cause: error });
      }
    }
    const server = this;
    this.host = {
      registry: options.registry,
      logger: this.log,
      limits: this.limits,
      tls: tlsConfig,
      inflightBytesTotal: 0,
      reserveInflight(bytes: number): void {
        this.inflightBytesTotal += bytes;
      },
      releaseInflight(bytes: number): void {
        this.inflightBytesTotal -= bytes;
        assert(this.inflightBytesTotal >= 0, 'in-flight byte count went negative');
        if (this.inflightBytesTotal < server.limits.inflightBytesTotalMax && server.waitingForInflight.size > 0) {
          const waiting = [...server.waitingForInflight];
          server.waitingForInflight.clear();
          for (const connection of waiting) connection.wake();
        }
      },
      waitForInflightTotal(connection: Connection): void {
        server.waitingForInflight.add(connection);
      },
      requestServed(errored: boolean): void {
        server.counters.requestsServed++;
        if (errored) server.counters.requestErrors++;
      },
      protocolViolation(): void {
        server.counters.protocolViolations++;
      },
      connectionClosed(connection: Connection): void {
        server.connections.delete(connection);
        server.waitingForInflight.delete(connection);
        if (server.connections.size === 0) for (const resolve of server.whenEmpty.splice(0)) resolve();
      },
    };
  }

  /** Listens on TCP or a unix socket; may be called more than once. */
  listen(target: NbdListenTarget): Promise<NbdListenAddress> {
    if (this.closing) return Promise.reject(new MirrorsanError('NBD_SHUTDOWN', 'the NBD server is closed'));
    const listener = net.createServer({ noDelay: true, keepAlive: true, keepAliveInitialDelay: 60_000 }, (socket) => {
      this.handleConnection(socket);
    });
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(new MirrorsanError('CONFIG_INVALID', `cannot listen: ${error.message}`, { cause: error }));
      listener.once('error', onError);
      const ready = (): void => {
        listener.off('error', onError);
        listener.on('error', (error) => this.log.error('listener error', { error: error.message }));
        this.listeners.push(listener);
        const address = listener.address();
        assert(address !== null, 'listening server without an address');
        const result: NbdListenAddress =
          typeof address === 'string' ? { kind: 'unix', path: address } : { kind: 'tcp', host: address.address, port: address.port };
        this.log.info('listening', result.kind === 'tcp' ? { host: result.host, port: result.port } : { path: result.path });
        resolve(result);
      };
      if ('path' in target) listener.listen({ path: target.path, backlog: target.backlog ?? 4096 }, ready);
      else listener.listen({ port: target.port, host: target.host, backlog: target.backlog ?? 4096 }, ready);
    });
  }

  /** Serves one connection over any Duplex (a TCP or unix socket, a TLS socket, an in-memory pair). */
  handleConnection(stream: Duplex, remoteAddress?: string): void {
    const socket = stream instanceof net.Socket ? stream : undefined;
    const remote = remoteAddress ?? (socket ? `${socket.remoteAddress ?? 'unix'}:${socket.remotePort ?? ''}` : 'memory');
    if (this.closing || this.connections.size >= this.limits.connectionsMax) {
      this.counters.connectionsRefused++;
      this.log.warn('connection refused', { remote, reason: this.closing ? 'server closing' : `more than ${this.limits.connectionsMax} connections` });
      stream.destroy();
      return;
    }
    if (socket !== undefined) socket.setNoDelay(true);
    this.counters.connectionsAccepted++;
    const connection = new Connection(this.nextConnectionId++, stream, remote, this.host);
    this.connections.add(connection);
    this.log.debug('connection accepted', { remote, id: connection.id });
    connection.start();
  }

  /**
   * Stops accepting, lets requests in flight finish and be answered, then ends every
   * connection. Connections still open after `graceMs` are destroyed.
   */
  async close(options: { graceMs?: number } = {}): Promise<void> {
    const graceMs = options.graceMs ?? 10_000;
    this.closing = true;
    const listenersClosed = this.listeners.splice(0).map(
      (listener) => new Promise<void>((resolve) => listener.close(() => resolve())),
    );
    for (const connection of [...this.connections]) connection.shutdown();
    if (this.connections.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      const drained = new Promise<void>((resolve) => this.whenEmpty.push(resolve));
      const timedOut = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, graceMs);
        timer.unref();
      });
      await Promise.race([drained, timedOut]);
      clearTimeout(timer);
      if (this.connections.size > 0) {
        this.log.warn('destroying connections still open after the grace period', { count: this.connections.size, graceMs });
        for (const connection of [...this.connections]) connection.destroy();
      }
    }
    await Promise.all(listenersClosed);
    this.log.info('closed', { served: this.counters.requestsServed });
  }

  stats(): NbdServerStats {
    return {
      connectionsOpen: this.connections.size,
      ...this.counters,
      inflightBytesTotal: this.host.inflightBytesTotal,
      connections: [...this.connections].map((connection) => connection.stats()),
    };
  }
}
