// Proves the failure simulation's store model (sim-store.ts): what a process crash and a power loss leave of the image, the own WAL and the containers; that a checkpoint and a rebase are what replay starts from; that replay verifies every entry's CRCs, cuts a torn or rotted tail and refuses a log with a bad entry followed by valid ones; and that the 'applyCorruptEntries' bug switch applies such an entry.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng } from './prng.js';
import { Scheduler } from './scheduler.js';
import { HONEST_STORE_FAULTS, OWN_LOG, SimStore, StoreCorruptError, type ReplayedEntry, type StoreFaults } from './sim-store.js';

const BLOCK = 512;

function setup(options: { faults?: Partial<StoreFaults>; seed?: number; applyCorruptEntries?: boolean } = {}): { store: SimStore; scheduler: Scheduler } {
  const scheduler = new Scheduler({ seed: options.seed ?? 1 });
  const store = new SimStore({
    node: 'n1',
    scheduler,
    prng: new Prng(options.seed ?? 1),
    imageBytes: 16 * BLOCK,
    sources: ['n2'],
    faults: { ...HONEST_STORE_FAULTS, writebackProbability: 0, tornProbability: 0, ...options.faults },
    ioDelayMsMax: 1,
    ioQueueMax: 1000,
    applyCorruptEntries: options.applyCorruptEntries ?? false,
  });
  store.openStore(() => undefined);
  return { store, scheduler };
}

function block(value: number): Buffer {
  return Buffer.alloc(BLOCK, value);
}

/** Runs every queued I/O. */
function settle(scheduler: Scheduler): void {
  scheduler.runUntilSync(scheduler.nowMs() + 100);
}

function reopen(store: SimStore): { replayed: ReplayedEntry[]; recovery: ReturnType<SimStore['openStore']> } {
  const replayed: ReplayedEntry[] = [];
  const recovery = store.openStore((entry) => replayed.push(entry));
  return { replayed, recovery };
}

test('a process crash keeps every completed write (the kernel has it); a power loss keeps only what was synced', () => {
  for (const kind of ['process', 'power'] as const) {
    const { store, scheduler } = setup();
    store.writeLocal(0, block(1), () => undefined);
    store.flushLocal(() => undefined);
    settle(scheduler);
    store.writeLocal(BLOCK, block(2), () => undefined);
    settle(scheduler);
    store.crash(kind);
    const { recovery } = reopen(store);
    assert.equal(store.read(0, BLOCK)[0], 1, `${kind}: the synced write survives`);
    assert.equal(store.read(BLOCK, BLOCK)[0], kind === 'process' ? 2 : 0, `${kind}: the unsynced write`);
    assert.equal(recovery.ownSequence, kind === 'process' ? 2 : 1);
  }
});

test('a write still queued at the crash never happens, of either kind', () => {
  const { store, scheduler } = setup();
  store.writeLocal(0, block(1), () => assert.fail('a crashed write never completes'));
  store.crash('process');
  settle(scheduler);
  reopen(store);
  assert.equal(store.read(0, BLOCK)[0], 0);
});

test('reads see an entry as soon as it registers, before its I/O', () => {
  const { store } = setup();
  store.writeLocal(0, block(7), () => undefined);
  store.applyRemote('n2', 1, BLOCK, block(8));
  assert.equal(store.read(0, BLOCK)[0], 7);
  assert.equal(store.read(BLOCK, BLOCK)[0], 8);
});

test('a synced spill makes remote entries durable; replay merges the logs by apply stamp', () => {
  const { store, scheduler } = setup();
  store.applyRemote('n2', 1, 0, block(1));
  store.writeLocal(0, block(2), () => undefined);
  store.applyRemote('n2', 2, 0, block(3));
  let durable = 0;
  store.spill('n2', true, (through) => (durable = through));
  store.flushLocal(() => undefined);
  settle(scheduler);
  assert.equal(durable, 2);
  store.crash('power');
  const { replayed, recovery } = reopen(store);
  assert.deepEqual(replayed.map((entry) => [entry.log, entry.sequence]), [['n2', 1], [OWN_LOG, 1], ['n2', 2]], 'stamp order across logs');
  assert.equal(store.read(0, BLOCK)[0], 3, 'the last applied entry wins, as before the crash');
  assert.deepEqual(recovery.sources.get('n2'), { durableSequence: 2, checkpointSequence: 0 });
});

test('a checkpoint syncs the image and empties the logs it covers; replay starts after it', () => {
  const { store, scheduler } = setup();
  store.writeLocal(0, block(1), () => undefined);
  store.applyRemote('n2', 1, BLOCK, block(2));
  let covered: ReadonlyMap<string, number> | undefined;
  store.checkpoint((sources) => (covered = sources));
  settle(scheduler);
  assert.equal(covered?.get('n2'), 1);
  store.writeLocal(2 * BLOCK, block(3), () => undefined);
  store.flushLocal(() => undefined);
  settle(scheduler);
  store.crash('power');
  const { replayed, recovery } = reopen(store);
  assert.deepEqual(replayed.map((entry) => entry.sequence), [2], 'only the entry after the checkpoint is replayed');
  assert.deepEqual([store.read(0, BLOCK)[0], store.read(BLOCK, BLOCK)[0], store.read(2 * BLOCK, BLOCK)[0]], [1, 2, 3]);
  assert.deepEqual(recovery.sources.get('n2'), { durableSequence: 1, checkpointSequence: 1 });
});

