// Fault injection for tests (issue 5: "a fault-injection hook in the store, enabled only by test
// configuration"). A node builds a FaultSwitch only when its config says `faultInjection: true`
// or its environment has MIRRORSAN_FAULT_INJECTION=1; then, and only then, the admin API takes
// `POST /v1/faults` (make the image writes of one volume, or of every volume, fail with EIO or
// ENOSPC) and `DELETE /v1/faults` (clear). Without it the hooks are never installed in any
// store and the endpoint answers 403 FAULT_INJECTION_DISABLED.
import { MirrorsanError } from '../errors.js';
import type { ImageFaults, InjectedErrno } from '../store/image.js';

/** The environment variable that enables fault injection (for test clusters started by `up`). */
export const FAULT_INJECTION_ENV = 'MIRRORSAN_FAULT_INJECTION';

/** Faults one node holds at once (one per volume plus one for all). */
const FAULTS_MAX = 256;

export interface InjectedFault {
  /** The volume whose store fails; null: every volume on this node. */
  volume: string | null;
  /** What fails: the image's writes (data, zeros, punched holes). */
  target: 'image-writes';
  errno: InjectedErrno;
}

/** Whether this node may inject faults: the config field, or MIRRORSAN_FAULT_INJECTION=1. */
export function faultInjectionEnabled(config: { faultInjection?: boolean }, env: NodeJS.ProcessEnv): boolean {
  return config.faultInjection === true || env[FAULT_INJECTION_ENV] === '1';
}

/** Validates a `POST /v1/faults` body: `{"volume"?: NAME, "target"?: "image-writes", "errno": "EIO"|"ENOSPC"}`. */
export function parseFaultRequest(body: unknown): InjectedFault {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new MirrorsanError('CONFIG_INVALID', 'a fault is a JSON object');
  const fields = body as Record<string, unknown>;
  const unknown = Object.keys(fields).filter((key) => !['volume', 'target', 'errno'].includes(key));
  if (unknown.length > 0) throw new MirrorsanError('CONFIG_INVALID', `unknown fault fields: ${unknown.join(', ')}`);
  const volume = fields.volume ?? null;
  if (volume !== null && (typeof volume !== 'string' || volume.length === 0)) throw new MirrorsanError('CONFIG_INVALID', 'fault volume must be a volume name');
  const target = fields.target ?? 'image-writes';
  if (target !== 'image-writes') throw new MirrorsanError('CONFIG_INVALID', `fault target ${JSON.stringify(target)}: only "image-writes" is supported`);
  const errno = fields.errno ?? 'EIO';
  if (errno !== 'EIO' && errno !== 'ENOSPC') throw new MirrorsanError('CONFIG_INVALID', `fault errno ${JSON.stringify(errno)}: "EIO" or "ENOSPC"`);
  return { volume, target, errno };
}

/** The faults injected on this node now; stores ask it before each image write. */
export class FaultSwitch {
  private readonly faults = new Map<string | null, InjectedFault>();
  private injectedCount = 0;

  set(fault: InjectedFault): void {
    if (!this.faults.has(fault.volume) && this.faults.size >= FAULTS_MAX) throw new MirrorsanError('CONFIG_INVALID', `at most ${FAULTS_MAX} faults at once`);
    this.faults.set(fault.volume, fault);
  }

  /** Clears the fault of `volume` (and the one for every volume), or all of them. */
  clear(volume?: string): void {
    if (volume === undefined) {
      this.faults.clear();
      return;
    }
    this.faults.delete(volume);
    this.faults.delete(null);
  }

  list(): InjectedFault[] {
    return [...this.faults.values()];
  }

  /** Writes failed by an injected fault so far. */
  get injected(): number {
    return this.injectedCount;
  }

  /** The hook a volume's store is opened with (it looks the fault up at every write). */
  imageFaults(volume: string): ImageFaults {
    return {
      failImageWrites: () => {
        const fault = this.faults.get(volume) ?? this.faults.get(null);
        if (!fault) return false;
        this.injectedCount++;
        return fault.errno;
      },
    };
  }
}
