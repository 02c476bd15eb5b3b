#!/usr/bin/env node
// Entry point of the `mirrorsan` command. CommonJS on purpose: libuv sizes its thread pool
// (all file I/O runs there) on first use, and Node's ES module loader already uses it, so
// UV_THREADPOOL_SIZE must be set before the first ES module loads. A node's config may name
// a size (threadPoolSize); otherwise 16, enough for log appends, image writes and fsyncs
// to overlap on a small machine.
'use strict';
const fs = require('node:fs');
const path = require('node:path');

if (process.env.UV_THREADPOOL_SIZE === undefined) {
  let size = 16;
  const configIndex = process.argv.indexOf('--config');
  const configPath = configIndex > 0 ? process.argv[configIndex + 1] : undefined;
  if (configPath) {
    try {
      const parsed = JSON.parse(fs.readFileSync(configPath, 'utf8'));
      if (Number.isInteger(parsed.threadPoolSize)) size = parsed.threadPoolSize;
    } catch {
      // The command itself reports an unreadable config with a proper error.
    }
  }
  process.env.UV_THREADPOOL_SIZE = String(size);
}

import(path.join(__dirname, '..', 'dist', 'src', 'cli', 'main.js')).catch((error) => {
  process.stderr.write(`mirrorsan: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
