// `mirrorsan attach VOLUME --listen unix:PATH|HOST:PORT --nodes nbd://h:p,...`: a local NBD
// endpoint for any NBD client that forwards to the nodes and fails over between them
// (src/attach/attach.ts), until SIGINT/SIGTERM.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FailoverDevice, describeTarget } from '../attach/attach.js';
import { MirrorsanError } from '../errors.js';
import type { NbdTarget } from '../nbd/client.js';
import { StaticExportRegistry } from '../nbd/registry.js';
import { NbdServer, type NbdListenTarget } from '../nbd/server.js';
import { createLogger } from '../util/log.js';

export interface AttachCommandOptions {
  listen: string;
  nodes: string;
  failoverTimeout: string;
  requestTimeout: string;
  json?: boolean;
}

const NBD_DEFAULT_PORT = 10809;

/** `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`; the export, if given, must be VOLUME. */
export function parseNodeUri(text: string, volume: string): NbdTarget {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new MirrorsanError('CONFIG_INVALID', `--nodes: ${text} is not a URI (want nbd://HOST:PORT)`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  if (exportName !== '' && exportName !== volume) {
    throw new MirrorsanError('CONFIG_INVALID', `--nodes: ${text} names export ${exportName}, not the volume ${volume}`);
  }
  if (url.protocol === 'nbd+unix:') {
    const socket = url.searchParams.get('socket');
    if (socket === null || socket === '') throw new MirrorsanError('CONFIG_INVALID', `--nodes: ${text} lacks ?socket=PATH`);
    return { path: socket };
  }
  if (url.protocol !== 'nbd:') throw new MirrorsanError('CONFIG_INVALID', `--nodes: ${text} is not an nbd:// URI (TLS is not supported by attach yet)`);
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  if (host === '') throw new MirrorsanError('CONFIG_INVALID', `--nodes: ${text} has no host`);
  return { host, port: url.port === '' ? NBD_DEFAULT_PORT : Number(url.port) };
}

/** `unix:PATH` or `HOST:PORT` (`[v6]:PORT`). */
export function parseListen(text: string): NbdListenTarget {
  if (text.startsWith('unix:')) {
    const socketPath = text.slice('unix:'.length);
    if (socketPath === '') throw new MirrorsanError('CONFIG_INVALID', '--listen unix: needs a path');
    return { path: path.resolve(socketPath) };
  }
  const colon = text.lastIndexOf(':');
  const port = Number(text.slice(colon + 1));
  const host = text.slice(0, Math.max(colon, 0)).replace(/^\[(.*)\]$/, '$1');
  if (colon <= 0 || !Number.isInteger(port) || port < 0 || port > 65535 || host === '') {
    throw new MirrorsanError('CONFIG_INVALID', `--listen ${text}: want unix:PATH or HOST:PORT`);
  }
  return { host, port };
}

/** `60s`, `1500ms`, `2m` or milliseconds; `option` names the flag in errors. */
export function parseDurationMs(text: string, option = '--failover-timeout'): number {
  const match = /^(\d+)\s*(ms|s|m)?$/.exec(text.trim());
  if (!match) throw new MirrorsanError('CONFIG_INVALID', `${option} ${text}: want e.g. 60s, 1500ms`);
  const value = Number(match[1]);
  const ms = match[2] === 's' ? value * 1000 : match[2] === 'm' ? value * 60_000 : value;
  if (!Number.isSafeInteger(ms) || ms <= 0) throw new MirrorsanError('CONFIG_INVALID', `${option} ${text} must be positive`);
  return ms;
}

/** A socket file left by a killed attach is taken over; one that still answers is refused. */
async function clearStaleSocket(socketPath: string): Promise<void> {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(socketPath);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw new MirrorsanError('CONFIG_INVALID', `--listen: ${socketPath} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect({ path: socketPath });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new MirrorsanError('CONFIG_INVALID', `--listen: something is already listening on ${socketPath}`);
  fs.rmSync(socketPath, { force: true });
}

export async function runAttachCommand(volume: string, options: AttachCommandOptions): Promise<void> {
  const logger = createLogger({ component: 'attach' });
  const nodes = options.nodes
    .split(',')
    .map((text) => text.trim())
    .filter((text) => text !== '')
    .map((text) => parseNodeUri(text, volume));
  if (nodes.length === 0) throw new MirrorsanError('CONFIG_INVALID', '--nodes lists no node');
  const listen = parseListen(options.listen);
  const failoverTimeoutMs = parseDurationMs(options.failoverTimeout);
  const requestTimeoutMs = parseDurationMs(options.requestTimeout, '--request-timeout');
  if ('path' in listen) await clearStaleSocket(listen.path);

  const device = await FailoverDevice.open({ name: volume, nodes, logger, failoverTimeoutMs, requestTimeoutMs });
  const server = new NbdServer({ registry: new StaticExportRegistry([device]), logger });
  const address = await server.listen(listen);

  let shuttingDown = false;
  const shutdown = (signal: string): void => {
    if (shuttingDown) return;
    shuttingDown = true;
    logger.info('shutting down', { signal, ...device.stats() });
    server
      .close({ graceMs: 5_000 })
      .then(() => device.close())
      .then(() => process.exit(0))
      .catch((error: unknown) => {
        logger.error('shutdown failed', { error: String(error) });
        process.exit(1);
      });
  };
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.on('SIGTERM', () => shutdown('SIGTERM'));

  const ready =
    address.kind === 'unix'
      ? { listen: `unix:${address.path}`, nbd: `nbd+unix:///${encodeURIComponent(volume)}?socket=${address.path}` }
      : {
          listen: `${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`,
          nbd: `nbd://${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}/${encodeURIComponent(volume)}`,
        };
  logger.info('ready', { ...ready, nodes: nodes.map(describeTarget).join(','), failoverTimeoutMs, requestTimeoutMs });
  if (options.json) process.stdout.write(JSON.stringify(ready) + '\n');
}
