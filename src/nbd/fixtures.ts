// Shared helpers for the NBD tests: a server on port 0 over MemoryDevices, a raw socket that
// speaks the handshake byte by byte (for malformed input), async child processes for the real
// clients, a throwaway TLS certificate, and an in-memory duplex pair. Not a test file itself.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readFile } from 'node:fs/promises';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Duplex } from 'node:stream';
import { createMemoryLogger, type Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from '../volume/device.js';
import { MemoryDevice, type MemoryDeviceOptions } from '../volume/memory-device.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import { ServerHandshakeParser, encodeClientFlags, encodeOptionRequest, type OptionReply } from './codec.js';
import { StaticExportRegistry } from './registry.js';
import { NbdServer, type NbdServerLimits, type NbdServerTlsOptions } from './server.js';

export interface TestServer {
  server: NbdServer;
  port: number;
  registry: StaticExportRegistry;
  logger: Logger & { lines: string[] };
  device: MemoryDevice;
  close(): Promise<void>;
}

/** A server on 127.0.0.1:0 with one MemoryDevice named `disk` (64 MiB by default) plus `extra` devices. */
export async function startServer(
  options: {
    device?: Partial<MemoryDeviceOptions>;
    extra?: BlockDevice[];
    tls?: NbdServerTlsOptions;
    limits?: Partial<NbdServerLimits>;
  } = {},
): Promise<TestServer> {
  const device = new MemoryDevice({ name: 'disk', description: 'test disk', sizeBytes: 64 << 20, ...options.device });
  const registry = new StaticExportRegistry([device, ...(options.extra ?? [])]);
  const logger = createMemoryLogger();
  const server = new NbdServer({
    registry,
    logger,
    ...(options.tls === undefined ? {} : { tls: options.tls }),
    ...(options.limits === undefined ? {} : { limits: options.limits }),
  });
  const address = await server.listen({ port: 0, host: '127.0.0.1' });
  if (address.kind !== 'tcp') throw new Error('expected a TCP address');
  return { server, port: address.port, registry, logger, device, close: () => server.close({ graceMs: 2000 }) };
}

/** A socket that sends exactly the bytes a test wants and reads the server's handshake frames. */
export class RawConnection {
  /** The socket bytes go through: the TCP socket, or the TLS socket after upgrade(). */
  socket: net.Socket;
  readonly queue = new ChunkQueue();
  readonly parser = new ServerHandshakeParser(this.queue, { replyDataBytesMax: 1 << 20 });
  private waiter: (() => void) | undefined;
  private ended = false;
  private readonly onData = (chunk: Buffer): void => {
    this.queue.push(chunk);
    this.waiter?.();
  };

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', this.onData);
    socket.on('close', () => {
      this.ended = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }

  /** After a STARTTLS ACK: runs the TLS handshake and continues over it. */
  async upgrade(ca: string): Promise<void> {
    this.socket.off('data', this.onData);
    const secure = tls.connect({ socket: this.socket, ca, servername: 'localhost' });
    secure.on('error', () => undefined);
    await once(secure, 'secureConnect');
    secure.on('data', this.onData);
    secure.on('close', () => {
      this.ended = true;
      this.waiter?.();
    });
    this.socket = secure;
  }

  static async connect(port: number): Promise<RawConnection> {
    const socket = net.connect({ port, host: '127.0.0.1' });
    socket.setNoDelay(true);
    await once(socket, 'connect');
    return new RawConnection(socket);
  }

  /** Waits until `parse` returns a value; rejects if the server closes first or on timeout. */
  async read<T>(parse: () => T | undefined, timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = parse();
      if (value !== undefined) return value;
      if (this.ended) throw new Error('server closed the connection');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for the server');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }

  /** Reads `n` raw bytes. */
  bytes(n: number, timeoutMs = 5000): Promise<Buffer> {
    return this.read(() => (this.queue.length >= n ? this.queue.take(n) : undefined), timeoutMs);
  }

  /** Reads the greeting and answers with `clientFlags` (default: fixed newstyle + no zeroes). */
  async greet(clientFlags = 3): Promise<number> {
    const { handshakeFlags } = await this.read(() => this.parser.greeting());
    this.socket.write(encodeClientFlags(clientFlags));
    return handshakeFlags;
  }

  send(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  option(option: number, data?: Buffer): void {
    this.socket.write(encodeOptionRequest(option, data));
  }

  reply(timeoutMs = 5000): Promise<OptionReply> {
    return this.read(() => this.parser.optionReply(), timeoutMs);
  }

  /** Sends an option and collects replies up to the final ACK or error. */
  async exchange(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.option(option, data);
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.reply();
      replies.push(reply);
      if (reply.type === 1 || (reply.type & 0x80000000) !== 0) return replies;
    }
  }

  /** Resolves true once the server has closed the connection, false on timeout. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    try {
      await this.read(() => undefined, timeoutMs);
    } catch (error) {
      return (error as Error).message === 'server closed the connection';
    }
    return false;
  }

  get closed(): boolean {
    return this.ended;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export interface ProcessResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a child process without blocking the event loop (the server under test is in-process). */
export function run(command: string, args: string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env: options.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${command} timed out; stderr: ${stderr}`));
    }, options.timeoutMs ?? 30_000);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** A self-signed certificate for CN=localhost in a fresh temporary directory. */
export async function makeCertificate(): Promise<{ dir: string; cert: string; key: string; certPath: string; keyPath: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'mirrorsan-nbd-tls-'));
  const certPath = join(dir, 'cert.pem');
  const keyPath = join(dir, 'key.pem');
  const result = await run('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-days', '2', '-keyout', keyPath, '-out', certPath,
  ]);
  if (result.code !== 0) throw new Error(`openssl failed: ${result.stderr}`);
  return { dir, cert: await readFile(certPath, 'utf8'), key: await readFile(keyPath, 'utf8'), certPath, keyPath };
}

/** Two connected in-memory streams (Node 20 has no stream.duplexPair). */
export function duplexPair(): [Duplex, Duplex] {
  const sides: Duplex[] = [];
  for (let i = 0; i < 2; i++) {
    const index = i;
    sides.push(
      new Duplex({
        read() {},
        write(chunk: Buffer, _encoding, callback) {
          sides[1 - index]!.push(chunk);
          callback();
        },
        final(callback) {
          sides[1 - index]!.push(null);
          callback();
        },
      }),
    );
  }
  return [sides[0]!, sides[1]!];
}

/** A device that delegates to another and lets a test delay or fail individual calls. */
export class HookedDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly inner: BlockDevice;
  /** Resolves when a read may proceed (default: at once). */
  readGate: (offset: number, length: number) => Promise<void> = async () => undefined;
  /** Throws to fail a call. */
  failWith: ((operation: string) => unknown) | undefined = undefined;
  geometryOverride: Partial<DeviceGeometry> = {};

  constructor(inner: BlockDevice, name = inner.name) {
    this.inner = inner;
    this.name = name;
    this.description = inner.description;
  }

  geometry(): DeviceGeometry {
    return { ...this.inner.geometry(), ...this.geometryOverride };
  }
  private check(operation: string): void {
    const error = this.failWith?.(operation);
    if (error !== undefined) throw error;
  }
  async read(offset: number, length: number): Promise<ReadPiece[]> {
    await this.readGate(offset, length);
    this.check('read');
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    this.check('write');
    return this.inner.write(offset, data, options);
  }
  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    this.check('writeZeroes');
    return this.inner.writeZeroes(offset, length, options);
  }
  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    this.check('trim');
    return this.inner.trim(offset, length, options);
  }
  async flush(): Promise<void> {
    this.check('flush');
    return this.inner.flush();
  }
  async cache(offset: number, length: number): Promise<void> {
    this.check('cache');
    return this.inner.cache(offset, length);
  }
  blockStatus(offset: number, length: number): Extent[] {
    this.check('blockStatus');
    return this.inner.blockStatus(offset, length);
  }
}

/** Polls `condition` until it holds or `timeoutMs` passes. */
export async function eventually(condition: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Bytes that identify their own offset, so misplaced data shows up in comparisons. */
export function pattern(offset: number, length: number): Buffer {
  const buffer = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buffer[i] = ((offset + i) * 31 + ((offset + i) >>> 8)) & 0xff;
  return buffer;
}
