// A TypeScript NBD client: fixed newstyle handshake (GO, or EXPORT_NAME as a fallback),
// STARTTLS, structured replies or extended headers, `base:allocation`, and pipelined requests
// matched to their replies by cookie. Used by the tests, by applications, and by mirrorsan's
// own tools. The wire format lives in codec.ts.
import { once } from 'node:events';
import * as net from 'node:net';
import type { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { MirrorsanError, assert } from '../errors.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import {
  ReplyParser,
  ServerHandshakeParser,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetData,
  decodeOffsetHole,
  decodeRepInfo,
  decodeRepMetaContext,
  decodeRepServer,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeMetaContextData,
  encodeOptionRequest,
  encodeRequestHeader,
  type NbdReply,
  type OptionReply,
  type ReplyMode,
} from './codec.js';
import {
  CLIENT_FLAG,
  CMD,
  CMD_FLAG,
  HANDSHAKE_FLAG,
  INFO,
  OPT,
  REP,
  REP_ERR,
  REP_ERROR_BIT,
  REPLY_FLAG,
  REPLY_TYPE,
  REPLY_TYPE_ERROR_BIT,
  STATE,
  TRANSMISSION_FLAG,
  commandName,
  errnoName,
  optionName,
  replyTypeName,
} from './protocol.js';

export type NbdTarget = { host: string; port: number } | { path: string };

export interface NbdClientTlsOptions {
  /** Trusted CA certificate(s) for the server's certificate (default: the system store). */
  ca?: string | Buffer | Array<string | Buffer>;
  rejectUnauthorized?: boolean;
  servername?: string;
}

export interface NbdClientOptions {
  /** Export to open; '' (the default) is the server's default export. */
  exportName?: string;
  /** Negotiate NBD_OPT_STRUCTURED_REPLY (default true). */
  structuredReplies?: boolean;
  /** Negotiate NBD_OPT_EXTENDED_HEADERS first (default false); falls back if refused. */
  extendedHeaders?: boolean;
  /** Metadata contexts to select, e.g. ['base:allocation'] (needs structured replies). */
  metaContexts?: string[];
  /** Upgrade with STARTTLS before any other option; fail if the server refuses. */
  tls?: NbdClientTlsOptions;
  /** Enter transmission with the old NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  useExportName?: boolean;
  /** Client flags to send instead of the ones matching the greeting (0 = plain newstyle). */
  clientFlags?: number;
  /** Connect and handshake within this time (default 30 s). */
  timeoutMs?: number;
}

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** One extent of `base:allocation`. */
export interface BlockStatusExtent {
  offset: number;
  length: number;
  flags: number;
  hole: boolean;
  zero: boolean;
}

/** An error reply, or a broken connection. `nbdError` is the NBD errno (22 = EINVAL). */
export class NbdClientError extends MirrorsanError {
  readonly nbdError: number | undefined;
  /** For handshake failures: the option reply type (e.g. REP_ERR.UNKNOWN). */
  readonly optionReply: number | undefined;
  constructor(message: string, details: { nbdError?: number; optionReply?: number; cause?: unknown } = {}) {
    super('NBD_CLIENT', message, { cause: details.cause });
    this.name = 'NbdClientError';
    this.nbdError = details.nbdError;
    this.optionReply = details.optionReply;
  }
}

/** A request as sent by rawRequest(): anything the wire can carry, valid or not. */
export interface RawRequest {
  type: number;
  flags?: number;
  offset?: number | bigint;
  /** Header length field; defaults to the payload length. */
  length?: number | bigint;
  payload?: Buffer;
  /** Bytes of READ data that follow a successful simple reply (default: `length` for READ). */
  simpleReplyDataBytes?: number;
}

/** Everything that came back for one request. */
export interface RawReply {
  /** Simple reply error, or the first error chunk's error; 0 on success. */
  error: number;
  message: string;
  simple: boolean;
  /** READ data: a simple reply's, or (for a successful structured READ) the assembled chunks. */
  data: Buffer | undefined;
  chunks: Array<{ type: number; flags: number; offset: number; payload: Buffer }>;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** Bytes of data a successful simple reply carries. */
  simpleDataBytes: number;
  raw: boolean;
  reply: RawReply;
  /** Structured READ assembly. */
  readBuffer: Buffer | undefined;
  readBytesCovered: number;
  resolve(reply: RawReply): void;
  reject(error: Error): void;
}

