// The coordinator conformance suite: one set of node:test tests that every backend must pass
// (embedded.test.ts and etcd.test.ts run it). It states the contract of coordinator.ts as
// behaviour: leases that end after a crash but never before the holder gave up (I3), sessions
// that notice an unreachable coordinator within the TTL (I2), CAS with exactly one winner per
// epoch across processes, and watches that deliver every epoch in order.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, afterEach, before, describe, test } from 'node:test';
import { isMirrorsanError } from '../errors.js';
import { createLogger } from '../util/log.js';
import type { LogLevel } from '../util/log.js';
import type { ErrorCode } from '../errors.js';
import { createCoordinator } from './index.js';
import type { Coordinator, LeaseLostReason, NodeRegistration, NodeRegistrationInput, VolumeRecord, VolumeSpec } from './coordinator.js';
import type { ChildTask } from './conformance.child.js';

export interface ConformanceBackend {
  /** Once per file, before every test (etcd: start the server). */
  setUp(): Promise<void>;
  tearDown(): Promise<void>;
  /** A URL of a fresh, empty cluster (a new directory, or a new etcd key prefix). */
  freshUrl(): Promise<string>;
  /** Makes the backend unreachable for every client (etcd: SIGKILL the server). */
  disrupt(url: string): Promise<void>;
  /** Undoes disrupt(). */
  restore(url: string): Promise<void>;
  /** The TTL the lease tests ask for (a backend may round it up; tests use session.ttlMs). */
  leaseTtlMs: number;
}

const CHILD_SCRIPT = fileURLToPath(new URL('./conformance.child.js', import.meta.url));
/** Quiet unless asked (MIRRORSAN_LOG_LEVEL=debug): the disruption tests log warnings by design. */
const LOG_LEVEL = (process.env.MIRRORSAN_LOG_LEVEL ?? 'error') as LogLevel;

const endpoint = (port: number) => ({ host: '127.0.0.1', port });

function node(id: string, base = 20000): NodeRegistrationInput {
  return { id, nbd: endpoint(base), peer: endpoint(base + 1), admin: endpoint(base + 2) };
}

function spec(name: string, overrides: Partial<VolumeSpec> = {}): VolumeSpec {
  return { name, sizeBytes: 64 * 1024 * 1024, replicas: 3, mode: 'sync', strict: false, regionSizeBytes: 1024 * 1024, ...overrides };
}

function record(epoch: number, inSync: string[], replicas = ['n1', 'n2', 'n3']): VolumeRecord {
  return { epoch, replicas, inSync, arbiter: inSync[0], updatedAtMs: 1_700_000_000_000 + epoch };
}

async function waitFor<T>(probe: () => T | undefined | Promise<T | undefined>, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function assertRejectsWith(promise: Promise<unknown>, code: ErrorCode): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(isMirrorsanError(error, code), `expected ${code}, got ${String(error)}`);
    return true;
  });
}

interface Child {
  process: ChildProcess;
  events: Array<Record<string, unknown>>;
  exited: Promise<number | null>;
}

