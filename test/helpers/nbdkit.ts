// nbdkit as a reference server: the benchmark baseline, and a stand-in for mirrorsan when
// the suites themselves are being checked (MIRRORSAN_TEST_SERVER=nbdkit).
import { ManagedProcess } from './process.js';
import { pickBasePort, waitForPort } from './ports.js';
import type { TlsFixture } from './tls.js';

export interface NbdkitServer {
  port: number;
  process: ManagedProcess;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(exportName?: string): string;
  stop(): Promise<void>;
}

export interface NbdkitOptions {
  /** Plugin and its parameters, e.g. ['file', '/tmp/x.img'] or ['memory', '64M']. */
  plugin: readonly string[];
  /** Serve only this export name (with --list showing it), like mirrorsan does. */
  exportName?: string;
  tls?: { fixture: TlsFixture; required: boolean };
  /** Reuse this port (restart after a kill); otherwise a random free one. */
  port?: number;
  filters?: readonly string[];
  /** KEY=VALUE parameters for the filters, appended after the plugin's. */
  pluginArgs?: readonly string[];
  readyTimeoutMs?: number;
}

export async function startNbdkit(options: NbdkitOptions): Promise<NbdkitServer> {
  const maxAttempts = options.port === undefined ? 4 : 1;
  let lastError: unknown;
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    const port = options.port ?? (await pickBasePort([0]));
    const args = ['--exit-with-parent', '-f', '-i', '127.0.0.1', '-p', String(port)];
    if (options.tls) {
      args.push(`--tls=${options.tls.required ? 'require' : 'on'}`, `--tls-certificates=${options.tls.fixture.dir}`);
    }
    for (const filter of options.filters ?? []) args.push(`--filter=${filter}`);
    if (options.exportName !== undefined) args.push('--filter=exportname');
    args.push(...options.plugin, ...(options.pluginArgs ?? []));
    if (options.exportName !== undefined) {
      args.push(`exportname=${options.exportName}`, 'exportname-list=explicit', 'exportname-strict=true', `default-export=${options.exportName}`);
    }
    const server = new ManagedProcess('nbdkit', args);
    try {
      await waitForPort(port, options.readyTimeoutMs ?? 10_000, () => server.running);
    } catch (error) {
      await server.stop('SIGKILL');
      lastError = new Error(`${(error as Error).message}\n${server.describeOutput()}`);
      continue;
    }
    return {
      port,
      process: server,
      uri: (exportName = options.exportName ?? '') => `nbd://127.0.0.1:${port}/${exportName}`,
      stop: async () => {
        await server.stop('SIGTERM');
      },
    };
  }
  throw lastError;
}