const HANDSHAKE_REPLY_DATA_BYTES_MAX = 1 << 20;
/** Replies in a handshake loop (LIST, INFO, SET_META_CONTEXT) before we give up on a server. */
const OPTION_REPLIES_MAX = 1 << 16;

export class NbdClient {
  private stream: Duplex;
  private readonly queue = new ChunkQueue();
  private readonly handshakeParser = new ServerHandshakeParser(this.queue, { replyDataBytesMax: HANDSHAKE_REPLY_DATA_BYTES_MAX });
  private replyParser: ReplyParser | undefined = undefined;
  private waiter: { parse: () => unknown; resolve: (value: unknown) => void; reject: (error: Error) => void } | undefined;
  private readonly pending = new Map<bigint, Pending>();
  /** Resolved when no request is in flight (for disconnect). */
  private readonly whenIdle: Array<() => void> = [];
  private nextCookie = 1n;
  private failure: Error | undefined = undefined;
  /** Host name connected to, the default TLS server name. */
  private targetHost: string | undefined = undefined;
  private closedPromise: Promise<void>;

  // What the handshake established.
  private exportNameValue = '';
  private canonicalNameValue: string | undefined = undefined;
  private descriptionValue: string | undefined = undefined;
  private sizeBytesValue = 0;
  private transmissionFlagsValue = 0;
  private blockSizesValue: BlockSizes | undefined = undefined;
  private fixedNewstyle = false;
  private noZeroes = false;
  private tlsValue = false;
  private structuredValue = false;
  private extendedValue = false;
  private readonly metaContextIds = new Map<string, number>();

  private readonly onData = (chunk: Buffer): void => {
    this.queue.push(chunk);
    try {
      if (this.waiter !== undefined) this.tryWaiter();
      else if (this.replyParser !== undefined) this.readReplies();
    } catch (error) {
      this.fail(error instanceof Error ? error : new Error(String(error)));
    }
  };

  private constructor(stream: Duplex) {
    this.stream = stream;
    this.closedPromise = this.watch(stream);
    stream.on('data', this.onData);
  }

