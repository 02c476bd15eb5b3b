// Picks a coordinator backend from a URL, so a node's configuration holds one string:
//   embedded:///abs/path/to/dir              the nodes of one host share that directory
//   etcd://host:port[,host:port...][/cluster] an etcd cluster; keys under /mirrorsan/<cluster>/
import { MirrorsanError } from '../errors.js';
import type { Logger } from '../util/log.js';
import { isSafeName } from './coordinator.js';
import type { Coordinator } from './coordinator.js';
import { EmbeddedCoordinator } from './embedded.js';

export * from './coordinator.js';
export { EmbeddedCoordinator } from './embedded.js';
export type { EmbeddedCoordinatorOptions } from './embedded.js';
export type { EtcdCoordinatorOptions } from './etcd.js';

export const DEFAULT_CLUSTER_ID = 'default';

export type CoordinatorUrl =
  | { backend: 'embedded'; dir: string }
  | { backend: 'etcd'; hosts: string[]; clusterId: string };

function invalid(url: string, why: string): never {
  throw new MirrorsanError('CONFIG_INVALID', `coordinator URL ${JSON.stringify(url)}: ${why}`);
}

export function parseCoordinatorUrl(url: string): CoordinatorUrl {
  const embedded = /^embedded:\/\/(\/.*)$/.exec(url) ?? /^embedded:(\/[^/].*)$/.exec(url);
  if (embedded?.[1] !== undefined) {
    let dir: string;
    try {
      dir = decodeURIComponent(embedded[1]);
    } catch {
      return invalid(url, 'the path is not valid percent-encoding');
    }
    if (dir.length < 2) invalid(url, 'the directory must not be /');
    return { backend: 'embedded', dir };
  }
  const etcd = /^etcd:\/\/([^/]+)(?:\/([^/]*))?$/.exec(url);
  if (etcd?.[1] !== undefined) {
    const hosts = etcd[1].split(',');
    for (const host of hosts) {
      const match = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(host);
      if (!match || Number(match[2]) < 1 || Number(match[2]) > 65535) invalid(url, `"${host}" is not host:port`);
    }
    const clusterId = etcd[2] === undefined || etcd[2] === '' ? DEFAULT_CLUSTER_ID : etcd[2];
    if (!isSafeName(clusterId)) invalid(url, `cluster id "${clusterId}" must be letters, digits, '.', '_', '-'`);
    return { backend: 'etcd', hosts, clusterId };
  }
  return invalid(url, 'use embedded:///absolute/dir or etcd://host:port[,host:port][/cluster]');
}

export async function createCoordinator(url: string, options: { logger?: Logger } = {}): Promise<Coordinator> {
  const parsed = parseCoordinatorUrl(url);
  if (parsed.backend === 'embedded') {
    return EmbeddedCoordinator.open({ dir: parsed.dir, ...(options.logger ? { logger: options.logger } : {}) });
  }
  // Loaded only when asked for: the etcd client's gRPC stack installs async hooks that make
  // every promise and buffer allocation in the process slower (measured: 1 MiB NBD reads at
  // half speed in a node that merely imported it).
  const { EtcdCoordinator } = await import('./etcd.js');
  return new EtcdCoordinator({
    hosts: parsed.hosts,
    clusterId: parsed.clusterId,
    ...(options.logger ? { logger: options.logger } : {}),
  });
}
