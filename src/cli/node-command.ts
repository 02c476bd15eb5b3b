// `mirrorsan node --config FILE`: one node in the foreground. Refuses to start a second
// process on the same data directory (two writers on one log would corrupt it).
import fs from 'node:fs';
import path from 'node:path';
import { MirrorsanError } from '../errors.js';
import { parseNodeConfig } from '../node/config.js';
import { MirrorsanNode } from '../node/node.js';
import { createLogger } from '../util/log.js';

export function readNodeConfigFile(configPath: string) {
  let text: string;
  try {
    text = fs.readFileSync(configPath, 'utf8');
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `cannot read config ${configPath}: ${(error as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    throw new MirrorsanError('CONFIG_INVALID', `config ${configPath} is not valid JSON: ${(error as Error).message}`);
  }
  return parseNodeConfig(raw);
}

function processIsAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Claims DATA_DIR/node.pid; a stale file from a killed process is taken over. */
function claimPidFile(dataDir: string): string {
  const pidPath = path.join(dataDir, 'node.pid');
  try {
    const previous = Number(fs.readFileSync(pidPath, 'utf8').trim());
    if (Number.isInteger(previous) && previous > 0 && previous !== process.pid && processIsAlive(previous)) {
      throw new MirrorsanError('CONFIG_INVALID', `another node process (pid ${previous}) is running on ${dataDir}`);
    }
  } catch (error) {
    if (error instanceof MirrorsanError) throw error;
  }
  fs.writeFileSync(pidPath, `${process.pid}\n`);
  return pidPath;
}

export async function runNodeCommand(options: { config: string; json?: boolean }): Promise<void> {
  const configPath = path.resolve(options.config);
  const config = readNodeConfigFile(configPath);
  const logger = createLogger({ component: `node ${config.id}` });
  fs.mkdirSync(config.dataDir, { recursive: true });
  const pidPath = claimPidFile(config.dataDir);
  const node = new MirrorsanNode(config, configPath, logger);
  let shuttingDown = false;
  const shutdown = (signal: string): void => {
    if (shuttingDown) return;
    shuttingDown = true;
    logger.info('shutting down', { signal });
    node
      .stop()
      .then(() => {
        fs.rmSync(pidPath, { force: true });
        process.exit(0);
      })
      .catch((error: unknown) => {
        logger.error('shutdown failed', { error: String(error) });
        process.exit(1);
      });
  };
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  const info = await node.start();
  if (options.json) process.stdout.write(JSON.stringify({ nodes: [info] }) + '\n');
}
