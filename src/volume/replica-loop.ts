// Test fixture (not a test): replicated volumes of one process joined by an in-memory
// transport with the delivery rules of the node's peer links (FIFO per ordered pair, one event
// loop turn later, links that can be cut, restored and redialled), and small helpers the
// volume tests share.
import path from 'node:path';
import type { PeerMessage } from '../replication/peer-link.js';
import { createLogger, type Logger } from '../util/log.js';
import { ReplicatedVolume, type ReplicaTransport, type ReplicatedVolumeOptions } from './replicated-volume.js';

export const LOOP_NODES = ['n1', 'n2', 'n3'] as const;

/** FIFO delivery per ordered pair, one event-loop turn later; links can be cut and restored. */
export class Loop {
  readonly volumes = new Map<string, ReplicatedVolume>();
  private readonly cut = new Set<string>();
  private timer: NodeJS.Timeout | undefined;

  transport(self: string): ReplicaTransport {
    const deliver = (to: string, message: PeerMessage): boolean => {
      if (this.cut.has(pairKey(self, to)) || !this.volumes.has(to) || !this.volumes.has(self)) return false;
      setImmediate(() => {
        if (this.cut.has(pairKey(self, to))) return;
        this.volumes.get(to)?.receive(self, message);
      });
      return true;
    };
    // A redial: the link goes down and up again, and the peer's target re-announces its position.
    const resetOutbound = (peer: string): void => {
      setImmediate(() => {
        if (this.cut.has(pairKey(self, peer)) || !this.volumes.has(peer) || !this.volumes.has(self)) return;
        this.volumes.get(self)!.outboundDown(peer);
        this.up(self, peer);
      });
    };
    return { sendToPeer: deliver, answerSource: deliver, resetInbound: () => undefined, resetOutbound };
  }

  /** Both connections between every pair come up (dialer side first, as over TCP). */
  connectAll(): void {
    for (const a of LOOP_NODES) for (const b of LOOP_NODES) if (a !== b) this.up(a, b);
    this.timer = setInterval(() => {
      const now = Math.floor(performance.now());
      for (const volume of this.volumes.values()) volume.tick(now);
    }, 20);
  }

  /** `a`'s connection to `b` (a dialled) comes up. */
  up(a: string, b: string): void {
    this.volumes.get(a)!.outboundUp(b);
    this.volumes.get(b)!.inboundUp(a);
  }

  sever(a: string, b: string): void {
    this.cut.add(pairKey(a, b));
    this.cut.add(pairKey(b, a));
    this.volumes.get(a)!.outboundDown(b);
    this.volumes.get(b)!.outboundDown(a);
  }

  heal(a: string, b: string): void {
    this.cut.delete(pairKey(a, b));
    this.cut.delete(pairKey(b, a));
    this.up(a, b);
    this.up(b, a);
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    for (const volume of this.volumes.values()) await volume.close();
    this.volumes.clear();
  }
}

function pairKey(from: string, to: string): string {
  return `${from}>${to}`;
}

/**
 * Volume `vol` of `sizeBytes` on n1, n2 and n3 (stores in ROOT/nN), all in sync at epoch 1 with
 * n1 arbitrating unless `options` says otherwise, over a new Loop whose links are all up.
 */
export async function openLoopCluster(
  root: string,
  sizeBytes: number,
  options: (self: string, loop: Loop) => Partial<ReplicatedVolumeOptions> = () => ({}),
  logger: Logger = createLogger({ level: 'error' }),
): Promise<Loop> {
  const loop = new Loop();
  for (const self of LOOP_NODES) {
    const volume = await ReplicatedVolume.open({
      name: 'vol',
      sizeBytes,
      dir: path.join(root, self),
      self,
      membership: { epoch: 1, replicas: [...LOOP_NODES], inSync: [...LOOP_NODES], arbiter: 'n1' },
      transport: loop.transport(self),
      logger: logger.child(self),
      ...options(self, loop),
    });
    loop.volumes.set(self, volume);
  }
  loop.connectAll();
  return loop;
}

/** A range as a client reads it (holes as zeros). */
export async function readBytes(volume: { read: ReplicatedVolume['read'] }, offset: number, length: number): Promise<Buffer> {
  const pieces = await volume.read(offset, length);
  return Buffer.concat(pieces.map((piece) => (piece.kind === 'data' ? piece.data : Buffer.alloc(piece.length))));
}

export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([promise, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms).unref())]);
}
