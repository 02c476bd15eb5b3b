// CRC32C (Castagnoli) in native code: every log entry and replication frame is checked
// with it (invariant I5), so it sits on the hot path and must not be JavaScript.
import { crc32c as nativeCrc32c } from '@node-rs/crc32';

export function crc32c(data: Uint8Array, initial = 0): number {
  return nativeCrc32c(data, initial) >>> 0;
}
