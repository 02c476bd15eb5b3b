// Proves the simulated network's semantics: links connect and announce themselves, FIFO per
// link with delays in range, loss only on link failure (announced to both ends), partitions
// that hold then fail and heal, clogging, crashes and restarts, bounded queues, and that a seed
// reproduces a faulty run exactly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SimNetwork, NETWORK_PROFILES, randomNetworkProfile, type Link, type NetworkHandler, type NetworkProfile } from './network.js';
import { Prng } from './prng.js';
import { Scheduler } from './scheduler.js';

interface Recorded {
  received: Array<{ source: string; message: number; atMs: number }>;
  events: string[];
}

function recorder(scheduler: Scheduler): NetworkHandler<number> & Recorded {
  const received: Recorded['received'] = [];
  const events: string[] = [];
  const name = (link: Link): string => `${link.source}->${link.target}`;
  return {
    received,
    events,
    receive: (source, message) => received.push({ source, message, atMs: scheduler.nowMs() }),
    linkUp: (link) => events.push(`up ${name(link)}`),
    linkDown: (link) => events.push(`down ${name(link)}`),
  };
}

const QUIET: NetworkProfile = { ...NETWORK_PROFILES[0]!, delayMsMin: 2, delayMsMax: 6, jitterMsMax: 10, connectMsMin: 5, connectMsMax: 10 };

function cluster(nodes: string[], profile: NetworkProfile = QUIET, seed = 1) {
  const scheduler = new Scheduler({ seed });
  const network = new SimNetwork<number>({ scheduler, prng: new Prng(seed).fork('network'), nodes, profile, describe: (m) => `m${m}` });
  const handlers = new Map(nodes.map((node) => [node, recorder(scheduler)]));
  for (const node of nodes) network.start(node, handlers.get(node)!);
  return { scheduler, network, handlers, h: (node: string) => handlers.get(node)! };
}

test('links start down, connect after the connect delay and tell both ends; earlier sends are dropped', () => {
  const { scheduler, network, h } = cluster(['a', 'b']);
  network.send('a', 'b', 1);
  assert.equal(network.stats.droppedLinkDown, 1);
  assert.equal(network.linkStatus('a', 'b'), 'connecting');
  scheduler.runUntilSync(QUIET.connectMsMax);
  assert.equal(network.linkStatus('a', 'b'), 'up');
  assert.deepEqual(h('a').events.sort(), ['up a->b', 'up b->a']);
  assert.deepEqual(h('b').events.sort(), ['up a->b', 'up b->a']);
  assert.deepEqual(h('b').received, []);
  assert.equal(network.settled, true);
});

test('each link is FIFO with delays in range, while different links reorder', () => {
  const { scheduler, network, h } = cluster(['a', 'b', 'c']);
  scheduler.runUntilSync(20);
  const sentAtMs = new Map<number, number>();
  for (let index = 0; index < 300; index++) {
    // Interleave two sources sending to c, a few messages per millisecond.
    scheduler.at(20 + Math.floor(index / 3), () => {
      sentAtMs.set(index, scheduler.nowMs());
      network.send(index % 2 === 0 ? 'a' : 'b', 'c', index);
    });
  }
  scheduler.runUntilSync(1000);
  const received = h('c').received;
  assert.equal(received.length, 300);
  for (const source of ['a', 'b']) {
    const sequence = received.filter((entry) => entry.source === source).map((entry) => entry.message);
    assert.deepEqual(sequence, [...sequence].sort((x, y) => x - y), `FIFO on ${source}->c`);
  }
  for (const entry of received) {
    const delayMs = entry.atMs - sentAtMs.get(entry.message)!;
    assert.ok(delayMs >= QUIET.delayMsMin, `delay ${delayMs} below the minimum`);
  }
  const overall = received.map((entry) => entry.message);
  assert.notDeepEqual(overall, [...overall].sort((x, y) => x - y), 'messages on different links reorder');
  assert.equal(network.stats.delivered, 300);
  assert.equal(network.inFlight, 0);
});

