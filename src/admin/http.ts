// The admin HTTP endpoint of a node: `/v1/...` JSON for tools and scripts, `/metrics` in
// Prometheus text format, and a small dashboard page for people. Read-only in this version.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../util/log.js';

export interface AdminHandlers {
  status(): unknown;
  metrics(): string;
  dashboardHtml(): string;
}

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
    const path = (request.url ?? '/').split('?')[0];
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
