// A raw TCP client for feeding a server bytes no real client would send: read exact byte
// counts, write anything, and learn whether (and how soon) the server closed on us.
import net from 'node:net';

export class RawConnection {
  readonly socket: net.Socket;
  private buffered: Buffer = Buffer.alloc(0);
  private closedFlag = false;
  private waiters = new Set<() => void>();

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      this.wake();
    });
    // A reset counts as closed: either way the server ended the connection.
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closedFlag = true;
      this.wake();
    });
  }

  static async connect(port: number, host = '127.0.0.1'): Promise<RawConnection> {
    return await new Promise((resolve, reject) => {
      const socket = net.connect({ port, host });
      socket.once('connect', () => resolve(new RawConnection(socket)));
      socket.once('error', reject);
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  private wake(): void {
    for (const waiter of this.waiters) waiter();
  }

  private async waitFor(ready: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (ready()) return;
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (!ready()) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.add(check);
    });
  }

  /** Reads exactly `length` bytes; throws if the server closes first. */
  async read(length: number, timeoutMs = 5000): Promise<Buffer> {
    await this.waitFor(() => this.buffered.length >= length || this.closedFlag, timeoutMs, `${length} bytes`);
    if (this.buffered.length < length) throw new Error(`server closed after ${this.buffered.length} of ${length} bytes`);
    const out = this.buffered.subarray(0, length);
    this.buffered = this.buffered.subarray(length);
    return Buffer.from(out);
  }

  write(data: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data);
  }

  /** Resolves true once the server closed the connection, false if it is still open after timeoutMs. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    try {
      // Drain whatever the server sends meanwhile (e.g. an error reply before the close).
      await this.waitFor(() => this.closedFlag, timeoutMs, 'close');
      return true;
    } catch {
      return false;
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** NBD handshake constants ([NBD: newstyle negotiation]). */
export const NBD = {
  NBDMAGIC: 0x4e42444d41474943n,
  IHAVEOPT: 0x49484156454f5054n,
  OPT_REPLY_MAGIC: 0x0003e889045565a9n,
  REQUEST_MAGIC: 0x25609513,
  SIMPLE_REPLY_MAGIC: 0x67446698,
  OPT_GO: 7,
  REP_ACK: 1,
  REP_INFO: 3,
  CLIENT_FIXED_NEWSTYLE: 1,
  CLIENT_NO_ZEROES: 2,
  CMD_READ: 0,
  CMD_DISC: 2,
} as const;

export function optionRequest(option: number, data: Buffer): Buffer {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(NBD.IHAVEOPT, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

/** Reads the greeting, sends flags, and completes OPT_GO for `exportName`; returns the export size. */
export async function negotiateToTransmission(conn: RawConnection, exportName: string): Promise<{ sizeBytes: bigint; transmissionFlags: number }> {
  const greeting = await conn.read(18);
  if (greeting.readBigUInt64BE(0) !== NBD.NBDMAGIC || greeting.readBigUInt64BE(8) !== NBD.IHAVEOPT) {
    throw new Error(`bad greeting ${greeting.toString('hex')}`);
  }
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(NBD.CLIENT_FIXED_NEWSTYLE | NBD.CLIENT_NO_ZEROES);
  conn.write(flags);
  const name = Buffer.from(exportName);
  const goData = Buffer.alloc(4 + name.length + 2);
  goData.writeUInt32BE(name.length, 0);
  name.copy(goData, 4);
  goData.writeUInt16BE(0, 4 + name.length);
  conn.write(optionRequest(NBD.OPT_GO, goData));
  let sizeBytes = -1n;
  let transmissionFlags = 0;
  for (let replies = 0; replies < 64; replies++) {
    const header = await conn.read(20);
    if (header.readBigUInt64BE(0) !== NBD.OPT_REPLY_MAGIC) throw new Error(`bad option reply magic ${header.toString('hex')}`);
    const type = header.readUInt32BE(12);
    const payload = await conn.read(header.readUInt32BE(16));
    if (type === NBD.REP_ACK) {
      if (sizeBytes < 0n) throw new Error('OPT_GO acknowledged without NBD_INFO_EXPORT');
      return { sizeBytes, transmissionFlags };
    }
    if (type === NBD.REP_INFO && payload.readUInt16BE(0) === 0) {
      sizeBytes = payload.readBigUInt64BE(2);
      transmissionFlags = payload.readUInt16BE(10);
    } else if (type >= 0x80000000) {
      throw new Error(`OPT_GO refused with reply type 0x${type.toString(16)}: ${payload.toString()}`);
    }
  }
  throw new Error('OPT_GO: too many replies');
}

export function request(type: number, cookie: bigint, offset: bigint, length: number, flags = 0, magic: number = NBD.REQUEST_MAGIC): Buffer {
  const buf = Buffer.alloc(28);
  buf.writeUInt32BE(magic, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeBigUInt64BE(cookie, 8);
  buf.writeBigUInt64BE(offset, 16);
  buf.writeUInt32BE(length, 24);
  return buf;
}