test('what replay applied becomes durable with the next checkpoint, which drops the logs that held it', () => {
  const { store, scheduler } = setup();
  store.writeLocal(0, block(1), () => undefined);
  store.flushLocal(() => undefined);
  settle(scheduler);
  store.crash('power');
  assert.deepEqual(reopen(store).replayed.map((entry) => entry.sequence), [1]);
  store.checkpoint(() => undefined);
  settle(scheduler);
  store.crash('power');
  const { replayed } = reopen(store);
  assert.deepEqual(replayed, [], 'the checkpoint covers it');
  assert.equal(store.read(0, BLOCK)[0], 1, 'and the image holds it');
});

test('a rebase records the new start of a source stream durably', () => {
  const { store, scheduler } = setup();
  store.applyRemote('n2', 1, 0, block(1));
  store.rebaseSource('n2', 9, () => undefined);
  settle(scheduler);
  store.applyRemote('n2', 10, BLOCK, block(2));
  store.spill('n2', true, () => undefined);
  settle(scheduler);
  store.crash('power');
  assert.deepEqual(reopen(store).recovery.sources.get('n2'), { durableSequence: 10, checkpointSequence: 9 });
});

test('a torn tail is cut (never applied); its entry fails the CRC check', () => {
  // Find a seed whose power loss writes back and tears the unsynced record.
  for (let seed = 1; seed < 200; seed++) {
    const { store, scheduler } = setup({ seed, faults: { writebackProbability: 1, tornProbability: 1 } });
    store.writeLocal(0, Buffer.alloc(4 * BLOCK, 5), () => undefined);
    settle(scheduler);
    store.crash('power');
    if (store.stats.tornWrites === 0) continue;
    const { replayed, recovery } = reopen(store);
    assert.deepEqual(replayed, [], 'the torn entry is not applied');
    assert.equal(recovery.ownSequence, 0);
    assert.deepEqual(recovery.cutLogs, [OWN_LOG]);
    return;
  }
  assert.fail('no seed tore the write');
});

test('rot in the middle of a log makes the store refuse to open (JOURNAL_CORRUPT); at its end the tail is cut', () => {
  let refused = 0;
  let cut = 0;
  for (let seed = 1; seed < 400 && (refused === 0 || cut === 0); seed++) {
    const { store, scheduler } = setup({ seed, faults: { rotProbability: 1 } });
    store.writeLocal(0, block(1), () => undefined);
    store.writeLocal(BLOCK, block(2), () => undefined);
    store.flushLocal(() => undefined);
    settle(scheduler);
    store.crash('process');
    try {
      const { replayed } = reopen(store);
      // The rot hit the last record (a trusted header with a bad payload, or a bad header with
      // nothing valid after it): cut. Whatever replay applied is intact.
      for (const entry of replayed) assert.deepEqual(entry.payload, store.ledger.get(entry.stamp)!.payload);
      if (replayed.length < 2) cut++;
    } catch (error) {
      assert.ok(error instanceof StoreCorruptError, String(error));
      refused++;
    }
  }
  assert.ok(refused > 0 && cut > 0, `refused ${refused}, cut ${cut}`);
});

test('a lying disk loses a synced write at a power loss: the log ends (or is refused) there', () => {
  const { store, scheduler } = setup({ faults: { lostWriteProbability: 1 } });
  store.writeLocal(0, block(1), () => undefined);
  store.flushLocal(() => undefined);
  settle(scheduler);
  store.crash('power');
  const { replayed } = reopen(store);
  assert.deepEqual(replayed, []);
  assert.equal(store.read(0, BLOCK)[0], 0);
});

test("the 'applyCorruptEntries' bug applies a torn entry's bytes", () => {
  for (let seed = 1; seed < 200; seed++) {
    const { store, scheduler } = setup({ seed, faults: { writebackProbability: 1, tornProbability: 1 }, applyCorruptEntries: true });
    store.writeLocal(0, Buffer.alloc(4 * BLOCK, 5), () => undefined);
    settle(scheduler);
    store.crash('power');
    if (store.stats.tornWrites === 0) continue;
    const { replayed } = reopen(store);
    assert.equal(replayed.length, 1);
    assert.notDeepEqual(replayed[0]!.payload, store.ledger.get(replayed[0]!.stamp)!.payload, 'a short (torn) payload');
    return;
  }
  assert.fail('no seed tore the write');
});

test('a replaced disk is empty', () => {
  const { store, scheduler } = setup();
  store.writeLocal(0, block(1), () => undefined);
  store.checkpoint(() => undefined);
  settle(scheduler);
  store.crash('process');
  store.wipe();
  const { recovery } = reopen(store);
  assert.equal(store.read(0, BLOCK)[0], 0);
  assert.equal(recovery.ownSequence, 0);
});
