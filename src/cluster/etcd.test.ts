// Proves the etcd coordinator against the coordinator conformance suite, on a real etcd
// (Debian's etcd-server) started on loopback in a temporary directory and killed to test loss.
import { randomBytes } from 'node:crypto';
import { runCoordinatorConformance } from './conformance.js';
import { EtcdProcess } from './etcd-process.js';

const etcd = new EtcdProcess();
let clusters = 0;

runCoordinatorConformance('etcd', {
  leaseTtlMs: 1000,
  setUp: () => etcd.start(),
  tearDown: () => etcd.stop(),
  // Every test gets its own key prefix on the one server.
  freshUrl: async () => `etcd://${etcd.endpoint}/t${++clusters}-${randomBytes(4).toString('hex')}`,
  disrupt: () => etcd.kill(),
  restore: () => etcd.restart(),
});