  /** Connects, negotiates and enters the transmission phase. */
  static async connect(target: NbdTarget, options: NbdClientOptions = {}): Promise<NbdClient> {
    const socket = await connectSocket(target, options.timeoutMs ?? 30_000);
    const client = new NbdClient(socket);
    if ('host' in target) client.targetHost = target.host;
    const timer = setTimeout(() => client.fail(new NbdClientError(`handshake timed out after ${options.timeoutMs ?? 30_000} ms`)), options.timeoutMs ?? 30_000);
    timer.unref();
    try {
      await client.handshake(options);
      return client;
    } catch (error) {
      client.stream.destroy();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Runs the handshake over an already connected stream (e.g. an in-memory pair). */
  static async over(stream: Duplex, options: NbdClientOptions = {}): Promise<NbdClient> {
    const client = new NbdClient(stream);
    try {
      await client.handshake(options);
      return client;
    } catch (error) {
      stream.destroy();
      throw error;
    }
  }

  /** [NBD: NBD_OPT_LIST] the server's exports, then ABORT. */
  static async listExports(
    target: NbdTarget,
    options: { tls?: NbdClientTlsOptions; timeoutMs?: number } = {},
  ): Promise<Array<{ name: string; description: string }>> {
    const client = new NbdClient(await connectSocket(target, options.timeoutMs ?? 30_000));
    if ('host' in target) client.targetHost = target.host;
    try {
      await client.greet(options.tls === undefined ? {} : { tls: options.tls });
      const { replies } = await client.option(OPT.LIST, undefined, REP.SERVER);
      const exports = replies.map((reply) => decodeRepServer(reply.data));
      await client.abort();
      return exports;
    } finally {
      client.stream.destroy();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // What the handshake established

  get exportName(): string {
    return this.exportNameValue;
  }
  /** The server's name for the export (INFO_NAME), when it sent one. */
  get canonicalName(): string | undefined {
    return this.canonicalNameValue;
  }
  get description(): string | undefined {
    return this.descriptionValue;
  }
  get sizeBytes(): number {
    return this.sizeBytesValue;
  }
  get transmissionFlags(): number {
    return this.transmissionFlagsValue;
  }
  /** INFO_BLOCK_SIZE, when the server sent it. */
  get blockSizes(): BlockSizes | undefined {
    return this.blockSizesValue;
  }
  get tls(): boolean {
    return this.tlsValue;
  }
  get structuredReplies(): boolean {
    return this.structuredValue;
  }
  get extendedHeaders(): boolean {
    return this.extendedValue;
  }
  /** Selected metadata contexts by name, with the ids the server gave them. */
  get metaContexts(): ReadonlyMap<string, number> {
    return this.metaContextIds;
  }
  get readOnly(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.READ_ONLY);
  }
  get canFlush(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_FUA);
  }
  get canTrim(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_TRIM);
  }
  get canWriteZeroes(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_FAST_ZERO);
  }
  get canDf(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_DF);
  }
  get canCache(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.SEND_CACHE);
  }
  get canMultiConn(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.CAN_MULTI_CONN);
  }
  get rotational(): boolean {
    return this.hasFlag(TRANSMISSION_FLAG.ROTATIONAL);
  }
  /** Requests sent and not yet answered. */
  get inflightRequests(): number {
    return this.pending.size;
  }

  private hasFlag(flag: number): boolean {
    return (this.transmissionFlagsValue & flag) !== 0;
  }

  // ---------------------------------------------------------------------------------------------
  // Commands (pipelined: call them concurrently)

  /** [NBD: NBD_CMD_READ] assembles structured chunks, holes included. */
  async read(offset: number, length: number, options: { df?: boolean; fua?: boolean } = {}): Promise<Buffer> {
    const flags = (options.df ? CMD_FLAG.DF : 0) | (options.fua ? CMD_FLAG.FUA : 0);
    const reply = await this.submit({ type: CMD.READ, flags, offset, length }, false);
    assert(reply.data !== undefined, 'a successful READ without data');
    return reply.data;
  }

  /** [NBD: NBD_CMD_WRITE] */
  async write(offset: number, data: Buffer, options: { fua?: boolean } = {}): Promise<void> {
    await this.submit({ type: CMD.WRITE, flags: options.fua ? CMD_FLAG.FUA : 0, offset, length: data.length, payload: data }, false);
  }

  /** [NBD: NBD_CMD_FLUSH] */
  async flush(): Promise<void> {
    await this.submit({ type: CMD.FLUSH, flags: 0, offset: 0, length: 0 }, false);
  }

  /** [NBD: NBD_CMD_TRIM] */
  async trim(offset: number, length: number, options: { fua?: boolean } = {}): Promise<void> {
    await this.submit({ type: CMD.TRIM, flags: options.fua ? CMD_FLAG.FUA : 0, offset, length }, false);
  }

  /** [NBD: NBD_CMD_WRITE_ZEROES] */
  async writeZeroes(offset: number, length: number, options: { noHole?: boolean; fastZero?: boolean; fua?: boolean } = {}): Promise<void> {
    const flags =
      (options.noHole ? CMD_FLAG.NO_HOLE : 0) | (options.fastZero ? CMD_FLAG.FAST_ZERO : 0) | (options.fua ? CMD_FLAG.FUA : 0);
    await this.submit({ type: CMD.WRITE_ZEROES, flags, offset, length }, false);
  }

  /** [NBD: NBD_CMD_CACHE] */
  async cache(offset: number, length: number): Promise<void> {
    await this.submit({ type: CMD.CACHE, flags: 0, offset, length }, false);
  }

  /** [NBD: NBD_CMD_BLOCK_STATUS] extents of `base:allocation` from `offset`. */
  async blockStatus(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<BlockStatusExtent[]> {
    const contextId = this.metaContextIds.get('base:allocation');
    if (contextId === undefined) throw new NbdClientError('base:allocation was not negotiated (pass metaContexts: ["base:allocation"])');
    const reply = await this.submit({ type: CMD.BLOCK_STATUS, flags: options.reqOne ? CMD_FLAG.REQ_ONE : 0, offset, length }, false);
    const extents: BlockStatusExtent[] = [];
    for (const chunk of reply.chunks) {
      if (chunk.type !== REPLY_TYPE.BLOCK_STATUS && chunk.type !== REPLY_TYPE.BLOCK_STATUS_EXT) continue;
      const status = decodeBlockStatus(chunk.type, chunk.payload);
      if (status.contextId !== contextId) continue;
      let position = offset;
      for (const extent of status.extents) {
        extents.push({
          offset: position,
          length: extent.lengthBytes,
          flags: extent.flags,
          hole: (extent.flags & STATE.HOLE) !== 0,
          zero: (extent.flags & STATE.ZERO) !== 0,
        });
        position += extent.lengthBytes;
      }
    }
    if (extents.length === 0) throw new NbdClientError('BLOCK_STATUS reply without a base:allocation chunk');
    return extents;
  }

  /**
   * Sends any request, valid or not, and resolves with what came back (errors included)
   * instead of rejecting: for tests of odd flags and commands.
   */
  rawRequest(request: RawRequest): Promise<RawReply> {
    const length = request.length ?? request.payload?.length ?? 0;
    return this.submit(
      {
        type: request.type,
        flags: request.flags ?? 0,
        offset: request.offset ?? 0,
        length,
        payload: request.payload,
        simpleDataBytes: request.simpleReplyDataBytes ?? (request.type === CMD.READ ? Number(length) : 0),
      },
      true,
    );
  }

  /** [NBD: NBD_CMD_DISC] waits for requests in flight, sends DISC, and waits for the close. */
  async disconnect(): Promise<void> {
    if (this.failure === undefined) {
      // [NBD: Terminating the transmission phase] the client SHOULD wait for requests in flight.
      if (this.pending.size > 0) await new Promise<void>((resolve) => this.whenIdle.push(resolve));
      if (this.failure === undefined && !this.stream.destroyed) {
        this.stream.write(encodeRequestHeader({ cookie: this.nextCookie++, type: CMD.DISC, flags: 0, offset: 0, length: 0 }, this.extendedValue));
        this.stream.end();
      }
    }
    await this.closedPromise;
  }

  /** Hard close: pending requests reject. */
  close(): void {
    this.stream.destroy();
  }

  /** Resolves when the connection is closed. */
  closed(): Promise<void> {
    return this.closedPromise;
  }

  // ---------------------------------------------------------------------------------------------
  // Handshake

  private async handshake(options: NbdClientOptions): Promise<void> {
    const exportName = options.exportName ?? '';
    this.exportNameValue = exportName;
    await this.greet(options);
    if (!this.fixedNewstyle) {
      await this.enterWithExportName(exportName);
      return;
    }
    if (options.extendedHeaders === true) {
      const { final } = await this.option(OPT.EXTENDED_HEADERS, undefined, undefined, true);
      this.extendedValue = final.type === REP.ACK;
    }
    if (!this.extendedValue && options.structuredReplies !== false) {
      const { final } = await this.option(OPT.STRUCTURED_REPLY, undefined, undefined, true);
      this.structuredValue = final.type === REP.ACK;
    }
    const metaContexts = options.metaContexts ?? [];
    if (metaContexts.length > 0) {
      if (!this.structuredValue && !this.extendedValue) throw new NbdClientError('metadata contexts need structured replies or extended headers');
      const { replies } = await this.option(OPT.SET_META_CONTEXT, encodeMetaContextData(exportName, metaContexts), REP.META_CONTEXT);
      for (const reply of replies) {
        const context = decodeRepMetaContext(reply.data);
        this.metaContextIds.set(context.name, context.contextId);
      }
    }
    if (options.useExportName === true) {
      if (this.extendedValue) throw new NbdClientError('EXPORT_NAME cannot be used with extended headers');
      await this.enterWithExportName(exportName);
      return;
    }
    const { replies, final } = await this.option(
      OPT.GO,
      encodeInfoRequestData(exportName, [INFO.BLOCK_SIZE, INFO.NAME, INFO.DESCRIPTION]),
      REP.INFO,
      true,
    );
    if (final.type === REP_ERR.UNSUP && !this.extendedValue) {
      // [NBD: NBD_OPT_GO] clients SHOULD fall back to EXPORT_NAME on ERR_UNSUP.
      await this.enterWithExportName(exportName);
      return;
    }
    if (final.type !== REP.ACK) throw optionFailure(OPT.GO, final);
    let sawExport = false;
    for (const reply of replies) {
      const info = decodeRepInfo(reply.data);
      if (info.type === INFO.EXPORT) {
        sawExport = true;
        this.sizeBytesValue = info.sizeBytes;
        this.transmissionFlagsValue = info.transmissionFlags;
      } else if (info.type === INFO.NAME) {
        this.canonicalNameValue = info.name;
      } else if (info.type === INFO.DESCRIPTION) {
        this.descriptionValue = info.description;
      } else if (info.type === INFO.BLOCK_SIZE) {
        this.blockSizesValue = { minimum: info.minimum, preferred: info.preferred, maximum: info.maximum };
      }
    }
    if (!sawExport) throw new NbdClientError('GO succeeded without INFO_EXPORT');
    this.startTransmission();
  }

  /** Greeting, client flags and (if asked) STARTTLS. */
  private async greet(options: Pick<NbdClientOptions, 'tls' | 'clientFlags'>): Promise<void> {
    const { handshakeFlags } = await this.readFrame(() => this.handshakeParser.greeting());
    const fixed = (handshakeFlags & HANDSHAKE_FLAG.FIXED_NEWSTYLE) !== 0;
    const clientFlags =
      options.clientFlags ??
      ((fixed ? CLIENT_FLAG.FIXED_NEWSTYLE : 0) | ((handshakeFlags & HANDSHAKE_FLAG.NO_ZEROES) !== 0 ? CLIENT_FLAG.NO_ZEROES : 0));
    this.fixedNewstyle = (clientFlags & CLIENT_FLAG.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (clientFlags & CLIENT_FLAG.NO_ZEROES) !== 0;
    this.stream.write(encodeClientFlags(clientFlags));
    if (options.tls !== undefined) {
      if (!this.fixedNewstyle) throw new NbdClientError('TLS needs fixed newstyle negotiation');
      await this.option(OPT.STARTTLS);
      await this.upgradeToTls(options.tls);
    }
  }

  private async upgradeToTls(options: NbdClientTlsOptions): Promise<void> {
    assert(this.queue.length === 0, 'bytes after the STARTTLS reply');
    const raw = this.stream;
    raw.off('data', this.onData);
    const secure = tls.connect({
      socket: raw as net.Socket,
      ca: options.ca,
      rejectUnauthorized: options.rejectUnauthorized ?? true,
      servername: options.servername ?? (this.targetHost !== undefined && net.isIP(this.targetHost) === 0 ? this.targetHost : undefined),
      minVersion: 'TLSv1.2',
    });
    try {
      await once(secure, 'secureConnect');
    } catch (error) {
      secure.destroy();
      throw new NbdClientError(`TLS handshake failed: ${(error as Error).message}`, { cause: error });
    }
    this.stream = secure;
    this.closedPromise = this.watch(secure);
    secure.on('data', this.onData);
    this.tlsValue = true;
  }

  private async enterWithExportName(exportName: string): Promise<void> {
    this.stream.write(encodeOptionRequest(OPT.EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    let answer;
    try {
      answer = await this.readFrame(() => this.handshakeParser.exportNameAnswer(this.noZeroes));
    } catch (error) {
      throw new NbdClientError(`EXPORT_NAME "${exportName}" failed: the server closed the connection (unknown export?)`, { cause: error });
    }
    this.sizeBytesValue = answer.sizeBytes;
    this.transmissionFlagsValue = answer.transmissionFlags;
    this.startTransmission();
  }

  /** [NBD: NBD_OPT_ABORT] */
  private async abort(): Promise<void> {
    this.stream.write(encodeOptionRequest(OPT.ABORT));
    // [NBD: NBD_OPT_ABORT] the server may close without replying.
    await this.readFrame(() => this.handshakeParser.optionReply()).catch(() => undefined);
    this.stream.end();
  }

  /**
   * Sends an option and reads replies of `listType` until the final one. Error replies throw
   * unless `allowError`.
   */
  private async option(
    option: number,
    data?: Buffer,
    listType?: number,
    allowError = false,
  ): Promise<{ replies: OptionReply[]; final: OptionReply }> {
    this.stream.write(encodeOptionRequest(option, data));
    const replies: OptionReply[] = [];
    for (let count = 0; count < OPTION_REPLIES_MAX; count++) {
      const reply = await this.readFrame(() => this.handshakeParser.optionReply());
      if (reply.option !== option) {
        throw new NbdClientError(`reply for option ${optionName(reply.option)} while waiting for ${optionName(option)}`);
      }
      if (reply.type === REP.ACK || (reply.type & REP_ERROR_BIT) !== 0) {
        if (reply.type !== REP.ACK && !allowError) throw optionFailure(option, reply);
        return { replies, final: reply };
      }
      if (reply.type !== listType) throw new NbdClientError(`unexpected ${replyTypeName(reply.type)} reply to ${optionName(option)}`);
      replies.push(reply);
    }
    throw new NbdClientError(`more than ${OPTION_REPLIES_MAX} replies to ${optionName(option)}`);
  }

  private readFrame<T>(parse: () => T | undefined): Promise<T> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const ready = parse();
    if (ready !== undefined) return Promise.resolve(ready);
    return new Promise<T>((resolve, reject) => {
      this.waiter = { parse, resolve: resolve as (value: unknown) => void, reject };
    });
  }

  private tryWaiter(): void {
    const waiter = this.waiter;
    if (waiter === undefined) return;
    const value = waiter.parse();
    if (value === undefined) return;
    this.waiter = undefined;
    waiter.resolve(value);
  }

  // ---------------------------------------------------------------------------------------------
  // Transmission

  private startTransmission(): void {
    const mode: ReplyMode = this.extendedValue ? 'extended' : this.structuredValue ? 'structured' : 'simple';
    const maximum = this.blockSizesValue?.maximum ?? 0;
    this.replyParser = new ReplyParser(this.queue, {
      mode,
      // Generous: 32 MiB reads plus a full 2^20-extent block status, or the advertised maximum.
      payloadBytesMax: Math.max(maximum, 1 << 25) + (1 << 24),
      readLengthForCookie: (cookie) => this.pending.get(cookie)?.simpleDataBytes ?? 0,
    });
    if (this.queue.length > 0) this.readReplies();
  }

  private submit(
    request: { type: number; flags: number; offset: number | bigint; length: number | bigint; payload?: Buffer | undefined; simpleDataBytes?: number },
    raw: boolean,
  ): Promise<RawReply> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.replyParser === undefined) return Promise.reject(new NbdClientError('not in the transmission phase'));
    const cookie = this.nextCookie++;
    let flags = request.flags;
    // [NBD: NBD_CMD_FLAG_PAYLOAD_LEN] extended WRITE always says its length is a payload.
    if (!raw && this.extendedValue && request.payload !== undefined && request.payload.length > 0) flags |= CMD_FLAG.PAYLOAD_LEN;
    const offset = Number(request.offset);
    const length = Number(request.length);
    return new Promise<RawReply>((resolve, reject) => {
      this.pending.set(cookie, {
        type: request.type,
        offset,
        length,
        simpleDataBytes: request.simpleDataBytes ?? (request.type === CMD.READ ? length : 0),
        raw,
        reply: { error: 0, message: '', simple: false, data: undefined, chunks: [] },
        readBuffer: undefined,
        readBytesCovered: 0,
        resolve,
        reject,
      });
      const header = encodeRequestHeader({ cookie, type: request.type, flags, offset: request.offset, length: request.length }, this.extendedValue);
      if (request.payload !== undefined && request.payload.length > 0) {
        this.stream.cork();
        this.stream.write(header);
        this.stream.write(request.payload);
        this.stream.uncork();
      } else {
        this.stream.write(header);
      }
    });
  }

  private readReplies(): void {
    const parser = this.replyParser;
    assert(parser !== undefined, 'replies before transmission');
    for (;;) {
      const reply = parser.next();
      if (reply === undefined) return;
      this.onReply(reply);
    }
  }

  private onReply(reply: NbdReply): void {
    const pending = this.pending.get(reply.cookie);
    if (pending === undefined) throw new NbdClientError(`reply for unknown cookie ${reply.cookie}`);
    const result = pending.reply;
    if (reply.kind === 'simple') {
      result.simple = true;
      result.error = reply.error;
      result.data = reply.payload;
      if (reply.error !== 0) result.message = errnoName(reply.error);
    } else {
      const payload = reply.payload ?? Buffer.alloc(0);
      if (pending.raw) result.chunks.push({ type: reply.type, flags: reply.flags, offset: reply.offset, payload });
      this.onChunk(pending, reply.type, payload);
    }
    if ((reply.flags & REPLY_FLAG.DONE) === 0) return;
    this.pending.delete(reply.cookie);
    this.settle(pending);
    if (this.pending.size === 0) for (const resolve of this.whenIdle.splice(0)) resolve();
  }

  private onChunk(pending: Pending, type: number, payload: Buffer): void {
    const result = pending.reply;
    if ((type & REPLY_TYPE_ERROR_BIT) !== 0) {
      const { error, message } = decodeErrorChunk(type, payload);
      if (result.error === 0) {
        result.error = error === 0 ? 22 : error;
        result.message = message;
      }
      return;
    }
    if (type === REPLY_TYPE.OFFSET_DATA || type === REPLY_TYPE.OFFSET_HOLE) {
      if (pending.type !== CMD.READ) throw new NbdClientError(`${replyTypeName(type)} chunk for a ${commandName(pending.type)}`);
      const piece = type === REPLY_TYPE.OFFSET_DATA ? decodeOffsetData(payload) : decodeOffsetHole(payload);
      const pieceLength = 'data' in piece ? piece.data.length : piece.lengthBytes;
      if (piece.offset < pending.offset || piece.offset + pieceLength > pending.offset + pending.length) {
        throw new NbdClientError(`read chunk [${piece.offset}, +${pieceLength}) outside the request`);
      }
      if ('data' in piece) {
        if (pending.readBytesCovered === 0 && pieceLength === pending.length) {
          pending.readBuffer = piece.data; // the whole read in one chunk: keep the view
        } else {
          // Zero-filled, so holes need no work.
          pending.readBuffer ??= Buffer.alloc(pending.length);
          piece.data.copy(pending.readBuffer, piece.offset - pending.offset);
        }
      }
      pending.readBytesCovered += pieceLength;
      if (pending.readBytesCovered > pending.length) throw new NbdClientError('READ chunks overlap');
      return;
    }
    if (type === REPLY_TYPE.BLOCK_STATUS || type === REPLY_TYPE.BLOCK_STATUS_EXT) {
      if (!pending.raw) result.chunks.push({ type, flags: 0, offset: -1, payload });
      return;
    }
    if (type !== REPLY_TYPE.NONE) throw new NbdClientError(`unknown reply chunk type ${type}`);
  }

  private settle(pending: Pending): void {
    const result = pending.reply;
    if (pending.raw) {
      pending.resolve(result);
      return;
    }
    if (result.error !== 0) {
      pending.reject(
        new NbdClientError(`${commandName(pending.type)} [${pending.offset}, +${pending.length}) failed: ${errnoName(result.error)}${result.message ? ` (${result.message})` : ''}`, {
          nbdError: result.error,
        }),
      );
      return;
    }
    if (pending.type === CMD.READ && !result.simple) {
      if (pending.readBytesCovered !== pending.length) {
        pending.reject(new NbdClientError(`structured READ covered ${pending.readBytesCovered} of ${pending.length} bytes`));
        return;
      }
      result.data = pending.readBuffer ?? Buffer.alloc(pending.length);
    }
    pending.resolve(result);
  }

  // ---------------------------------------------------------------------------------------------
  // Failure and close

  private watch(stream: Duplex): Promise<void> {
    return new Promise((resolve) => {
      stream.on('error', (error) => this.fail(new NbdClientError(`connection error: ${error.message}`, { cause: error })));
      stream.on('close', () => {
        this.fail(new NbdClientError('connection closed'));
        resolve();
      });
    });
  }

  private fail(error: Error): void {
    if (this.failure === undefined) {
      this.failure = error instanceof NbdClientError ? error : new NbdClientError(error.message, { cause: error });
    }
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.reject(this.failure);
    for (const pending of this.pending.values()) pending.reject(this.failure);
    this.pending.clear();
    for (const resolve of this.whenIdle.splice(0)) resolve();
    if (!this.stream.destroyed) this.stream.destroy();
  }
}

function optionFailure(option: number, reply: OptionReply): NbdClientError {
  const message = reply.data.length > 0 ? `: ${reply.data.toString('utf8')}` : '';
  return new NbdClientError(`${optionName(option)} refused with ${replyTypeName(reply.type)}${message}`, { optionReply: reply.type });
}

async function connectSocket(target: NbdTarget, timeoutMs: number): Promise<net.Socket> {
  const socket = 'path' in target ? net.connect({ path: target.path }) : net.connect({ host: target.host, port: target.port });
  socket.setNoDelay(true);
  const timer = setTimeout(() => socket.destroy(new Error(`connect timed out after ${timeoutMs} ms`)), timeoutMs);
  try {
    await once(socket, 'connect');
  } catch (error) {
    throw new NbdClientError(`cannot connect: ${(error as Error).message}`, { cause: error });
  } finally {
    clearTimeout(timer);
  }
  return socket;
}

/** Re-exported for callers matching on option replies. */
export { REP_ERR };
