// Helpers shared by the policing unit tests (not a test file itself).
import type { PolicingMessage } from './messages.js';

export const VOLUME = 'vol';

/** Wraps a state machine so that its invariants are asserted after every call a test makes. */
export function checkedAfterEveryCall<T extends { assertInvariants(): void }>(target: T): T {
  return new Proxy(target, {
    get(object, key) {
      const value: unknown = Reflect.get(object, key, object);
      if (typeof value !== 'function' || key === 'assertInvariants') return value;
      return (...args: unknown[]) => {
        const result: unknown = value.apply(object, args);
        object.assertInvariants();
        return result;
      };
    },
  });
}

/** A grant message for VOLUME (GRANT_REFUSED always carries generation 0). */
export function message(type: Exclude<PolicingMessage['type'], 'DRAINED'>, region: number, generation: number, epoch = 1): PolicingMessage {
  return type === 'GRANT_REFUSED' ? { type, volume: VOLUME, epoch, region, generation: 0 } : { type, volume: VOLUME, epoch, region, generation };
}
