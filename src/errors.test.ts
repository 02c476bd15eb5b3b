// Proves that every stable error code is documented in docs/errors.md, so operators can look up what they see in a log.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ERROR_CODES, MirrorsanError, isMirrorsanError } from './errors.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

test('every error code has a row in docs/errors.md', () => {
  const doc = fs.readFileSync(path.join(repoRoot, 'docs', 'errors.md'), 'utf8');
  const missing = Object.keys(ERROR_CODES).filter((code) => !doc.includes(`| \`${code}\` |`));
  assert.deepEqual(missing, [], `document these codes in docs/errors.md: ${missing.join(', ')}`);
});

test('MirrorsanError carries its code and is recognised by isMirrorsanError', () => {
  const error = new MirrorsanError('NBD_EINVAL', 'read past the end');
  assert.equal(error.code, 'NBD_EINVAL');
  assert.ok(isMirrorsanError(error, 'NBD_EINVAL'));
  assert.ok(!isMirrorsanError(error, 'NBD_EIO'));
  assert.ok(!isMirrorsanError(new Error('plain')));
});
