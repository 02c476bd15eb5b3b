// One NBD client connection on the server: option haggling (a method per option), then the
// transmission phase with concurrent requests answered out of order. The wire format lives in
// codec.ts; this class holds the per-connection state, the flow control and the socket.
//
// Flow control. Requests are taken from the parser only while the socket does not ask us to
// wait ('drain') and the connection is under its caps (requests in flight, bytes in flight
// plus reply bytes queued in the socket, bytes in flight server-wide). A frame that has
// started arriving is always read to its end (at most one payload, itself capped), then held
// until it can be admitted; at a frame boundary the socket is paused. So a client that sends
// without reading replies, or floods requests, holds at most its caps of server memory.
import type { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { assert, isMirrorsanError, type ErrorCode } from '../errors.js';
import type { Logger } from '../util/log.js';
import type { BlockDevice, DeviceGeometry, ExportRegistry, Extent, ReadPiece } from '../volume/device.js';
import { ChunkQueue } from '../util/chunk-queue.js';
import {
  OptionParser,
  RequestParser,
  decodeInfoRequestData,
  decodeMetaContextData,
  encodeBlockStatus,
  encodeBlockStatusExt,
  encodeErrorChunk,
  encodeExportNameAnswer,
  encodeGreeting,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeRepInfoBlockSize,
  encodeRepInfoExport,
  encodeRepInfoString,
  encodeRepMetaContext,
  encodeRepServer,
  encodeSimpleReply,
  isInvalid,
  type NbdRequest,
  type StatusExtent,
} from './codec.js';
import {
  BASE_ALLOCATION,
  BLOCK_STATUS_EXTENTS_MAX,
  CLIENT_FLAG,
  CLIENT_FLAGS_KNOWN,
  CMD,
  CMD_FLAG,
  ERRNO,
  HANDSHAKE_FLAG,
  INFO,
  OPT,
  PAYLOAD_PORTABLE_BYTES_MAX,
  REP,
  REP_ERR,
  REPLY_FLAG,
  STATE,
  STRING_BYTES_MAX,
  TRANSMISSION_FLAG,
  UINT32_MAX,
  commandName,
  errnoName,
  optionName,
} from './protocol.js';

/** Validated server limits (see NbdServerLimits in server.ts). */
export interface ConnectionLimits {
  readonly optionDataBytesMax: number;
  readonly inflightBytesPerConnectionMax: number;
  readonly inflightBytesTotalMax: number;
  readonly requestsInflightPerConnectionMax: number;
  readonly handshakeTimeoutMs: number;
}

/** What a connection needs from its server. */
export interface ConnectionHost {
  readonly registry: ExportRegistry;
  readonly logger: Logger;
  readonly limits: ConnectionLimits;
  readonly tls: { readonly context: tls.SecureContext; readonly required: boolean } | undefined;
  /** Bytes of admitted requests on every connection. */
  readonly inflightBytesTotal: number;
  reserveInflight(bytes: number): void;
  releaseInflight(bytes: number): void;
  /** Asks to be pumped again once server-wide in-flight bytes fall below the cap. */
  waitForInflightTotal(connection: Connection): void;
  requestServed(errored: boolean): void;
  protocolViolation(): void;
  connectionClosed(connection: Connection): void;
}

export type ConnectionPhase = 'handshake' | 'starttls' | 'transmission' | 'closing' | 'closed';

export interface ConnectionStats {
  id: number;
  remoteAddress: string;
  phase: ConnectionPhase;
  exportName: string | undefined;
  tls: boolean;
  structuredReplies: boolean;
  extendedHeaders: boolean;
  inflightRequests: number;
  inflightBytes: number;
  /** Reply bytes handed to the socket and not yet sent. */
  writeBufferBytes: number;
  /** Bytes allocated for a WRITE payload still arriving. */
  heldPayloadBytes: number;
  readingPaused: boolean;
  requestsServed: number;
}

/** A client that keeps haggling without choosing an export is closed after this many options. */
const OPTIONS_PER_HANDSHAKE_MAX = 4096;
/** The id of `base:allocation` once selected (ids are opaque to clients). */
const BASE_ALLOCATION_CONTEXT_ID = 1;
/** Zero bytes sent for holes in simple-reply READs: one shared buffer, never written to. */
const ZERO_BUFFER = Buffer.alloc(1 << 20);

/** Device errors with a defined NBD meaning; anything else is EIO with an error log line. */
const NBD_ERRNO_BY_CODE: Partial<Record<ErrorCode, number>> = {
  NBD_EIO: ERRNO.EIO,
  NBD_ENOSPC: ERRNO.ENOSPC,
  NBD_EPERM: ERRNO.EPERM,
  NBD_EINVAL: ERRNO.EINVAL,
  NBD_EOVERFLOW: ERRNO.EOVERFLOW,
  NBD_ENOTSUP: ERRNO.ENOTSUP,
  NBD_SHUTDOWN: ERRNO.ESHUTDOWN,
  // A bounded queue is full (writes waiting for write priority, or the mirror's admission):
  // out of resources for now, with the reason in the structured error message.
  VOLUME_BUSY: ERRNO.ENOMEM,
};

/** A request refused before it reaches the device. */
interface Refusal {
  errno: number;
  message: string;
}

/** Command flags each command accepts (FUA is valid on every command once SEND_FUA is advertised). */
const FLAGS_VALID_FOR: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

/** The export chosen by GO or EXPORT_NAME, frozen for the rest of the connection. */
interface Transmission {
  device: BlockDevice;
  exportName: string;
  geometry: DeviceGeometry;
  transmissionFlags: number;
  /** Advertised maximum payload (INFO_BLOCK_SIZE maximum). */
  payloadMaxBytes: number;
  /** `base:allocation` was selected for this export. */
  baseAllocation: boolean;
  parser: RequestParser;
}

export class Connection {
  readonly id: number;
  readonly remoteAddress: string;
  private readonly host: ConnectionHost;
  private readonly log: Logger;
  private stream: Duplex;
  private readonly queue = new ChunkQueue();
  private phaseValue: ConnectionPhase = 'handshake';
  private optionParser: OptionParser;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private optionsSeen = 0;

  // Negotiated in the handshake (reset by STARTTLS).
  private fixedNewstyle = false;
  private noZeroes = false;
  private tlsActive = false;
  private structuredReplies = false;
  private extendedHeaders = false;
  /** Canonical export name that SET_META_CONTEXT selected `base:allocation` for. */
  private baseAllocationFor: string | undefined = undefined;

  private transmission: Transmission | undefined = undefined;
  /** A parsed request waiting to be admitted under the caps. */
  private heldRequest: NbdRequest | undefined = undefined;
  private inflightRequests = 0;
  private inflightBytes = 0;
  private requestsServed = 0;
  private readingPaused = false;
  private corked = false;
  private pumping = false;
  private closeReason: string | undefined = undefined;

  private readonly onData = (chunk: Buffer): void => {
    if (this.phaseValue !== 'handshake' && this.phaseValue !== 'transmission') return;
    this.queue.push(chunk);
    this.pump();
  };
  private readonly onDrain = (): void => this.pump();
  private readonly onEnd = (): void => this.beginClosing('client closed its side');
  private readonly onError = (error: Error): void => {
    const code = (error as NodeJS.ErrnoException).code;
    const quiet = code === 'ECONNRESET' || code === 'EPIPE';
    this.log[quiet ? 'debug' : 'warn']('connection error', { remote: this.remoteAddress, error: error.message });
  };
  private readonly onClose = (): void => this.closed();
  private readonly uncork = (): void => {
    if (!this.corked) return;
    this.corked = false;
    this.stream.uncork();
  };

  constructor(id: number, stream: Duplex, remoteAddress: string, host: ConnectionHost) {
    this.id = id;
    this.remoteAddress = remoteAddress;
    this.host = host;
    this.log = host.logger;
    this.stream = stream;
    this.optionParser = new OptionParser(this.queue, { optionDataBytesMax: host.limits.optionDataBytesMax, expectClientFlags: true });
  }

  get phase(): ConnectionPhase {
    return this.phaseValue;
  }

  /** Sends the greeting and starts reading. */
  start(): void {
    this.watch(this.stream);
    this.attachReader(this.stream);
    this.handshakeTimer = setTimeout(() => {
      this.violation(`handshake not finished within ${this.host.limits.handshakeTimeoutMs} ms`);
    }, this.host.limits.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    // [NBD: Handshake flags] fixed newstyle, and we can leave out the EXPORT_NAME zeroes.
    this.send(encodeGreeting(HANDSHAKE_FLAG.FIXED_NEWSTYLE | HANDSHAKE_FLAG.NO_ZEROES));
  }

  stats(): ConnectionStats {
    return {
      id: this.id,
      remoteAddress: this.remoteAddress,
      phase: this.phaseValue,
      exportName: this.transmission?.exportName,
      tls: this.tlsActive,
      structuredReplies: this.structuredReplies,
      extendedHeaders: this.extendedHeaders,
      inflightRequests: this.inflightRequests,
      inflightBytes: this.inflightBytes,
      writeBufferBytes: this.stream.writableLength,
      heldPayloadBytes: this.transmission?.parser.heldPayloadBytes ?? 0,
      readingPaused: this.readingPaused,
      requestsServed: this.requestsServed,
    };
  }

  /** Server shutdown: refuse further negotiation, let requests in flight finish, then close. */
  shutdown(): void {
    if (this.phaseValue === 'handshake' || this.phaseValue === 'starttls') {
      this.log.debug('closing a connection still in its handshake: server shutting down', { remote: this.remoteAddress });
      this.destroy();
      return;
    }
    this.beginClosing('server shutting down');
  }

  /** Hard close, now. */
  destroy(): void {
    if (this.phaseValue === 'closed') return;
    this.stream.destroy();
    this.closed();
  }

  // -------------------------------------------------------------------------------------------
  // Reading and flow control

  /** Lifecycle listeners: 'error' and 'close'. */
  private watch(stream: Duplex): void {
    stream.on('error', this.onError);
    stream.on('close', this.onClose);
  }

  /** Reading listeners; attaching 'data' starts the flow. */
  private attachReader(stream: Duplex): void {
    stream.on('data', this.onData);
    stream.on('drain', this.onDrain);
    stream.on('end', this.onEnd);
    this.readingPaused = false;
  }

  private detachReader(stream: Duplex): void {
    stream.off('data', this.onData);
    stream.off('drain', this.onDrain);
    stream.off('end', this.onEnd);
  }

  /** Takes every frame that can be taken now; safe to call at any time. */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      if (this.phaseValue === 'handshake') this.pumpOptions();
      if (this.phaseValue === 'transmission') this.pumpRequests();
      this.updateReading();
    } catch (error) {
      if (isMirrorsanError(error)) {
        this.violation(error.message);
      } else {
        // A bug, not input: log it loudly and drop this one connection rather than all of them.
        this.log.error('internal error on a connection, closing it', {
          remote: this.remoteAddress,
          error: error instanceof Error ? (error.stack ?? error.message) : String(error),
        });
        this.destroy();
      }
    } finally {
      this.pumping = false;
    }
  }

  private pumpOptions(): void {
    while (this.phaseValue === 'handshake' && !this.stream.writableNeedDrain) {
      const frame = this.optionParser.next();
      if (frame === undefined) return;
      if (frame.kind === 'clientFlags') this.onClientFlags(frame.flags);
      else this.onOption(frame.option, frame.data);
    }
  }

  private pumpRequests(): void {
    const transmission = this.transmission;
    assert(transmission !== undefined, 'transmission phase without an export');
    while (this.phaseValue === 'transmission') {
      if (this.heldRequest === undefined) {
        this.heldRequest = transmission.parser.next();
        if (this.heldRequest === undefined) return;
      }
      if (this.admissionBlocked()) return;
      const request = this.heldRequest;
      this.heldRequest = undefined;
      if (request.type === CMD.DISC) {
        // [NBD: NBD_CMD_DISC] finish outstanding requests, then close; no reply.
        this.beginClosing('client sent DISC');
        return;
      }
      this.dispatch(transmission, request);
    }
  }

  private admissionBlocked(): boolean {
    const limits = this.host.limits;
    // The socket's own backpressure signal ('drain' pumps again).
    if (this.stream.writableNeedDrain) return true;
    if (this.inflightRequests >= limits.requestsInflightPerConnectionMax) return true;
    if (this.inflightBytes + this.stream.writableLength >= limits.inflightBytesPerConnectionMax) return true;
    if (this.host.inflightBytesTotal >= limits.inflightBytesTotalMax) {
      this.host.waitForInflightTotal(this);
      return true;
    }
    return false;
  }

  private wantsToRead(): boolean {
    switch (this.phaseValue) {
      case 'handshake':
        return !this.stream.writableNeedDrain;
      case 'transmission': {
        if (this.heldRequest !== undefined) return false;
        // A frame that has started is read to its end (its size is capped); at a frame
        // boundary we read only while a new request could be admitted.
        return this.transmission?.parser.midFrame === true || !this.admissionBlocked();
      }
      default:
        return false;
    }
  }

  private updateReading(): void {
    if (this.phaseValue === 'closed' || this.phaseValue === 'starttls') return;
    const want = this.wantsToRead();
    if (want && this.readingPaused) {
      this.readingPaused = false;
      this.stream.resume();
    } else if (!want && !this.readingPaused) {
      this.readingPaused = true;
      this.stream.pause();
    }
  }

  /** Called by the server when server-wide in-flight bytes fell below the cap. */
  wake(): void {
    this.pump();
  }

  // -------------------------------------------------------------------------------------------
  // Writing

  /**
   * Queues bytes; everything sent in one event-loop turn leaves in one vectored write
   * (cork, then uncork in the check phase): replies completed by several I/O callbacks of
   * the same turn share one syscall, which on a small machine is most of the per-request cost.
   */
  private send(buffer: Buffer): void {
    if (this.stream.destroyed) return;
    if (!this.corked) {
      this.corked = true;
      this.stream.cork();
      // With other requests in flight, wait for the end of this event-loop turn so their
      // replies share the syscall; a lone request (QD1) must not pay that wait.
      if (this.inflightRequests > 1) setImmediate(this.uncork);
      else process.nextTick(this.uncork);
    }
    this.stream.write(buffer);
  }

  private flushNow(): void {
    if (this.corked) this.uncork();
  }

  // -------------------------------------------------------------------------------------------
  // Closing

  private violation(reason: string): void {
    if (this.phaseValue === 'closed') return;
    this.host.protocolViolation();
    this.log.warn('closing connection: protocol violation', { remote: this.remoteAddress, reason });
    this.destroy();
  }

  /** Stops taking requests; once those in flight are answered, ends the connection. */
  private beginClosing(reason: string): void {
    if (this.phaseValue === 'closing' || this.phaseValue === 'closed') return;
    if (this.phaseValue !== 'transmission') {
      this.log.debug('connection ended during the handshake', { remote: this.remoteAddress, reason });
      this.endGracefully();
      return;
    }
    this.log.debug('connection closing', { remote: this.remoteAddress, reason, inflight: this.inflightRequests });
    this.phaseValue = 'closing';
    this.closeReason = reason;
    this.heldRequest = undefined;
    this.readingPaused = true;
    this.stream.pause();
    if (this.inflightRequests === 0) this.endGracefully();
  }

  private endGracefully(): void {
    if (this.phaseValue === 'closed') return;
    this.phaseValue = 'closing';
    this.flushNow();
    const stream = this.stream;
    stream.once('finish', () => stream.destroy());
    stream.end();
  }

  private closed(): void {
    if (this.phaseValue === 'closed') return;
    this.phaseValue = 'closed';
    if (this.handshakeTimer !== undefined) clearTimeout(this.handshakeTimer);
    this.heldRequest = undefined;
    this.queue.drain();
    this.log.debug('connection closed', { remote: this.remoteAddress, served: this.requestsServed, reason: this.closeReason });
    this.host.connectionClosed(this);
  }

  // -------------------------------------------------------------------------------------------
  // Handshake

  private onClientFlags(flags: number): void {
    // [NBD: Client flags] the server MUST drop the connection on an unknown flag.
    if ((flags & ~CLIENT_FLAGS_KNOWN) !== 0) {
      this.violation(`client flags 0x${flags.toString(16)} include unknown bits`);
      return;
    }
    this.fixedNewstyle = (flags & CLIENT_FLAG.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & CLIENT_FLAG.NO_ZEROES) !== 0;
    // [NBD: TLS support] TLS needs fixed newstyle; a TLS-only server cannot serve this client.
    if (this.host.tls?.required === true && !this.fixedNewstyle) {
      this.violation('TLS is required but the client did not negotiate fixed newstyle');
    }
  }

  private onOption(option: number, data: Buffer): void {
    this.optionsSeen++;
    if (this.optionsSeen > OPTIONS_PER_HANDSHAKE_MAX) {
      this.violation(`more than ${OPTIONS_PER_HANDSHAKE_MAX} options without choosing an export`);
      return;
    }
    // [NBD: NBD_OPT_EXPORT_NAME] the only valid option in non-fixed newstyle.
    if (!this.fixedNewstyle && option !== OPT.EXPORT_NAME) {
      this.refuseOption(option, REP_ERR.INVALID, 'fixed newstyle was not negotiated: only EXPORT_NAME is valid');
      return;
    }
    // [NBD: FORCEDTLS mode] every option but STARTTLS and ABORT waits for TLS.
    if (this.host.tls?.required === true && !this.tlsActive && option !== OPT.STARTTLS && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) {
        this.violation('EXPORT_NAME before STARTTLS while TLS is required');
        return;
      }
      this.refuseOption(option, REP_ERR.TLS_REQD, 'this server requires TLS: send STARTTLS first');
      return;
    }
    switch (option) {
      case OPT.EXPORT_NAME:
        return this.optExportName(data);
      case OPT.ABORT:
        return this.optAbort();
      case OPT.LIST:
        return this.optList(data);
      case OPT.STARTTLS:
        return this.optStartTls(data);
      case OPT.INFO:
      case OPT.GO:
        return this.optInfoOrGo(option, data);
      case OPT.STRUCTURED_REPLY:
        return this.optStructuredReply(data);
      case OPT.LIST_META_CONTEXT:
        return this.optListMetaContext(data);
      case OPT.SET_META_CONTEXT:
        return this.optSetMetaContext(data);
      case OPT.EXTENDED_HEADERS:
        return this.optExtendedHeaders(data);
      default:
        // [NBD: Baseline] unknown options get ERR_UNSUP and framing goes on.
        this.refuseOption(option, REP_ERR.UNSUP, `option ${option} is not supported`);
    }
  }

  private reply(option: number, replyType: number): void {
    this.send(encodeOptionReply(option, replyType));
  }

  private refuseOption(option: number, errorType: number, message: string): void {
    this.log.debug('option refused', { remote: this.remoteAddress, option: optionName(option), reason: message });
    this.send(encodeOptionError(option, errorType, message));
  }

  /** The export an option names: the empty name means the registry's default. */
  private canonicalName(name: string): string | undefined {
    return name === '' ? this.host.registry.defaultName() : name;
  }

  /** [NBD: NBD_OPT_EXPORT_NAME] no reply header; failure can only be a hard close. */
  private optExportName(data: Buffer): void {
    if (this.extendedHeaders) {
      this.violation('EXPORT_NAME after EXTENDED_HEADERS was negotiated');
      return;
    }
    if (data.length > STRING_BYTES_MAX) {
      this.violation(`EXPORT_NAME of ${data.length} bytes is longer than ${STRING_BYTES_MAX}`);
      return;
    }
    const requested = data.toString('utf8');
    const name = this.canonicalName(requested);
    const device = name === undefined ? undefined : this.host.registry.get(name);
    if (name === undefined || device === undefined) {
      this.violation(`EXPORT_NAME for unknown export "${requested}"`);
      return;
    }
    const geometry = device.geometry();
    const transmissionFlags = this.transmissionFlags(geometry);
    this.send(encodeExportNameAnswer(geometry.sizeBytes, transmissionFlags, this.noZeroes));
    this.enterTransmission(device, name, geometry, transmissionFlags);
  }

  /** [NBD: NBD_OPT_ABORT] ACK, then close (data is ignored, as the spec asks). */
  private optAbort(): void {
    this.reply(OPT.ABORT, REP.ACK);
    this.beginClosing('client sent ABORT');
  }

  /** [NBD: NBD_OPT_LIST] one REP_SERVER per export, then ACK. */
  private optList(data: Buffer): void {
    if (data.length !== 0) {
      this.refuseOption(OPT.LIST, REP_ERR.INVALID, 'LIST carries no data');
      return;
    }
    for (const device of this.host.registry.list()) {
      this.send(encodeRepServer(OPT.LIST, device.name, device.description));
    }
    this.reply(OPT.LIST, REP.ACK);
  }

  /** [NBD: NBD_OPT_STARTTLS] ACK, then TLS on the same socket, then haggling starts over. */
  private optStartTls(data: Buffer): void {
    const tlsConfig = this.host.tls;
    if (tlsConfig === undefined) {
      this.refuseOption(OPT.STARTTLS, REP_ERR.UNSUP, 'TLS is not configured on this server');
      return;
    }
    if (this.tlsActive) {
      this.refuseOption(OPT.STARTTLS, REP_ERR.INVALID, 'TLS is already active');
      return;
    }
    if (data.length !== 0) {
      this.refuseOption(OPT.STARTTLS, REP_ERR.INVALID, 'STARTTLS carries no data');
      return;
    }
    if (this.queue.length !== 0) {
      this.violation('client sent data after STARTTLS before the reply');
      return;
    }
    this.phaseValue = 'starttls';
    const raw = this.stream;
    this.detachReader(raw);
    // Bytes the client sends from now on are its TLS ClientHello: leave them in the socket
    // (or its read buffer, which TLSSocket takes over) rather than in our queue.
    raw.pause();
    this.flushNow();
    // The ACK must be on the wire before TLS takes the socket over.
    raw.write(encodeOptionReply(OPT.STARTTLS, REP.ACK), (error) => {
      if (this.phaseValue !== 'starttls') return;
      if (error) {
        this.destroy();
        return;
      }
      const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: tlsConfig.context });
      // From here the TLS socket reports the end of the connection; onError stays on the raw
      // socket so that a late error there is logged rather than thrown.
      raw.off('close', this.onClose);
      this.stream = secure;
      this.watch(secure);
      secure.once('secure', () => {
        if (this.phaseValue !== 'starttls') return;
        this.attachReader(secure);
        // [NBD: NBD_OPT_STARTTLS] no negotiation state survives the upgrade.
        this.tlsActive = true;
        this.structuredReplies = false;
        this.extendedHeaders = false;
        this.baseAllocationFor = undefined;
        this.optionParser = new OptionParser(this.queue, { optionDataBytesMax: this.host.limits.optionDataBytesMax, expectClientFlags: false });
        this.phaseValue = 'handshake';
        this.log.debug('TLS established', { remote: this.remoteAddress, protocol: secure.getProtocol() ?? undefined });
        this.pump();
      });
    });
  }

  /** [NBD: NBD_OPT_INFO and NBD_OPT_GO] REP_INFO replies, then ACK (and, for GO, transmission). */
  private optInfoOrGo(option: typeof OPT.INFO | typeof OPT.GO, data: Buffer): void {
    const request = decodeInfoRequestData(data);
    if (isInvalid(request)) {
      this.refuseOption(option, REP_ERR.INVALID, request.invalid);
      return;
    }
    const name = this.canonicalName(request.name);
    const device = name === undefined ? undefined : this.host.registry.get(name);
    if (name === undefined || device === undefined) {
      this.refuseOption(option, REP_ERR.UNKNOWN, request.name === '' ? 'there is no default export' : `no export named "${request.name}"`);
      return;
    }
    const geometry = device.geometry();
    const transmissionFlags = this.transmissionFlags(geometry);
    this.send(encodeRepInfoExport(option, geometry.sizeBytes, transmissionFlags));
    for (const infoType of new Set(request.infoTypes)) {
      switch (infoType) {
        case INFO.NAME:
          this.send(encodeRepInfoString(option, INFO.NAME, name));
          break;
        case INFO.DESCRIPTION:
          if (device.description !== '') this.send(encodeRepInfoString(option, INFO.DESCRIPTION, device.description));
          break;
        case INFO.BLOCK_SIZE:
          this.send(encodeRepInfoBlockSize(option, geometry.blockSizeMin, geometry.blockSizePreferred, this.payloadMax(geometry)));
          break;
        default:
          // INFO_EXPORT was sent above; [NBD: NBD_OPT_INFO] unknown requests are ignored.
          break;
      }
    }
    this.reply(option, REP.ACK);
    if (option === OPT.GO) this.enterTransmission(device, name, geometry, transmissionFlags);
  }

  /** [NBD: NBD_OPT_STRUCTURED_REPLY] */
  private optStructuredReply(data: Buffer): void {
    if (data.length !== 0) return this.refuseOption(OPT.STRUCTURED_REPLY, REP_ERR.INVALID, 'STRUCTURED_REPLY carries no data');
    if (this.extendedHeaders) {
      return this.refuseOption(OPT.STRUCTURED_REPLY, REP_ERR.EXT_HEADER_REQD, 'extended headers are already negotiated');
    }
    if (this.structuredReplies) return this.refuseOption(OPT.STRUCTURED_REPLY, REP_ERR.INVALID, 'structured replies are already negotiated');
    this.structuredReplies = true;
    this.reply(OPT.STRUCTURED_REPLY, REP.ACK);
  }

  /** [NBD: NBD_OPT_EXTENDED_HEADERS] 32-byte headers both ways; implies structured replies. */
  private optExtendedHeaders(data: Buffer): void {
    if (data.length !== 0) return this.refuseOption(OPT.EXTENDED_HEADERS, REP_ERR.INVALID, 'EXTENDED_HEADERS carries no data');
    if (this.extendedHeaders) return this.refuseOption(OPT.EXTENDED_HEADERS, REP_ERR.INVALID, 'extended headers are already negotiated');
    this.extendedHeaders = true;
    this.reply(OPT.EXTENDED_HEADERS, REP.ACK);
  }

  /** [NBD: NBD_OPT_LIST_META_CONTEXT] contexts matching the queries (all of them for none). */
  private optListMetaContext(data: Buffer): void {
    const request = decodeMetaContextData(data);
    if (isInvalid(request)) return this.refuseOption(OPT.LIST_META_CONTEXT, REP_ERR.INVALID, request.invalid);
    // `base:` lists every base context; unknown namespaces and leaves are ignored.
    const matches = request.queries.length === 0 || request.queries.some((query) => query === 'base:' || query === BASE_ALLOCATION);
    // [NBD: NBD_OPT_LIST_META_CONTEXT] the id in list replies is reserved: zero.
    if (matches) this.send(encodeRepMetaContext(OPT.LIST_META_CONTEXT, 0, BASE_ALLOCATION));
    this.reply(OPT.LIST_META_CONTEXT, REP.ACK);
  }

  /** [NBD: NBD_OPT_SET_META_CONTEXT] replaces the selection, even when it fails. */
  private optSetMetaContext(data: Buffer): void {
    this.baseAllocationFor = undefined;
    if (!this.structuredReplies && !this.extendedHeaders) {
      return this.refuseOption(OPT.SET_META_CONTEXT, REP_ERR.INVALID, 'negotiate STRUCTURED_REPLY or EXTENDED_HEADERS first');
    }
    const request = decodeMetaContextData(data);
    if (isInvalid(request)) return this.refuseOption(OPT.SET_META_CONTEXT, REP_ERR.INVALID, request.invalid);
    if (request.queries.includes(BASE_ALLOCATION)) {
      this.baseAllocationFor = this.canonicalName(request.name) ?? request.name;
      this.send(encodeRepMetaContext(OPT.SET_META_CONTEXT, BASE_ALLOCATION_CONTEXT_ID, BASE_ALLOCATION));
    }
    this.reply(OPT.SET_META_CONTEXT, REP.ACK);
  }

  /** [NBD: Transmission flags] what this export supports, as negotiated so far. */
  private transmissionFlags(geometry: DeviceGeometry): number {
    let flags = TRANSMISSION_FLAG.HAS_FLAGS | TRANSMISSION_FLAG.SEND_FLUSH | TRANSMISSION_FLAG.SEND_FUA | TRANSMISSION_FLAG.SEND_CACHE;
    if (geometry.readOnly) flags |= TRANSMISSION_FLAG.READ_ONLY;
    else flags |= TRANSMISSION_FLAG.SEND_TRIM | TRANSMISSION_FLAG.SEND_WRITE_ZEROES | TRANSMISSION_FLAG.SEND_FAST_ZERO;
    // [NBD: Transmission flags] SEND_DF MUST be clear without structured replies.
    if (this.structuredReplies || this.extendedHeaders) flags |= TRANSMISSION_FLAG.SEND_DF;
    if (geometry.multiConn) flags |= TRANSMISSION_FLAG.CAN_MULTI_CONN;
    return flags;
  }

  private payloadMax(geometry: DeviceGeometry): number {
    return Math.min(geometry.payloadMaxBytes, UINT32_MAX);
  }

  private enterTransmission(device: BlockDevice, exportName: string, geometry: DeviceGeometry, transmissionFlags: number): void {
    if (this.handshakeTimer !== undefined) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    const payloadMaxBytes = this.payloadMax(geometry);
    const baseAllocation = this.baseAllocationFor === exportName && (this.structuredReplies || this.extendedHeaders);
    this.transmission = {
      device,
      exportName,
      geometry,
      transmissionFlags,
      payloadMaxBytes,
      baseAllocation,
      parser: new RequestParser(this.queue, {
        extendedHeaders: this.extendedHeaders,
        payloadMaxBytes,
        // [NBD: Size constraints] up to 32 MiB is never a denial of service: consume and refuse.
        payloadHardMaxBytes: Math.max(payloadMaxBytes, PAYLOAD_PORTABLE_BYTES_MAX),
      }),
    };
    this.phaseValue = 'transmission';
    this.log.debug('transmission started', {
      remote: this.remoteAddress,
      export: exportName,
      flags: `0x${transmissionFlags.toString(16)}`,
      replies: this.extendedHeaders ? 'extended' : this.structuredReplies ? 'structured' : 'simple',
      baseAllocation,
    });
  }

  // -------------------------------------------------------------------------------------------
  // Transmission

  private dispatch(transmission: Transmission, request: NbdRequest): void {
    // Bytes this request holds until its reply is handed to the socket.
    const costBytes =
      request.type === CMD.READ && request.length <= transmission.payloadMaxBytes ? request.length : (request.payload?.length ?? 0);
    this.inflightRequests++;
    this.inflightBytes += costBytes;
    this.host.reserveInflight(costBytes);
    this.serve(transmission, request).then(
      () => this.finishRequest(costBytes),
      (error: unknown) => {
        // serve() answers device errors itself; reaching here is a bug in this file.
        this.log.error('request handling failed', { remote: this.remoteAddress, error: error instanceof Error ? error.stack : String(error) });
        this.finishRequest(costBytes);
        this.destroy();
      },
    );
  }

  private finishRequest(costBytes: number): void {
    this.inflightRequests--;
    this.inflightBytes -= costBytes;
    this.requestsServed++;
    this.host.releaseInflight(costBytes);
    if (this.phaseValue === 'closing') {
      if (this.inflightRequests === 0) this.endGracefully();
    } else if (this.phaseValue === 'transmission') {
      this.pump();
    }
  }

  private async serve(transmission: Transmission, request: NbdRequest): Promise<void> {
    const refusal = this.validate(transmission, request);
    if (refusal !== undefined) {
      this.log.debug('request refused', {
        remote: this.remoteAddress,
        command: commandName(request.type),
        error: errnoName(refusal.errno),
        reason: refusal.message,
      });
      this.replyError(request, refusal.errno, refusal.message);
      return;
    }
    const device = transmission.device;
    const fua = (request.flags & CMD_FLAG.FUA) !== 0;
    try {
      switch (request.type) {
        case CMD.READ:
          return await this.serveRead(transmission, request);
        case CMD.WRITE:
          assert(request.payload !== undefined && request.payload.length === request.length, 'WRITE without its payload');
          await device.write(request.offset, request.payload, { fua });
          break;
        case CMD.FLUSH:
          await device.flush();
          break;
        case CMD.TRIM:
          await device.trim(request.offset, request.length, { fua });
          break;
        case CMD.CACHE:
          if (request.length > 0) await device.cache(request.offset, request.length);
          break;
        case CMD.WRITE_ZEROES:
          await device.writeZeroes(request.offset, request.length, {
            fua,
            mayTrim: (request.flags & CMD_FLAG.NO_HOLE) === 0,
            fastZero: (request.flags & CMD_FLAG.FAST_ZERO) !== 0,
          });
          break;
        case CMD.BLOCK_STATUS:
          return this.serveBlockStatus(transmission, request);
        default:
          assert(false, `validate() let command ${request.type} through`);
      }
      this.replyOk(request);
    } catch (error) {
      this.replyDeviceError(transmission, request, error);
    }
  }

  /** [NBD: Error values] checks made before the device is called; undefined = go ahead. */
  private validate(transmission: Transmission, request: NbdRequest): Refusal | undefined {
    const { type, flags, offset, length } = request;
    const geometry = transmission.geometry;
    const name = commandName(type);
    const allowed = FLAGS_VALID_FOR[type];
    if (allowed === undefined) return { errno: ERRNO.EINVAL, message: `unknown command ${type}` };
    let valid = allowed;
    // [NBD: NBD_CMD_FLAG_DF] only with SEND_DF, which needs structured replies.
    if ((transmission.transmissionFlags & TRANSMISSION_FLAG.SEND_DF) === 0) valid &= ~CMD_FLAG.DF;
    // [NBD: NBD_CMD_FLAG_PAYLOAD_LEN] required on extended WRITE; no other command takes a payload here.
    if (this.extendedHeaders && type === CMD.WRITE) valid |= CMD_FLAG.PAYLOAD_LEN;
    if ((flags & ~valid) !== 0) return { errno: ERRNO.EINVAL, message: `flags 0x${flags.toString(16)} are not valid for ${name}` };
    if (this.extendedHeaders && type === CMD.WRITE && (flags & CMD_FLAG.PAYLOAD_LEN) === 0) {
      return { errno: ERRNO.EINVAL, message: 'an extended WRITE must set PAYLOAD_LEN' };
    }
    if (request.payloadDiscarded) {
      return { errno: ERRNO.EINVAL, message: `payload of ${length} bytes is larger than the maximum ${transmission.payloadMaxBytes}` };
    }
    if (type === CMD.FLUSH) {
      if (offset !== 0 || length !== 0) return { errno: ERRNO.EINVAL, message: 'FLUSH offset and length must be zero' };
      return undefined;
    }
    if (length === 0 && type !== CMD.CACHE) return { errno: ERRNO.EINVAL, message: `${name} of zero bytes` };
    if (type === CMD.READ && length > transmission.payloadMaxBytes) {
      // [NBD: NBD_CMD_READ] with chunks the server may refuse large reads with EOVERFLOW (and
      // MUST for DF); a simple reply cannot exceed the maximum payload at all.
      const chunked = this.structuredReplies || this.extendedHeaders;
      return {
        errno: chunked ? ERRNO.EOVERFLOW : ERRNO.EINVAL,
        message: `READ of ${length} bytes is larger than the maximum payload ${transmission.payloadMaxBytes}`,
      };
    }
    const writes = type === CMD.WRITE || type === CMD.WRITE_ZEROES || type === CMD.TRIM;
    if (writes && geometry.readOnly) return { errno: ERRNO.EPERM, message: `${name} on a read-only export` };
    if (offset > geometry.sizeBytes || length > geometry.sizeBytes - offset) {
      return {
        errno: type === CMD.WRITE || type === CMD.WRITE_ZEROES ? ERRNO.ENOSPC : ERRNO.EINVAL,
        message: `${name} of [${offset}, +${length}) goes past the end of the ${geometry.sizeBytes}-byte export`,
      };
    }
    const alignment = geometry.blockSizeMin;
    if (offset % alignment !== 0 || length % alignment !== 0) {
      return { errno: ERRNO.EINVAL, message: `${name} of [${offset}, +${length}) is not aligned to the ${alignment}-byte minimum block size` };
    }
    if (type === CMD.BLOCK_STATUS && !transmission.baseAllocation) {
      return { errno: ERRNO.EINVAL, message: 'BLOCK_STATUS without a selected metadata context' };
    }
    return undefined;
  }

  private async serveRead(transmission: Transmission, request: NbdRequest): Promise<void> {
    const pieces = await transmission.device.read(request.offset, request.length);
    const problem = piecesProblem(pieces, request.offset, request.length);
    if (problem !== undefined) {
      this.log.error('device returned a malformed read', { export: transmission.exportName, problem });
      this.replyError(request, ERRNO.EIO, 'internal error reading the export');
      return;
    }
    if (this.phaseValue === 'closed') return;
    const extended = this.extendedHeaders;
    if (!this.structuredReplies && !extended) {
      // [NBD: Simple reply message] the outcome is known before the header goes out.
      this.send(encodeSimpleReply(request.cookie, 0));
      this.sendPieceBytes(pieces);
    } else if ((request.flags & CMD_FLAG.DF) !== 0) {
      // [NBD: NBD_CMD_FLAG_DF] one content chunk: holes are sent as zero bytes.
      this.send(encodeOffsetDataHeader(extended, request, REPLY_FLAG.DONE, request.offset, request.length));
      this.sendPieceBytes(pieces);
    } else {
      // [NBD: NBD_CMD_READ] holes become OFFSET_HOLE chunks; data goes out without a copy.
      for (let i = 0; i < pieces.length; i++) {
        const piece = pieces[i]!;
        const flags = i === pieces.length - 1 ? REPLY_FLAG.DONE : 0;
        if (piece.kind === 'data') {
          this.send(encodeOffsetDataHeader(extended, request, flags, piece.offset, piece.data.length));
          this.send(piece.data);
        } else {
          this.send(encodeOffsetHole(extended, request, flags, piece.offset, piece.length));
        }
      }
    }
    this.host.requestServed(false);
  }

  private sendPieceBytes(pieces: readonly ReadPiece[]): void {
    for (const piece of pieces) {
      if (piece.kind === 'data') {
        this.send(piece.data);
        continue;
      }
      for (let left = piece.length; left > 0; left -= ZERO_BUFFER.length) {
        this.send(left >= ZERO_BUFFER.length ? ZERO_BUFFER : ZERO_BUFFER.subarray(0, left));
      }
    }
  }

  /** [NBD: NBD_CMD_BLOCK_STATUS] one chunk for our one context, clipped to the request. */
  private serveBlockStatus(transmission: Transmission, request: NbdRequest): void {
    const extents = transmission.device.blockStatus(request.offset, request.length);
    const status = statusExtents(extents, request.offset, request.length, (request.flags & CMD_FLAG.REQ_ONE) !== 0);
    if (typeof status === 'string') {
      this.log.error('device returned malformed block status', { export: transmission.exportName, problem: status });
      this.replyError(request, ERRNO.EIO, 'internal error reading block status');
      return;
    }
    if (this.phaseValue === 'closed') return;
    this.send(
      this.extendedHeaders
        ? encodeBlockStatusExt(request, REPLY_FLAG.DONE, BASE_ALLOCATION_CONTEXT_ID, status)
        : encodeBlockStatus(request, REPLY_FLAG.DONE, BASE_ALLOCATION_CONTEXT_ID, status),
    );
    this.host.requestServed(false);
  }

  private replyOk(request: NbdRequest): void {
    if (this.phaseValue === 'closed') return;
    // [NBD: Extended reply chunk message] never a simple reply once extended headers are on;
    // with structured replies a simple reply stays valid for payload-less answers.
    this.send(this.extendedHeaders ? encodeNoneChunk(true, request) : encodeSimpleReply(request.cookie, 0));
    this.host.requestServed(false);
  }

  private replyError(request: NbdRequest, errno: number, message: string): void {
    if (this.phaseValue === 'closed') return;
    // [NBD: Structured reply chunk message] errors SHOULD go in a chunk, with a message.
    const chunked = this.structuredReplies || this.extendedHeaders;
    this.send(chunked ? encodeErrorChunk(this.extendedHeaders, request, REPLY_FLAG.DONE, errno, message) : encodeSimpleReply(request.cookie, errno));
    this.host.requestServed(true);
  }

  private replyDeviceError(transmission: Transmission, request: NbdRequest, error: unknown): void {
    const errno = isMirrorsanError(error) ? NBD_ERRNO_BY_CODE[error.code] : undefined;
    const message = error instanceof Error ? error.message : String(error);
    if (errno === undefined) {
      this.log.error('device failed a request', {
        remote: this.remoteAddress,
        export: transmission.exportName,
        command: commandName(request.type),
        offset: request.offset,
        length: request.length,
        error: error instanceof Error ? (error.stack ?? message) : message,
      });
      this.replyError(request, ERRNO.EIO, 'I/O error');
      return;
    }
    this.log[errno === ERRNO.EIO ? 'warn' : 'debug']('device refused a request', {
      remote: this.remoteAddress,
      export: transmission.exportName,
      command: commandName(request.type),
      error: errnoName(errno),
      reason: message,
    });
    this.replyError(request, errno, message);
  }
}

