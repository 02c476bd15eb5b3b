// Region math for the grant protocol (DESIGN.md §5b): a volume is cut into regions of one
// power-of-two size, and a write needs the grant of every region its byte range touches.
// Pure functions; the state machines take region indexes, never byte offsets.
import { MirrorsanError, assert } from '../errors.js';

/** The smallest region: one page, so a 4 KiB block write never straddles two regions needlessly. */
export const REGION_SIZE_MIN_BYTES = 4096;

/**
 * Checks a configured region size: a power of two, at least REGION_SIZE_MIN_BYTES. A power of
 * two keeps region boundaries aligned with every block size and makes the index a shift.
 */
export function validateRegionSize(regionSizeBytes: number): void {
  if (!Number.isSafeInteger(regionSizeBytes) || regionSizeBytes < REGION_SIZE_MIN_BYTES) {
    throw new MirrorsanError('CONFIG_INVALID', `region size must be an integer of at least ${REGION_SIZE_MIN_BYTES} bytes, got ${regionSizeBytes}`);
  }
  // Not (x & (x - 1)): bitwise operators truncate to 32 bits and region sizes may exceed 2 GiB.
  let size = regionSizeBytes;
  while (size > 1 && size % 2 === 0) size /= 2;
  if (size !== 1) throw new MirrorsanError('CONFIG_INVALID', `region size must be a power of two, got ${regionSizeBytes}`);
}

/**
 * Regions of a volume: at least one. Single-writer mode is regionSizeBytes >= volumeSizeBytes,
 * which gives exactly one region (the same protocol serialises whole-volume write priority).
 */
export function regionCount(volumeSizeBytes: number, regionSizeBytes: number): number {
  validateRegionSize(regionSizeBytes);
  assert(Number.isSafeInteger(volumeSizeBytes) && volumeSizeBytes > 0, `volume size must be a positive integer, got ${volumeSizeBytes}`);
  return Math.max(1, Math.ceil(volumeSizeBytes / regionSizeBytes));
}

/**
 * The regions a byte range touches, ascending (the order grants are acquired in, so that two
 * multi-region writers can never wait for each other in a cycle). `lengthBytes` >= 1.
 * `regionsMax` bounds the answer (a request longer than that many regions is a caller bug:
 * the volume layer splits requests at 32 MiB).
 */
export function regionsOf(offsetBytes: number, lengthBytes: number, regionSizeBytes: number, regionsMax = 1024): number[] {
  validateRegionSize(regionSizeBytes);
  assert(Number.isSafeInteger(offsetBytes) && offsetBytes >= 0, `offset must be a non-negative integer, got ${offsetBytes}`);
  assert(Number.isSafeInteger(lengthBytes) && lengthBytes >= 1, `length must be a positive integer, got ${lengthBytes}`);
  assert(Number.isSafeInteger(offsetBytes + lengthBytes), 'range end must be a safe integer');
  const first = Math.floor(offsetBytes / regionSizeBytes);
  const last = Math.floor((offsetBytes + lengthBytes - 1) / regionSizeBytes);
  assert(last - first + 1 <= regionsMax, `range ${offsetBytes}+${lengthBytes} touches ${last - first + 1} regions, more than ${regionsMax}`);
  const regions: number[] = [];
  for (let region = first; region <= last; region++) regions.push(region);
  return regions;
}

/** True when `regions` is strictly ascending non-negative integers: what acquire() requires. */
export function isAscendingRegions(regions: readonly number[]): boolean {
  for (let index = 0; index < regions.length; index++) {
    const region = regions[index]!;
    if (!Number.isSafeInteger(region) || region < 0) return false;
    if (index > 0 && region <= regions[index - 1]!) return false;
  }
  return regions.length > 0;
}