test('a link failure drops what is in flight, tells both ends, and the link comes back', () => {
  const { scheduler, network, h } = cluster(['a', 'b']);
  scheduler.runUntilSync(20);
  h('a').events.length = 0;
  h('b').events.length = 0;
  for (let message = 1; message <= 5; message++) network.send('a', 'b', message);
  network.failLink('a', 'b');
  network.send('a', 'b', 6); // the writer has not heard yet: dropped, like a write to a reset socket
  assert.equal(network.stats.droppedInFlight, 5);
  assert.equal(network.stats.droppedLinkDown, 1);
  scheduler.runUntilSync(21);
  assert.deepEqual(h('a').events, ['down a->b']);
  assert.deepEqual(h('b').events, ['down a->b']);
  assert.equal(network.linkStatus('b', 'a'), 'up', 'the other direction is untouched');
  scheduler.runUntilSync(40);
  assert.deepEqual(h('a').events, ['down a->b', 'up a->b']);
  network.send('a', 'b', 7);
  scheduler.runUntilSync(100);
  assert.deepEqual(h('b').received.map((entry) => entry.message), [7]);
  network.failLink('a', 'b', { bothDirections: true });
  scheduler.runUntilSync(101);
  assert.deepEqual(h('b').events.slice(-2), ['down a->b', 'down b->a']);
});

test('a short partition holds cross-group messages and releases them in order on heal', () => {
  const { scheduler, network, h } = cluster(['a', 'b', 'c']);
  scheduler.runUntilSync(20);
  network.partition([['a'], ['b', 'c']], { detectMsMin: 100, detectMsMax: 100 });
  for (let message = 1; message <= 3; message++) network.send('a', 'b', message);
  network.send('b', 'c', 10);
  scheduler.runUntilSync(60);
  assert.deepEqual(h('b').received, [], 'held while partitioned');
  assert.deepEqual(h('c').received.map((entry) => entry.message), [10], 'inside a group traffic flows');
  network.heal();
  scheduler.runUntilSync(100);
  assert.deepEqual(h('b').received.map((entry) => entry.message), [1, 2, 3]);
  assert.ok(!h('a').events.some((event) => event.startsWith('down')), 'no link failed');
});

test('a long partition fails the cut links once detected; they reconnect only after heal', () => {
  const { scheduler, network, h } = cluster(['a', 'b', 'c']);
  scheduler.runUntilSync(20);
  network.partition([['a'], ['b', 'c']], { detectMsMin: 30, detectMsMax: 30 });
  network.send('a', 'b', 1);
  scheduler.runUntilSync(200);
  assert.deepEqual(h('b').received, []);
  assert.equal(network.stats.droppedInFlight, 1);
  assert.deepEqual(h('a').events.filter((event) => event.startsWith('down')).sort(), ['down a->b', 'down a->c', 'down b->a', 'down c->a']);
  assert.equal(network.linkStatus('a', 'b'), 'down');
  assert.equal(network.linkStatus('b', 'c'), 'up');
  network.heal();
  scheduler.runUntilSync(220);
  assert.equal(network.linkStatus('a', 'b'), 'up');
  assert.equal(network.settled, true);
  assert.throws(() => network.partition([['a'], ['b']]), /every node/);
  assert.throws(() => network.partition([['a', 'b'], ['b', 'c']]), /two partition groups/);
});

test('clogging delays messages without losing or reordering them', () => {
  const { scheduler, network, h } = cluster(['a', 'b']);
  scheduler.runUntilSync(20);
  network.clogNode('b', 100);
  for (let message = 1; message <= 4; message++) network.send('a', 'b', message);
  scheduler.runUntilSync(119);
  assert.deepEqual(h('b').received, []);
  scheduler.runUntilSync(200);
  assert.deepEqual(h('b').received.map((entry) => entry.message), [1, 2, 3, 4]);
  assert.ok(h('b').received.every((entry) => entry.atMs >= 120));
  network.clogLink('b', 'a', 50);
  network.send('b', 'a', 9);
  network.send('a', 'b', 5);
  scheduler.runUntilSync(240);
  assert.deepEqual(h('a').received, [], 'the clogged direction waits');
  assert.equal(h('b').received.at(-1)?.message, 5, 'the other direction flows');
  scheduler.runUntilSync(300);
  assert.deepEqual(h('a').received.map((entry) => entry.message), [9]);
  assert.equal(network.stats.droppedInFlight, 0);
});

