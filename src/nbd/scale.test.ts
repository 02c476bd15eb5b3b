// Proves 2000 concurrent connections each complete a handshake and a read, all open at once.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { NbdClient } from './client.js';
import { pattern, startServer } from './fixtures.js';

describe('NBD server at scale', () => {
  it('2000 concurrent connections: handshake, one read each, all open together', async () => {
    const t = await startServer();
    try {
      const count = 2000;
      await t.device.write(0, pattern(0, 1 << 20), { fua: false });
      const clients = await Promise.all(
        Array.from({ length: count }, () => NbdClient.connect({ host: '127.0.0.1', port: t.port }, { exportName: 'disk', timeoutMs: 60_000 })),
      );
      assert.equal(t.server.stats().connectionsOpen, count);
      const reads = await Promise.all(clients.map((client, i) => client.read((i % 256) * 4096, 4096)));
      reads.forEach((data, i) => assert.deepEqual(data, pattern((i % 256) * 4096, 4096), `client ${i}`));
      await Promise.all(clients.map((client) => client.disconnect()));
      assert.equal(t.server.stats().requestsServed, count);
      assert.equal(t.server.stats().protocolViolations, 0);
    } finally {
      await t.close();
    }
  });
});