function startChild(task: ChildTask): Child {
  const child = spawn(process.execPath, [CHILD_SCRIPT, JSON.stringify(task)], {
    stdio: [task.mode === 'cas-race' ? 'pipe' : 'ignore', 'pipe', 'inherit'],
    env: { ...process.env, MIRRORSAN_LOG_LEVEL: LOG_LEVEL },
  });
  const events: Array<Record<string, unknown>> = [];
  let buffered = '';
  child.stdout?.on('data', (chunk: Buffer) => {
    buffered += chunk.toString();
    let newline: number;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      events.push(JSON.parse(buffered.slice(0, newline)) as Record<string, unknown>);
      buffered = buffered.slice(newline + 1);
    }
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { process: child, events, exited };
}

export function runCoordinatorConformance(name: string, backend: ConformanceBackend): void {
  describe(`coordinator conformance: ${name}`, () => {
    const open: Coordinator[] = [];
    const children: Child[] = [];
    /** A coordinator closed after the test (close() is idempotent). */
    const connect = async (url: string): Promise<Coordinator> => {
      const coordinator = await createCoordinator(url, { logger: createLogger({ level: LOG_LEVEL, component: 'coordinator' }) });
      open.push(coordinator);
      return coordinator;
    };

    before(() => backend.setUp());
    afterEach(async () => {
      for (const child of children.splice(0)) {
        child.process.kill('SIGKILL');
        await child.exited;
      }
      for (const coordinator of open.splice(0)) await coordinator.close();
    });
    after(() => backend.tearDown());

    test('registered nodes are listed, with their endpoints and lease, by every client', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const b = await connect(url);
      const s1 = await a.registerNode(node('n1', 20000), { leaseTtlMs: backend.leaseTtlMs });
      const s2 = await b.registerNode(node('n2', 21000), { leaseTtlMs: backend.leaseTtlMs });
      assert.ok(s1.isValid() && s2.isValid());
      assert.ok(s1.ttlMs >= backend.leaseTtlMs, `granted TTL ${s1.ttlMs} is at least the requested one`);
      assert.notEqual(s1.leaseId, s2.leaseId);
      for (const client of [a, b]) {
        const live = await client.liveNodes();
        assert.deepEqual(
          live.map((n) => [n.id, n.leaseId, n.nbd.port, n.peer.port, n.admin.port]),
          [
            ['n1', s1.leaseId, 20000, 20001, 20002],
            ['n2', s2.leaseId, 21000, 21001, 21002],
          ],
        );
      }
      await s1.revoke();
      assert.equal(s1.isValid(), false);
      assert.deepEqual((await b.liveNodes()).map((n) => n.id), ['n2']);
    });

    test('a node id held by a live lease cannot be taken; after revoke it can, and the loser hears why', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const b = await connect(url);
      const first = await a.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs });
      await assertRejectsWith(b.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs, waitForPreviousMs: 300 }), 'COORD_NODE_ID_TAKEN');
      assert.ok(first.isValid(), 'the failed attempt did not disturb the holder');
      const lost = new Promise<LeaseLostReason>((resolve) => first.onLost(resolve));
      await first.revoke();
      assert.equal(await lost, 'revoked');
      const startedMs = Date.now();
      const second = await b.registerNode(node('n1', 22000), { leaseTtlMs: backend.leaseTtlMs });
      assert.ok(Date.now() - startedMs < 1000, 'a revoked lease frees the id at once');
      assert.deepEqual((await a.liveNodes()).map((n) => [n.id, n.leaseId, n.nbd.port]), [['n1', second.leaseId, 22000]]);
    });

    test('renewals keep a lease alive well past its TTL', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const session = await a.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs });
      const lost: LeaseLostReason[] = [];
      session.onLost((reason) => lost.push(reason));
      await new Promise((resolve) => setTimeout(resolve, session.ttlMs * 2.5));
      assert.deepEqual(lost, []);
      assert.ok(session.isValid() && session.remainingMs() > 0);
      assert.deepEqual((await a.liveNodes()).map((n) => n.leaseId), [session.leaseId]);
    });

    test('a node killed with SIGKILL drops out after its TTL, never before its own validity ended', async () => {
      const url = await backend.freshUrl();
      const observer = await connect(url);
      const seen: string[][] = [];
      observer.watchNodes((nodes) => seen.push(nodes.map((n) => n.id)));
      const child = startChild({ mode: 'hold-lease', url, nodeId: 'n1', leaseTtlMs: backend.leaseTtlMs });
      children.push(child);
      await waitFor(() => (child.events.length >= 3 ? true : undefined), 10_000, 'the child to hold its lease');
      await waitFor(() => (seen.some((ids) => ids.includes('n1')) ? true : undefined), 5_000, 'the watch to see n1');
      child.process.kill('SIGKILL');
      await child.exited;
      const lastReport = child.events.at(-1) as { validUntilWallMs: number };
      const goneAtMs = await waitFor(
        async () => ((await observer.liveNodes()).some((n) => n.id === 'n1') ? undefined : Date.now()),
        backend.leaseTtlMs * 2 + 5_000,
        'the lease of the killed node to run out',
      );
      // I3: others may act on the node's absence only after the node itself stopped trusting its lease.
      assert.ok(goneAtMs >= lastReport.validUntilWallMs, `gone at ${goneAtMs}, but the node trusted its lease until ${lastReport.validUntilWallMs}`);
      await waitFor(() => (seen.at(-1)?.includes('n1') === false ? true : undefined), 5_000, 'the watch to see n1 leave');
      // The id is free again without waiting.
      const again = await observer.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs, waitForPreviousMs: 0 });
      assert.ok(again.isValid());
    });

    test('a session loses its lease within the TTL when the coordinator becomes unreachable', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const session = await a.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs });
      const lost = new Promise<LeaseLostReason>((resolve) => session.onLost(resolve));
      const cutMs = Date.now();
      await backend.disrupt(url);
      try {
        const reason = await lost;
        const elapsedMs = Date.now() - cutMs;
        assert.ok(reason === 'expired' || reason === 'rejected', `lost as ${reason}`);
        assert.ok(elapsedMs <= session.ttlMs + 1000, `lost ${elapsedMs} ms after the cut, TTL ${session.ttlMs} ms`);
        assert.equal(session.isValid(), false);
        assert.equal(session.remainingMs(), 0);
      } finally {
        await backend.restore(url);
      }
      // The client recovers once the backend is back, and the lost session stays lost.
      const fresh = await waitFor(
        () => a.registerNode(node('n2'), { leaseTtlMs: backend.leaseTtlMs }).catch(() => undefined),
        10_000,
        'the coordinator to answer again',
      );
      assert.ok(fresh.isValid());
      assert.equal(session.isValid(), false);
    });

    test('volume specs: create-only, replace, get, list, delete', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const b = await connect(url);
      assert.equal(await a.getVolumeSpec('vol1'), undefined);
      assert.equal(await a.putVolumeSpec(spec('vol1'), { createOnly: true }), true);
      assert.equal(await b.putVolumeSpec(spec('vol1', { replicas: 2 }), { createOnly: true }), false, 'create-only never overwrites');
      assert.deepEqual(await b.getVolumeSpec('vol1'), spec('vol1'));
      assert.equal(await b.putVolumeSpec(spec('vol1', { sizeBytes: 128 * 1024 * 1024, mode: 'async' }), { createOnly: false }), true);
      assert.deepEqual(await a.getVolumeSpec('vol1'), spec('vol1', { sizeBytes: 128 * 1024 * 1024, mode: 'async' }));
      assert.equal(await a.putVolumeSpec(spec('vol0', { strict: true }), { createOnly: false }), true, 'replace creates too');
      assert.deepEqual((await b.listVolumeSpecs()).map((s) => [s.name, s.strict]), [['vol0', true], ['vol1', false]]);
      assert.equal(await a.deleteVolume('vol1'), true);
      assert.equal(await a.deleteVolume('vol1'), false);
      assert.equal(await b.getVolumeSpec('vol1'), undefined);
      assert.deepEqual((await b.listVolumeSpecs()).map((s) => s.name), ['vol0']);
      await assertRejectsWith(a.putVolumeSpec(spec('../escape'), { createOnly: true }), 'CONFIG_INVALID');
      await assertRejectsWith(a.putVolumeSpec(spec('vol2', { regionSizeBytes: 1000 }), { createOnly: true }), 'CONFIG_INVALID');
    });

    test('record CAS: create once, advance by one epoch, a stale epoch fails and returns the current record', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const b = await connect(url);
      await assertRejectsWith(a.casVolumeRecord('vol1', null, record(1, ['n1'])), 'VOLUME_NOT_FOUND');
      await a.putVolumeSpec(spec('vol1'), { createOnly: true });
      assert.equal(await a.getVolumeRecord('vol1'), undefined);
      assert.deepEqual(await a.casVolumeRecord('vol1', 1, record(2, ['n1'])), { ok: false, current: undefined });
      assert.deepEqual(await a.casVolumeRecord('vol1', null, record(1, ['n1', 'n2', 'n3'])), { ok: true });
      assert.deepEqual(await b.casVolumeRecord('vol1', null, record(1, ['n2'])), { ok: false, current: record(1, ['n1', 'n2', 'n3']) });
      assert.deepEqual(await b.casVolumeRecord('vol1', 1, record(2, ['n1', 'n2'])), { ok: true });
      // a still believes epoch 1: refused, and told what the record is now.
      assert.deepEqual(await a.casVolumeRecord('vol1', 1, record(2, ['n1', 'n3'])), { ok: false, current: record(2, ['n1', 'n2']) });
      assert.deepEqual(await a.getVolumeRecord('vol1'), record(2, ['n1', 'n2']));
      // Transitions that break the epoch rule or the record invariants are bugs: they throw.
      await assert.rejects(a.casVolumeRecord('vol1', 2, record(4, ['n1'])), /must be expected epoch 2 \+ 1/);
      await assert.rejects(a.casVolumeRecord('vol1', 2, record(3, [])), /inSync must be a non-empty/);
      await assert.rejects(a.casVolumeRecord('vol1', 2, record(3, ['n9'])), /not a replica/);
      // The record goes with the volume.
      assert.equal(await a.deleteVolume('vol1'), true);
      assert.equal(await b.getVolumeRecord('vol1'), undefined);
      await assertRejectsWith(b.casVolumeRecord('vol1', 2, record(3, ['n1'])), 'VOLUME_NOT_FOUND');
      // A new volume of the same name starts without a record.
      await a.putVolumeSpec(spec('vol1'), { createOnly: true });
      assert.equal(await b.getVolumeRecord('vol1'), undefined);
      assert.deepEqual(await b.casVolumeRecord('vol1', null, record(7, ['n3'])), { ok: true });
      assert.deepEqual(await a.getVolumeRecord('vol1'), record(7, ['n3']));
    });

    test('watchVolumeRecord: the current value on subscribe, every epoch in order, the delete, the new life', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const w = await connect(url);
      const seen: Array<number | undefined> = [];
      const unsubscribe = w.watchVolumeRecord('vol1', (r) => seen.push(r?.epoch));
      await waitFor(() => (seen.length >= 1 ? true : undefined), 5_000, 'the initial delivery');
      assert.deepEqual(seen, [undefined]);
      await a.putVolumeSpec(spec('vol1'), { createOnly: true });
      assert.deepEqual(await a.casVolumeRecord('vol1', null, record(1, ['n1'])), { ok: true });
      for (let epoch = 1; epoch < 6; epoch++) {
        assert.deepEqual(await a.casVolumeRecord('vol1', epoch, record(epoch + 1, ['n1'])), { ok: true });
      }
      await waitFor(() => (seen.at(-1) === 6 ? true : undefined), 5_000, 'epoch 6');
      await a.deleteVolume('vol1');
      await waitFor(() => (seen.length === 8 ? true : undefined), 5_000, 'the delete');
      await a.putVolumeSpec(spec('vol1'), { createOnly: true });
      assert.deepEqual(await a.casVolumeRecord('vol1', null, record(1, ['n2'])), { ok: true });
      await waitFor(() => (seen.length === 9 ? true : undefined), 5_000, 'the new life');
      assert.deepEqual(seen, [undefined, 1, 2, 3, 4, 5, 6, undefined, 1]);
      // A late subscriber gets the current value, not the history.
      const late: Array<number | undefined> = [];
      w.watchVolumeRecord('vol1', (r) => late.push(r?.epoch));
      await waitFor(() => (late.length >= 1 ? true : undefined), 5_000, 'the late subscriber');
      assert.deepEqual(late, [1]);
      unsubscribe();
      assert.deepEqual(await a.casVolumeRecord('vol1', 1, record(2, ['n2'])), { ok: true });
      await waitFor(() => (late.at(-1) === 2 ? true : undefined), 5_000, 'the late subscriber to see epoch 2');
      assert.equal(seen.length, 9, 'nothing is delivered after unsubscribe');
    });

    test('concurrent CAS from several processes: one winner per epoch, no lost update, watchers see every epoch', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const workers = ['w0', 'w1', 'w2', 'w3'];
      const targetEpoch = 41;
      await a.putVolumeSpec(spec('race'), { createOnly: true });
      assert.deepEqual(await a.casVolumeRecord('race', null, record(1, ['w0'], workers)), { ok: true });
      const seen: VolumeRecord[] = [];
      a.watchVolumeRecord('race', (r) => {
        if (r) seen.push(r);
      });
      await waitFor(() => (seen.length >= 1 ? true : undefined), 5_000, 'the initial delivery');
      const racers = workers.map((workerId) =>
        startChild({ mode: 'cas-race', url, volume: 'race', workerId, replicas: workers, targetEpoch }),
      );
      children.push(...racers);
      await waitFor(() => (racers.every((r) => r.events.some((e) => e.event === 'ready')) ? true : undefined), 15_000, 'the racers to connect');
      for (const racer of racers) racer.process.stdin?.end('go\n');
      const codes = await Promise.all(racers.map((r) => r.exited));
      assert.deepEqual(codes, [0, 0, 0, 0], JSON.stringify(racers.map((r) => r.events)));
      const winnerOf = new Map<number, string>();
      let conflicts = 0;
      for (const racer of racers) {
        const done = racer.events.find((e) => e.event === 'done') as { workerId: string; wins: number[]; conflicts: number };
        conflicts += done.conflicts;
        for (const epoch of done.wins) {
          assert.equal(winnerOf.get(epoch), undefined, `epoch ${epoch} won twice (${winnerOf.get(epoch)} and ${done.workerId})`);
          winnerOf.set(epoch, done.workerId);
        }
      }
      assert.deepEqual([...winnerOf.keys()].sort((x, y) => x - y), Array.from({ length: targetEpoch - 1 }, (_, i) => i + 2));
      assert.ok(conflicts > 0, 'the workers really raced');
      const final = await a.getVolumeRecord('race');
      assert.equal(final?.epoch, targetEpoch);
      await waitFor(() => (seen.at(-1)?.epoch === targetEpoch ? true : undefined), 5_000, 'the watch to reach the last epoch');
      // Every epoch, in order, each with the content its single winner wrote.
      assert.deepEqual(seen.map((r) => r.epoch), Array.from({ length: targetEpoch }, (_, i) => i + 1));
      for (const r of seen.slice(1)) assert.equal(r.arbiter, winnerOf.get(r.epoch), `epoch ${r.epoch} holds its winner's write`);
    });

    test('watchNodes: the live set on subscribe, then each change', async () => {
      const url = await backend.freshUrl();
      const a = await connect(url);
      const w = await connect(url);
      const seen: string[][] = [];
      const unsubscribe = w.watchNodes((nodes: NodeRegistration[]) => seen.push(nodes.map((n) => n.id)));
      await waitFor(() => (seen.length >= 1 ? true : undefined), 5_000, 'the initial delivery');
      const s1 = await a.registerNode(node('n1'), { leaseTtlMs: backend.leaseTtlMs });
      await waitFor(() => (seen.at(-1)?.join() === 'n1' ? true : undefined), 5_000, 'n1 to appear');
      const s2 = await a.registerNode(node('n2'), { leaseTtlMs: backend.leaseTtlMs });
      await waitFor(() => (seen.at(-1)?.join() === 'n1,n2' ? true : undefined), 5_000, 'n2 to appear');
      await s1.revoke();
      await waitFor(() => (seen.at(-1)?.join() === 'n2' ? true : undefined), 5_000, 'n1 to leave');
      assert.deepEqual(seen, [[], ['n1'], ['n1', 'n2'], ['n2']]);
      unsubscribe();
      await s2.revoke();
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.deepEqual(seen.at(-1), ['n2'], 'nothing is delivered after unsubscribe');
    });

    test('close() ends sessions and stops every timer: the process exits by itself', async () => {
      const url = await backend.freshUrl();
      const child = startChild({ mode: 'open-close', url, nodeId: 'n1', leaseTtlMs: backend.leaseTtlMs });
      children.push(child);
      await waitFor(() => (child.events.some((e) => e.event === 'closed') ? true : undefined), 10_000, 'the child to close');
      const timeout = new Promise<'hung'>((resolve) => setTimeout(() => resolve('hung'), 3_000).unref());
      assert.equal(await Promise.race([child.exited, timeout]), 0, 'the process exits once the coordinator is closed');
      // In-process: a closed coordinator refuses work and its sessions report `closed`.
      const a = await connect(url);
      const session = await a.registerNode(node('n2'), { leaseTtlMs: backend.leaseTtlMs });
      const lost = new Promise<LeaseLostReason>((resolve) => session.onLost(resolve));
      await a.close();
      assert.equal(await lost, 'closed');
      await assertRejectsWith(a.liveNodes(), 'COORD_CLOSED');
    });
  });
}