/** Why a device's read pieces do not cover [offset, offset+length) exactly, or undefined. */
export function piecesProblem(pieces: readonly ReadPiece[], offset: number, length: number): string | undefined {
  let position = offset;
  for (const piece of pieces) {
    const pieceLength = piece.kind === 'data' ? piece.data.length : piece.length;
    if (piece.offset !== position) return `piece at ${piece.offset}, expected ${position}`;
    if (pieceLength <= 0) return `empty piece at ${piece.offset}`;
    if (piece.kind === 'zero' && pieceLength > UINT32_MAX) return `zero piece of ${pieceLength} bytes`;
    position += pieceLength;
  }
  return position === offset + length ? undefined : `pieces end at ${position}, expected ${offset + length}`;
}

/**
 * Device extents as block-status descriptors: clipped to the request, neighbours with equal
 * flags merged, one extent for REQ_ONE, at most 2^20. A string says why the extents are bad.
 */
export function statusExtents(extents: readonly Extent[], offset: number, length: number, reqOne: boolean): StatusExtent[] | string {
  const end = offset + length;
  const result: StatusExtent[] = [];
  let position = offset;
  for (const extent of extents) {
    if (position >= end) break;
    if (extent.offset !== position) return `extent at ${extent.offset}, expected ${position}`;
    if (!(extent.length > 0)) return `empty extent at ${extent.offset}`;
    const lengthBytes = Math.min(extent.length, end - position);
    // [NBD: `base:allocation` metadata context] a hole always reads as zeros.
    const flags = (extent.hole ? STATE.HOLE | STATE.ZERO : 0) | (extent.zero ? STATE.ZERO : 0);
    const last = result[result.length - 1];
    if (last !== undefined && last.flags === flags) last.lengthBytes += lengthBytes;
    else if (result.length === BLOCK_STATUS_EXTENTS_MAX) break;
    else result.push({ lengthBytes, flags });
    position += lengthBytes;
    if (reqOne) break;
  }
  if (result.length === 0) return 'no extent at the requested offset';
  if (reqOne) result.length = 1;
  return result;
}
