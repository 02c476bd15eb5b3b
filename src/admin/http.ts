// The admin HTTP endpoint of a node: `/v1/...` JSON for tools and scripts, `/metrics` in
// Prometheus text format, and a small dashboard page for people. Two actions besides reading:
// `POST /v1/volumes/NAME/reattach` (re-attach a diskless volume's disk) and, on nodes whose test
// configuration enables fault injection only, `POST|DELETE|GET /v1/faults` (refused with 403
// FAULT_INJECTION_DISABLED everywhere else).
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../util/log.js';

/** An action's answer: HTTP status and JSON body. */
export interface AdminReply {
  status: number;
  body: unknown;
}

export interface AdminHandlers {
  status(): unknown;
  metrics(): string;
  dashboardHtml(): string;
  /** POST /v1/volumes/NAME/reattach. */
  reattach?(volume: string): Promise<AdminReply>;
  /** /v1/faults; absent unless fault injection is enabled (then 403 FAULT_INJECTION_DISABLED). */
  faults?: {
    set(body: unknown): AdminReply;
    clear(volume: string | undefined): AdminReply;
    list(): AdminReply;
  };
}

/** Request bodies of the actions are small JSON objects. */
const BODY_BYTES_MAX = 64 * 1024;
const REATTACH_PATH = /^\/v1\/volumes\/([A-Za-z0-9][A-Za-z0-9._-]{0,63})\/reattach$/;

export class AdminServer {
  private readonly server: http.Server;
  private readonly handlers: AdminHandlers;
  private readonly logger: Logger;

  constructor(handlers: AdminHandlers, logger: Logger) {
    this.handlers = handlers;
    this.logger = logger;
    this.server = http.createServer((request, response) => this.route(request, response));
    // An admin client that stalls must not keep a socket forever.
    this.server.requestTimeout = 10_000;
    this.server.headersTimeout = 10_000;
  }

  private route(request: http.IncomingMessage, response: http.ServerResponse): void {
    const url = new URL(request.url ?? '/', 'http://admin');
    const path = url.pathname;
    if (path === '/v1/faults' || REATTACH_PATH.test(path)) {
      this.action(request, response, url).catch((error: unknown) => {
        this.logger.error('admin action failed', { path, error: String(error) });
        if (!response.headersSent) this.send(response, 500, 'application/json', JSON.stringify({ error: String(error), code: 'ADMIN_INTERNAL' }));
      });
      return;
    }
    try {
      if (request.method !== 'GET' && request.method !== 'HEAD') {
        this.send(response, 405, 'application/json', JSON.stringify({ error: 'method not allowed', code: 'ADMIN_METHOD' }));
      } else if (path === '/v1/status') {
        this.send(response, 200, 'application/json', JSON.stringify(this.handlers.status(), null, 2));
      } else if (path === '/metrics') {
        this.send(response, 200, 'text/plain; version=0.0.4', this.handlers.metrics());
      } else if (path === '/' || path === '/dashboard') {
        this.send(response, 200, 'text/html; charset=utf-8', this.handlers.dashboardHtml());
      } else if (path === '/healthz') {
        this.send(response, 200, 'text/plain', 'ok\n');
      } else {
        this.send(response, 404, 'application/json', JSON.stringify({ error: `no such path ${path}`, code: 'ADMIN_NOT_FOUND' }));
      }
    } catch (error) {
      this.logger.error('admin request failed', { path, error: String(error) });
      this.send(response, 500, 'application/json', JSON.stringify({ error: String(error), code: 'ADMIN_INTERNAL' }));
    }
  }

  /** The POST/DELETE endpoints (and GET /v1/faults). */
  private async action(request: http.IncomingMessage, response: http.ServerResponse, url: URL): Promise<void> {
    const reply = (answer: AdminReply): void => this.send(response, answer.status, 'application/json', JSON.stringify(answer.body, null, 2));
    const refuse = (status: number, code: string, error: string): void => reply({ status, body: { error, code } });
    const reattach = REATTACH_PATH.exec(url.pathname);
    if (reattach) {
      if (request.method !== 'POST') return refuse(405, 'ADMIN_METHOD', 'use POST');
      if (!this.handlers.reattach) return refuse(404, 'ADMIN_NOT_FOUND', 'this node has no replicated volumes to re-attach');
      await readBody(request);
      this.logger.info('re-attach asked for', { volume: reattach[1]!, remote: request.socket.remoteAddress });
      return reply(await this.handlers.reattach(reattach[1]!));
    }
    const faults = this.handlers.faults;
    if (!faults) {
      // Never reachable without the test configuration: say so, and what would enable it.
      return refuse(403, 'FAULT_INJECTION_DISABLED', 'fault injection is disabled on this node (test configuration only: faultInjection: true in the node config, or MIRRORSAN_FAULT_INJECTION=1)');
    }
    if (request.method === 'GET') return reply(faults.list());
    if (request.method === 'DELETE') {
      await readBody(request);
      return reply(faults.clear(url.searchParams.get('volume') ?? undefined));
    }
    if (request.method !== 'POST') return refuse(405, 'ADMIN_METHOD', 'use GET, POST or DELETE');
    let body: unknown;
    try {
      const text = await readBody(request);
      body = text.length === 0 ? {} : JSON.parse(text);
    } catch (error) {
      return refuse(400, 'CONFIG_INVALID', `the body is not JSON of at most ${BODY_BYTES_MAX} bytes: ${(error as Error).message}`);
    }
    this.logger.warn('fault injection asked for', { body: JSON.stringify(body), remote: request.socket.remoteAddress });
    return reply(faults.set(body));
  }

  private send(response: http.ServerResponse, status: number, contentType: string, body: string): void {
    response.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store' });
    response.end(body);
  }

  listen(port: number, host: string): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve(this.server.address() as AddressInfo);
      });
    });
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** Prometheus text exposition: one `# HELP`/`# TYPE` per metric family. */
export class MetricsText {
  private readonly lines: string[] = [];
  private readonly declared = new Set<string>();

  add(name: string, type: 'counter' | 'gauge', help: string, value: number, labels: Record<string, string> = {}): this {
    if (!this.declared.has(name)) {
      this.declared.add(name);
      this.lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    }
    const labelText = Object.entries(labels)
      .map(([key, labelValue]) => `${key}="${labelValue.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`)
      .join(',');
    this.lines.push(`${name}${labelText ? `{${labelText}}` : ''} ${Number.isFinite(value) ? value : 0}`);
    return this;
  }

  toString(): string {
    return this.lines.join('\n') + '\n';
  }
}

/** The request body as text, refused beyond BODY_BYTES_MAX. */
function readBody(request: http.IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    request.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (bytes > BODY_BYTES_MAX) {
        reject(new Error(`body over ${BODY_BYTES_MAX} bytes`));
        request.destroy();
        return;
      }
      chunks.push(chunk);
    });
    request.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    request.on('error', reject);
  });
}