test('a crashed node hears nothing more; peers hear linkDown; a restart reconnects with a new handler', () => {
  const { scheduler, network, h } = cluster(['a', 'b']);
  scheduler.runUntilSync(20);
  network.send('a', 'b', 1);
  network.crash('b');
  network.send('a', 'b', 2);
  network.send('b', 'a', 3); // stale code of the dead incarnation
  scheduler.runUntilSync(100);
  assert.deepEqual(h('b').received, []);
  assert.ok(!h('b').events.some((event) => event.startsWith('down')), 'the dead incarnation is not called');
  assert.deepEqual(h('a').events.filter((event) => event.startsWith('down')).sort(), ['down a->b', 'down b->a']);
  assert.equal(network.stats.droppedSenderDown, 1);
  assert.equal(network.isUp('b'), false);
  const reborn = recorder(scheduler);
  network.start('b', reborn);
  scheduler.runUntilSync(120);
  assert.deepEqual(reborn.events.sort(), ['up a->b', 'up b->a']);
  network.send('a', 'b', 4);
  scheduler.runUntilSync(200);
  assert.deepEqual(reborn.received.map((entry) => entry.message), [4]);
  assert.deepEqual(h('b').received, []);
  assert.throws(() => network.start('b', reborn), /already up/);
});

test('a full link queue fails the link instead of growing', () => {
  const { scheduler, network, h } = cluster(['a', 'b'], { ...QUIET, queueMessagesMax: 4 });
  scheduler.runUntilSync(20);
  for (let message = 1; message <= 5; message++) network.send('a', 'b', message);
  assert.equal(network.stats.droppedOverflow, 1);
  assert.equal(network.stats.droppedInFlight, 4);
  assert.equal(network.linkStatus('a', 'b'), 'connecting');
  scheduler.runUntilSync(100);
  assert.deepEqual(h('b').received, []);
  assert.deepEqual(h('a').events.slice(-2), ['down a->b', 'up a->b']);
});

test('random faults from a seed reproduce exactly, and stopFaults lets the network settle', () => {
  const run = (seed: number) => {
    const profile = NETWORK_PROFILES.find((candidate) => candidate.name === 'chaos')!;
    const { scheduler, network, handlers } = cluster(['a', 'b', 'c'], profile, seed);
    network.startFaults();
    let message = 0;
    const chatter = (): void => {
      for (const source of ['a', 'b', 'c']) for (const target of ['a', 'b', 'c']) if (source !== target) network.send(source, target, message++);
      if (scheduler.nowMs() < 2000) scheduler.after(3, chatter);
    };
    scheduler.after(0, chatter);
    scheduler.runUntilSync(2000);
    network.stopFaults();
    scheduler.runUntilSync(() => network.settled, { stepsMax: 100_000 });
    const log = [...handlers.values()].flatMap((handler) => [...handler.events, ...handler.received.map((entry) => `${entry.source}:${entry.message}@${entry.atMs}`)]);
    return { stats: { ...network.stats }, log, trace: scheduler.trace.tail() };
  };
  const first = run(99);
  assert.deepEqual(run(99), first);
  assert.notDeepEqual(run(100).log, first.log);
  assert.ok(first.stats.linkFailures > 0 && first.stats.partitions > 0 && first.stats.clogs > 0, JSON.stringify(first.stats));
  assert.ok(first.stats.droppedInFlight > 0 && first.stats.delivered > 1000, JSON.stringify(first.stats));
});

test('randomNetworkProfile picks every named profile over many seeds and keeps them valid', () => {
  const names = new Set<string>();
  for (let seed = 0; seed < 200; seed++) {
    const profile = randomNetworkProfile(new Prng(seed));
    names.add(profile.name);
    const scheduler = new Scheduler({ seed });
    new SimNetwork<number>({ scheduler, prng: new Prng(seed), nodes: ['a', 'b'], profile });
  }
  assert.deepEqual([...names].sort(), NETWORK_PROFILES.map((profile) => profile.name).sort());
  const scheduler = new Scheduler({ seed: 1 });
  assert.throws(() => new SimNetwork<number>({ scheduler, prng: new Prng(1), nodes: ['a'], profile: { ...QUIET, delayMsMin: 9, delayMsMax: 3 } }), /delayMs range/);
  assert.throws(() => new SimNetwork<number>({ scheduler, prng: new Prng(1), nodes: ['a', 'a'] }), /twice/);
});
