// Human sizes for the CLI and config: "1GiB", "512MiB", "4096", "4k". Binary units only,
// because block devices are sized in powers of two and "GB" would silently mean 10^9.
import { MirrorsanError } from '../errors.js';

const UNIT_BYTES: Record<string, number> = {
  '': 1, b: 1,
  k: 1024, kb: 1024, kib: 1024,
  m: 1024 ** 2, mb: 1024 ** 2, mib: 1024 ** 2,
  g: 1024 ** 3, gb: 1024 ** 3, gib: 1024 ** 3,
  t: 1024 ** 4, tb: 1024 ** 4, tib: 1024 ** 4,
};

export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = match?.[2]?.toLowerCase();
  const multiplier = unit === undefined ? undefined : UNIT_BYTES[unit];
  if (!match || multiplier === undefined) {
    throw new MirrorsanError('SIZE_INVALID', `cannot parse size "${text}": use bytes or a unit such as 512MiB, 1GiB`);
  }
  const bytes = Number(match[1]) * multiplier;
  if (!Number.isSafeInteger(bytes)) {
    throw new MirrorsanError('SIZE_INVALID', `size "${text}" is not a whole number of bytes below 2^53`);
  }
  return bytes;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1 && value % 1024 === 0) {
    value /= 1024;
    unit++;
  }
  return `${value}${units[unit]}`;
}

/** A size for people, rounded to one decimal in the largest fitting unit: "180.5MiB". */
export function formatSizeApprox(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = Math.max(0, bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${Math.round(value)}B` : `${value.toFixed(1)}${units[unit]}`;
}
