// What a device that forwards to another NBD server (attach's FailoverDevice, a diskless
// volume's ForwardingDevice) does with each BlockDevice call: it becomes one Operation, queued
// by the device's own `submit` (which decides where, when and how often it is sent), and
// `issueOperation` turns an Operation into the NbdClient call that carries it.
import { assert } from '../errors.js';
import type { DeviceGeometry, Extent, ReadPiece, WriteOptions, ZeroOptions } from '../volume/device.js';
import { NbdClientError, type NbdClient } from './client.js';
import { ERRNO } from './protocol.js';

export type Operation =
  | { kind: 'read'; offset: number; length: number }
  | { kind: 'write'; offset: number; data: Buffer; fua: boolean }
  | { kind: 'zero'; offset: number; length: number; options: ZeroOptions }
  | { kind: 'trim'; offset: number; length: number; fua: boolean }
  | { kind: 'flush' }
  | { kind: 'cache'; offset: number; length: number };

/** Sends `operation` on `client`; resolves with the data of a READ, undefined otherwise. */
export function issueOperation(client: NbdClient, operation: Operation): Promise<Buffer | undefined> {
  switch (operation.kind) {
    case 'read':
      return client.read(operation.offset, operation.length);
    case 'write':
      return client.write(operation.offset, operation.data, { fua: operation.fua }).then(() => undefined);
    case 'zero':
      // [NBD: NBD_CMD_FLAG_FAST_ZERO] a server that cannot zero fast says so without trying.
      if (operation.options.fastZero && !client.canFastZero) {
        return Promise.reject(new NbdClientError('the server cannot zero fast', { nbdError: ERRNO.ENOTSUP }));
      }
      return client
        .writeZeroes(operation.offset, operation.length, { fua: operation.options.fua, noHole: !operation.options.mayTrim, fastZero: operation.options.fastZero })
        .then(() => undefined);
    case 'trim':
      return client.trim(operation.offset, operation.length, { fua: operation.fua }).then(() => undefined);
    case 'flush':
      return client.flush().then(() => undefined);
    case 'cache':
      // A hint: a server that does not take it loses nothing.
      return client.canCache ? client.cache(operation.offset, operation.length).then(() => undefined) : Promise.resolve(undefined);
  }
}

/** The BlockDevice data calls of a forwarding device, each one Operation through `submit`. */
export abstract class ForwardingBlockDevice {
  protected abstract submit(operation: Operation): Promise<Buffer | undefined>;
  abstract geometry(): DeviceGeometry;

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const data = await this.submit({ kind: 'read', offset, length });
    assert(data !== undefined && data.length === length, 'a forwarded READ answered without its data');
    // Holes are not worth a BLOCK_STATUS round trip here: the client asked for the bytes.
    return [{ offset, kind: 'data', data }];
  }

  async write(offset: number, data: Buffer, options: WriteOptions): Promise<void> {
    await this.submit({ kind: 'write', offset, data, fua: options.fua });
  }

  async writeZeroes(offset: number, length: number, options: ZeroOptions): Promise<void> {
    await this.submit({ kind: 'zero', offset, length, options });
  }

  async trim(offset: number, length: number, options: WriteOptions): Promise<void> {
    await this.submit({ kind: 'trim', offset, length, fua: options.fua });
  }

  async flush(): Promise<void> {
    await this.submit({ kind: 'flush' });
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.submit({ kind: 'cache', offset, length });
  }

  /**
   * The BlockDevice contract makes block status synchronous, so the server cannot be asked: the
   * range is reported as allocated data, which is always true enough (a client then reads what
   * it could have skipped; nothing reads wrong).
   */
  blockStatus(offset: number, length: number): Extent[] {
    return [{ offset, length: Math.max(1, Math.min(length, this.geometry().sizeBytes - offset)), hole: false, zero: false }];
  }
}
