// Test fixture (not a test): a process that writes to a LocalVolume until it is SIGKILLed.
// Usage: node local-volume.crash-child.js DIR SIZE_BYTES
// Write i goes to block i (4 KiB, content crashPattern(i)), sixteen at a time; after every
// fifth round it flushes and prints "flushed N": writes 0..N-1 were acknowledged before that
// flush completed, so they must survive the kill. No checkpoint runs, so recovery replays.
import { createLogger } from '../util/log.js';
import { LocalVolume } from './local-volume.js';

export const CRASH_BLOCK_BYTES = 4096;

export function crashPattern(index: number): Buffer {
  const data = Buffer.alloc(CRASH_BLOCK_BYTES, (index * 7 + 1) & 0xff);
  data.writeUInt32LE(index, 0);
  data.writeUInt32LE(0xc0ffee, CRASH_BLOCK_BYTES - 4);
  return data;
}

async function main(): Promise<void> {
  const [dir, sizeText] = process.argv.slice(2);
  if (!dir || !sizeText) throw new Error('usage: crash-child DIR SIZE_BYTES');
  const sizeBytes = Number(sizeText);
  const volume = await LocalVolume.open({
    dir,
    name: 'crash',
    sizeBytes,
    logger: createLogger({ level: 'warn' }),
    checkpointIntervalMs: 0,
    checkpointLogBytes: 1024 * 1024 * 1024,
  });
  const blocks = sizeBytes / CRASH_BLOCK_BYTES;
  let next = 0;
  for (let round = 1; next < blocks; round++) {
    const batch: Promise<void>[] = [];
    for (let i = 0; i < 16 && next < blocks; i++, next++) {
      batch.push(volume.write(next * CRASH_BLOCK_BYTES, crashPattern(next), { fua: false }));
    }
    await Promise.all(batch);
    if (round % 5 === 0) {
      const acknowledged = next;
      await volume.flush();
      process.stdout.write(`flushed ${acknowledged}\n`);
    }
  }
  process.stdout.write('done\n');
  // Wait to be killed: never close (that would checkpoint).
  setInterval(() => undefined, 1000);
}

// Only when run as a script, not when a test imports crashPattern.
if (process.argv[1]?.endsWith('local-volume.crash-child.js')) {
  main().catch((error: unknown) => {
    process.stderr.write(`crash-child: ${String(error)}\n`);
    process.exit(1);
  });
}
