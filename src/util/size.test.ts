// Proves that sizes parse in binary units, reject garbage with SIZE_INVALID, and format back.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import { formatSize, formatSizeApprox, parseSize } from './size.js';

test('parses bytes and binary units', () => {
  assert.equal(parseSize('4096'), 4096);
  assert.equal(parseSize('512MiB'), 512 * 1024 * 1024);
  assert.equal(parseSize('1GiB'), 1024 ** 3);
  assert.equal(parseSize('1g'), 1024 ** 3);
  assert.equal(parseSize('2TiB'), 2 * 1024 ** 4);
  assert.equal(parseSize('1.5KiB'), 1536);
});

test('rejects what is not a size', () => {
  for (const text of ['', 'abc', '1XB', '-1', '1.3', '1e3', '99999999999TiB']) {
    assert.throws(() => parseSize(text), (error: unknown) => isMirrorsanError(error, 'SIZE_INVALID'), text);
  }
});

test('formats whole binary units', () => {
  assert.equal(formatSize(1024 ** 3), '1GiB');
  assert.equal(formatSize(1536), '1536B');
  assert.equal(formatSize(512 * 1024 * 1024), '512MiB');
});

test('formatSizeApprox rounds to one decimal in the largest unit', () => {
  assert.equal(formatSizeApprox(0), '0B');
  assert.equal(formatSizeApprox(1023), '1023B');
  assert.equal(formatSizeApprox(189_234_567), '180.5MiB');
  assert.equal(formatSizeApprox(64 * 1024 ** 3), '64.0GiB');
});
