// A simulated network between named nodes, carrying opaque messages over connection-like links,
// the way mirrorsan's peers talk over TCP.
//
// Model (one link per ordered pair source -> target):
// - A link is down, connecting or up. Only an up link carries messages, in FIFO order (like a
//   TCP stream): each message gets the link's base delay (drawn at each connect) plus jitter,
//   and never overtakes the message sent before it. Messages on different links reorder freely.
// - A link failure (random fault, queue overflow, partition detected, node crash) drops every
//   message in flight on it and tells both ends (linkDown); the link then reconnects after a
//   delay and tells both ends again (linkUp). Nothing else is ever lost or duplicated: "loss on
//   reconnect" is the in-flight messages, "duplication on reconnect" is what a protocol resends
//   after linkUp that the other end had in fact received. Sending on a link that is not up
//   drops the message (writing to a closed socket).
// - A partition splits the nodes into groups. Links across groups first hold their messages
//   (the cable is cut but TCP has not noticed) and fail after a detection delay; healing before
//   that releases the held messages in order. Links cannot reconnect across groups.
// - Clogging (FoundationDB's "swizzle-clogging") holds a node's or a link's messages for a
//   while without failing anything: they arrive late, in order.
// - A crashed node's links fail; it receives nothing until start() brings it back.
// Notifications are delivered as events (never synchronously inside send/crash/partition), so
// protocol code never re-enters itself. Every random choice comes from the network's PRNG.
import { assert } from '../errors.js';
import type { Prng } from './prng.js';
import type { ScheduledEvent, Scheduler } from './scheduler.js';

export type NodeId = string;

export interface Link {
  readonly source: NodeId;
  readonly target: NodeId;
}

/** What a node's I/O shell hands the network; both ends of a link hear about it. */
export interface NetworkHandler<M> {
  /** A message `source` sent on the link source -> this node, in send order. */
  receive(source: NodeId, message: M): void;
  /** `link` (this node is its source or target) is up: messages sent on it may now arrive. */
  linkUp(link: Link): void;
  /**
   * `link` went down: every message in flight on it is lost, and messages sent on it are
   * dropped until linkUp. What the source needs delivered it must send again after linkUp.
   */
  linkDown(link: Link): void;
}

/** Delays, limits and fault rates. Intervals are drawn uniformly in [1, 2 * mean]; 0 disables a fault. */
export interface NetworkProfile {
  readonly name: string;
  /** Base one-way latency of a connection, drawn at each connect. */
  readonly delayMsMin: number;
  readonly delayMsMax: number;
  /** Extra delay per message, uniform in [0, jitterMsMax]; FIFO still holds. */
  readonly jitterMsMax: number;
  /** Time to (re)establish a link once both ends are up and can reach each other. */
  readonly connectMsMin: number;
  readonly connectMsMax: number;
  /** Messages in flight per link; one more fails the link (the send buffer overflowed). */
  readonly queueMessagesMax: number;
  readonly linkFailureMeanIntervalMs: number;
  readonly partitionMeanIntervalMs: number;
  readonly partitionMsMin: number;
  readonly partitionMsMax: number;
  /** How long a cut link holds its messages before it fails (TCP keepalive, heartbeats). */
  readonly partitionDetectMsMin: number;
  readonly partitionDetectMsMax: number;
  readonly clogMeanIntervalMs: number;
  readonly clogMsMin: number;
  readonly clogMsMax: number;
}

const CALM: NetworkProfile = {
  name: 'calm',
  delayMsMin: 1,
  delayMsMax: 5,
  jitterMsMax: 3,
  connectMsMin: 5,
  connectMsMax: 20,
  queueMessagesMax: 1024,
  linkFailureMeanIntervalMs: 0,
  partitionMeanIntervalMs: 0,
  partitionMsMin: 0,
  partitionMsMax: 0,
  partitionDetectMsMin: 0,
  partitionDetectMsMax: 0,
  clogMeanIntervalMs: 0,
  clogMsMin: 0,
  clogMsMax: 0,
};

/** Named fault mixes; randomNetworkProfile() picks one per seed and varies its rates. */
export const NETWORK_PROFILES: readonly NetworkProfile[] = [
  CALM,
  { ...CALM, name: 'flaky-links', linkFailureMeanIntervalMs: 150 },
  {
    ...CALM,
    name: 'partitions',
    partitionMeanIntervalMs: 300,
    partitionMsMin: 10,
    partitionMsMax: 250,
    partitionDetectMsMin: 5,
    partitionDetectMsMax: 80,
  },
  { ...CALM, name: 'clogs', clogMeanIntervalMs: 80, clogMsMin: 5, clogMsMax: 150 },
  {
    ...CALM,
    name: 'chaos',
    delayMsMax: 20,
    jitterMsMax: 15,
    linkFailureMeanIntervalMs: 200,
    partitionMeanIntervalMs: 400,
    partitionMsMin: 10,
    partitionMsMax: 200,
    partitionDetectMsMin: 5,
    partitionDetectMsMax: 60,
    clogMeanIntervalMs: 150,
    clogMsMin: 5,
    clogMsMax: 100,
  },
];

/** A profile chosen from the seed: one of NETWORK_PROFILES with its fault intervals scaled by 0.5x to 2x. */
export function randomNetworkProfile(prng: Prng): NetworkProfile {
  const base = prng.pick(NETWORK_PROFILES);
  const scale = (intervalMs: number): number => (intervalMs === 0 ? 0 : Math.max(1, Math.round((intervalMs * prng.int(50, 200)) / 100)));
  return {
    ...base,
    linkFailureMeanIntervalMs: scale(base.linkFailureMeanIntervalMs),
    partitionMeanIntervalMs: scale(base.partitionMeanIntervalMs),
    clogMeanIntervalMs: scale(base.clogMeanIntervalMs),
  };
}

function validateProfile(profile: NetworkProfile): void {
  const ranges: Array<[string, number, number]> = [
    ['delayMs', profile.delayMsMin, profile.delayMsMax],
    ['connectMs', profile.connectMsMin, profile.connectMsMax],
    ['partitionMs', profile.partitionMsMin, profile.partitionMsMax],
    ['partitionDetectMs', profile.partitionDetectMsMin, profile.partitionDetectMsMax],
    ['clogMs', profile.clogMsMin, profile.clogMsMax],
  ];
  for (const [name, min, max] of ranges) {
    assert(Number.isSafeInteger(min) && Number.isSafeInteger(max) && 0 <= min && min <= max, `network profile ${profile.name}: ${name} range [${min}, ${max}] is invalid`);
  }
  for (const [name, value] of Object.entries(profile)) {
    if (typeof value === 'number') assert(Number.isSafeInteger(value) && value >= 0, `network profile ${profile.name}: ${name} must be a non-negative integer`);
  }
  assert(profile.connectMsMin >= 1, 'a connection takes at least 1 ms (linkUp must follow linkDown in time)');
  assert(profile.queueMessagesMax >= 1, 'a link must hold at least one message');
}

export interface NetworkStats {
  sent: number;
  delivered: number;
  /** Sent while the link was down or connecting. */
  droppedLinkDown: number;
  /** In flight when the link failed. */
  droppedInFlight: number;
  /** The message that overflowed a link's queue (the link failed with it). */
  droppedOverflow: number;
  /** Sent by a node the network considers crashed (stale code of a dead incarnation). */
  droppedSenderDown: number;
  linkFailures: number;
  linkUps: number;
  partitions: number;
  clogs: number;
}

export type LinkStatus = 'down' | 'connecting' | 'up';

interface InFlight<M> {
  readonly message: M;
  readonly deliverAtMs: number;
  readonly id: number;
}

interface LinkState<M> extends Link {
  status: LinkStatus;
  readonly queue: InFlight<M>[];
  baseDelayMs: number;
  /**
   * The previous message's due time: a message is never due before it. The queue is what makes
   * delivery FIFO; this keeps the due times (and trace lines) truthful about it.
   */
  lastDeliverAtMs: number;
  clogUntilMs: number;
  /** Held by a partition that has not been detected yet. */
  held: boolean;
  /** linkUp was announced for the current connection, so its failure must be announced too. */
  announced: boolean;
  pumpEvent: ScheduledEvent | undefined;
  connectEvent: ScheduledEvent | undefined;
  detectEvent: ScheduledEvent | undefined;
}

interface NodeState<M> {
  up: boolean;
  handler: NetworkHandler<M> | undefined;
  clogUntilMs: number;
}

export class SimNetwork<M> {
  readonly profile: NetworkProfile;
  readonly stats: NetworkStats = {
    sent: 0,
    delivered: 0,
    droppedLinkDown: 0,
    droppedInFlight: 0,
    droppedOverflow: 0,
    droppedSenderDown: 0,
    linkFailures: 0,
    linkUps: 0,
    partitions: 0,
    clogs: 0,
  };
  private readonly scheduler: Scheduler;
  private readonly prng: Prng;
  private readonly describe: (message: M) => string;
  private readonly nodes = new Map<NodeId, NodeState<M>>();
  private readonly links = new Map<string, LinkState<M>>();
  /** Partition group per node; undefined when the network is whole. */
  private groups: Map<NodeId, number> | undefined;
  private nextMessageId = 1;
  private faultEvents: ScheduledEvent[] = [];
  private faultsActive = false;
  private faultPartitionHeal: ScheduledEvent | undefined;

  constructor(options: {
    scheduler: Scheduler;
    prng: Prng;
    nodes: readonly NodeId[];
    profile?: NetworkProfile;
    /** One-line summary of a message for trace lines. */
    describe?: (message: M) => string;
  }) {
    this.scheduler = options.scheduler;
    this.prng = options.prng;
    this.profile = options.profile ?? CALM;
    validateProfile(this.profile);
    this.describe = options.describe ?? (() => 'message');
    assert(options.nodes.length >= 1, 'a network needs at least one node');
    for (const node of options.nodes) {
      assert(!this.nodes.has(node), `node ${node} listed twice`);
      this.nodes.set(node, { up: false, handler: undefined, clogUntilMs: 0 });
    }
    for (const source of options.nodes) {
      for (const target of options.nodes) {
        if (source === target) continue;
        this.links.set(linkKey(source, target), {
          source,
          target,
          status: 'down',
          queue: [],
          baseDelayMs: 0,
          lastDeliverAtMs: 0,
          clogUntilMs: 0,
          held: false,
          announced: false,
          pumpEvent: undefined,
          connectEvent: undefined,
          detectEvent: undefined,
        });
      }
    }
  }

  /** The node ids, in construction order. */
  get nodeIds(): NodeId[] {
    return [...this.nodes.keys()];
  }

  /**
   * Boots (or restarts) `node` with this incarnation's handler. Its links connect after the
   * profile's connect delay (those its partition group allows), announced by linkUp.
   */
  start(node: NodeId, handler: NetworkHandler<M>): void {
    const state = this.node(node);
    assert(!state.up, `node ${node} is already up`);
    state.up = true;
    state.handler = handler;
    this.scheduler.log(`net start ${node}`);
    for (const link of this.linksOf(node)) this.maybeConnect(link);
  }

  /** The node's process is gone: its links fail (peers hear linkDown) and it hears nothing more. */
  crash(node: NodeId): void {
    const state = this.node(node);
    assert(state.up, `node ${node} is not up`);
    state.up = false;
    state.handler = undefined;
    this.scheduler.log(`net crash ${node}`);
    for (const link of this.linksOf(node)) this.failLinkState(link, 'node crashed');
  }

  isUp(node: NodeId): boolean {
    return this.node(node).up;
  }

  send(source: NodeId, target: NodeId, message: M): void {
    assert(source !== target, `node ${source} sends to itself`);
    const link = this.link(source, target);
    this.stats.sent++;
    if (!this.node(source).up) {
      this.stats.droppedSenderDown++;
      return;
    }
    if (link.status !== 'up') {
      this.stats.droppedLinkDown++;
      if (this.scheduler.trace.enabled) this.scheduler.log(`net drop ${source}->${target} (link ${link.status}) ${this.describe(message)}`);
      return;
    }
    if (link.queue.length >= this.profile.queueMessagesMax) {
      this.stats.droppedOverflow++;
      this.failLinkState(link, `queue overflow at ${link.queue.length} messages`);
      return;
    }
    const earliestMs = this.scheduler.nowMs() + link.baseDelayMs + this.prng.int(0, this.profile.jitterMsMax);
    const deliverAtMs = Math.max(earliestMs, link.lastDeliverAtMs);
    link.lastDeliverAtMs = deliverAtMs;
    const id = this.nextMessageId++;
    link.queue.push({ message, deliverAtMs, id });
    if (this.scheduler.trace.enabled) this.scheduler.log(`net send ${source}->${target} #${id} due ${deliverAtMs}ms ${this.describe(message)}`);
    this.pump(link);
  }

  /** Fails the link source -> target (and target -> source with bothDirections, like a TCP reset). */
  failLink(source: NodeId, target: NodeId, options: { bothDirections?: boolean } = {}): void {
    this.failLinkState(this.link(source, target), 'failed');
    if (options.bothDirections) this.failLinkState(this.link(target, source), 'failed');
  }

  /**
   * Splits the nodes into `groups` (every node in exactly one). Replaces any earlier partition;
   * random faults (startFaults) partition and heal too, so use one or the other at a time.
   */
  partition(groups: readonly (readonly NodeId[])[], options: { detectMsMin?: number; detectMsMax?: number } = {}): void {
    const assignment = new Map<NodeId, number>();
    groups.forEach((group, index) => {
      for (const node of group) {
        this.node(node);
        assert(!assignment.has(node), `node ${node} is in two partition groups`);
        assignment.set(node, index);
      }
    });
    assert(assignment.size === this.nodes.size, 'a partition must place every node in a group');
    const detectMsMin = options.detectMsMin ?? this.profile.partitionDetectMsMin;
    const detectMsMax = options.detectMsMax ?? this.profile.partitionDetectMsMax;
    assert(0 <= detectMsMin && detectMsMin <= detectMsMax, 'partition detection range is invalid');
    this.heal();
    this.groups = assignment;
    this.stats.partitions++;
    this.scheduler.log(`net partition ${groups.map((group) => `[${group.join(',')}]`).join(' ')}`);
    for (const link of this.links.values()) {
      if (this.sameGroup(link)) continue;
      if (link.status === 'connecting') this.stopConnecting(link);
      if (link.status !== 'up') continue;
      link.held = true;
      link.pumpEvent?.cancel();
      link.pumpEvent = undefined;
      link.detectEvent = this.scheduler.after(
        this.prng.int(detectMsMin, detectMsMax),
        () => {
          link.detectEvent = undefined;
          this.failLinkState(link, 'partition detected');
        },
        'net partition detect',
      );
    }
  }

  /** Ends any partition: held messages flow again, failed links reconnect. */
  heal(): void {
    if (this.groups === undefined) return;
    this.groups = undefined;
    this.scheduler.log('net heal');
    for (const link of this.links.values()) {
      if (link.held) {
        link.held = false;
        link.detectEvent?.cancel();
        link.detectEvent = undefined;
        this.pump(link);
      }
      this.maybeConnect(link);
    }
  }

  /** Holds every message to or from `node` for `durationMs` (they arrive late, in order). */
  clogNode(node: NodeId, durationMs: number): void {
    const state = this.node(node);
    state.clogUntilMs = Math.max(state.clogUntilMs, this.scheduler.nowMs() + durationMs);
    this.stats.clogs++;
    this.scheduler.log(`net clog node ${node} until ${state.clogUntilMs}ms`);
  }

  /** Holds the messages of one direction of a link for `durationMs`. */
  clogLink(source: NodeId, target: NodeId, durationMs: number): void {
    const link = this.link(source, target);
    link.clogUntilMs = Math.max(link.clogUntilMs, this.scheduler.nowMs() + durationMs);
    this.stats.clogs++;
    this.scheduler.log(`net clog ${source}->${target} until ${link.clogUntilMs}ms`);
  }

  /** Starts the profile's random faults: link failures, partitions, clogs. */
  startFaults(): void {
    assert(!this.faultsActive, 'faults already started');
    this.faultsActive = true;
    const profile = this.profile;
    this.scheduleFault(profile.linkFailureMeanIntervalMs, () => this.randomLinkFailure());
    this.scheduleFault(profile.partitionMeanIntervalMs, () => this.randomPartition());
    this.scheduleFault(profile.clogMeanIntervalMs, () => this.randomClog());
  }

  /** Stops random faults and undoes their lasting effects (partition, clogs): the network settles. */
  stopFaults(): void {
    this.faultsActive = false;
    for (const event of this.faultEvents) event.cancel();
    this.faultEvents = [];
    this.faultPartitionHeal?.cancel();
    this.faultPartitionHeal = undefined;
    this.heal();
    const nowMs = this.scheduler.nowMs();
    for (const state of this.nodes.values()) state.clogUntilMs = Math.min(state.clogUntilMs, nowMs);
    for (const link of this.links.values()) {
      link.clogUntilMs = Math.min(link.clogUntilMs, nowMs);
      // A pump event waiting for a clog to end is now too late: bring it forward.
      link.pumpEvent?.cancel();
      link.pumpEvent = undefined;
      this.pump(link);
    }
    this.scheduler.log('net faults stopped');
  }

  linkStatus(source: NodeId, target: NodeId): LinkStatus {
    return this.link(source, target).status;
  }

  /** Messages in flight on every link. */
  get inFlight(): number {
    let count = 0;
    for (const link of this.links.values()) count += link.queue.length;
    return count;
  }

  /** No message in flight and every link whose ends are up and can reach each other is up. */
  get settled(): boolean {
    for (const link of this.links.values()) {
      if (link.queue.length > 0) return false;
      if (this.allowed(link) && link.status !== 'up') return false;
    }
    return true;
  }

  // ---- internals -------------------------------------------------------------------------

  private node(node: NodeId): NodeState<M> {
    const state = this.nodes.get(node);
    assert(state !== undefined, `unknown node ${node}`);
    return state;
  }

  private link(source: NodeId, target: NodeId): LinkState<M> {
    const link = this.links.get(linkKey(source, target));
    assert(link !== undefined, `unknown link ${source}->${target}`);
    return link;
  }

  private linksOf(node: NodeId): LinkState<M>[] {
    return [...this.links.values()].filter((link) => link.source === node || link.target === node);
  }

  private sameGroup(link: Link): boolean {
    return this.groups === undefined || this.groups.get(link.source) === this.groups.get(link.target);
  }

  private allowed(link: Link): boolean {
    return this.node(link.source).up && this.node(link.target).up && this.sameGroup(link);
  }

  private clogEndMs(link: LinkState<M>): number {
    return Math.max(link.clogUntilMs, this.node(link.source).clogUntilMs, this.node(link.target).clogUntilMs);
  }

  private maybeConnect(link: LinkState<M>): void {
    if (link.status !== 'down' || !this.allowed(link)) return;
    link.status = 'connecting';
    link.connectEvent = this.scheduler.after(
      this.prng.int(this.profile.connectMsMin, this.profile.connectMsMax),
      () => {
        link.connectEvent = undefined;
        assert(link.status === 'connecting' && this.allowed(link), 'a connecting link is cancelled when it stops being allowed');
        link.status = 'up';
        link.baseDelayMs = this.prng.int(this.profile.delayMsMin, this.profile.delayMsMax);
        link.lastDeliverAtMs = this.scheduler.nowMs();
        link.announced = true;
        this.stats.linkUps++;
        this.scheduler.log(`net up ${link.source}->${link.target} delay ${link.baseDelayMs}ms`);
        this.announce(link.source, link, 'linkUp');
        this.announce(link.target, link, 'linkUp');
      },
      'net connect',
    );
  }

  private stopConnecting(link: LinkState<M>): void {
    link.connectEvent?.cancel();
    link.connectEvent = undefined;
    link.status = 'down';
  }

  private failLinkState(link: LinkState<M>, reason: string): void {
    if (link.status === 'connecting') {
      this.stopConnecting(link);
    } else if (link.status === 'up') {
      this.stats.linkFailures++;
      this.stats.droppedInFlight += link.queue.length;
      this.scheduler.log(`net down ${link.source}->${link.target} (${reason}) dropped ${link.queue.length}`);
      link.queue.length = 0;
      link.status = 'down';
      link.held = false;
      link.pumpEvent?.cancel();
      link.pumpEvent = undefined;
      link.detectEvent?.cancel();
      link.detectEvent = undefined;
      if (link.announced) {
        link.announced = false;
        this.announce(link.source, link, 'linkDown');
        this.announce(link.target, link, 'linkDown');
      }
    }
    this.maybeConnect(link);
  }

  /** Tells `node`'s current incarnation about `link`, as an event (never re-entrantly). */
  private announce(node: NodeId, link: Link, kind: 'linkUp' | 'linkDown'): void {
    const handler = this.node(node).handler;
    if (handler === undefined) return;
    const view: Link = { source: link.source, target: link.target };
    this.scheduler.after(
      0,
      () => {
        // A crash (and restart) in between means this news is for a dead incarnation.
        if (this.node(node).handler === handler) handler[kind](view);
      },
      `net ${kind}`,
    );
  }

  private pump(link: LinkState<M>): void {
    if (link.pumpEvent !== undefined || link.status !== 'up' || link.held) return;
    const head = link.queue[0];
    if (head === undefined) return;
    const atMs = Math.max(head.deliverAtMs, this.clogEndMs(link), this.scheduler.nowMs());
    link.pumpEvent = this.scheduler.at(atMs, () => this.deliverHead(link), 'net deliver');
  }

  private deliverHead(link: LinkState<M>): void {
    link.pumpEvent = undefined;
    if (link.status !== 'up' || link.held) return;
    const head = link.queue[0];
    if (head === undefined) return;
    const nowMs = this.scheduler.nowMs();
    if (head.deliverAtMs > nowMs || this.clogEndMs(link) > nowMs) {
      this.pump(link); // a clog started after this delivery was scheduled
      return;
    }
    link.queue.shift();
    this.stats.delivered++;
    const handler = this.node(link.target).handler;
    assert(handler !== undefined, `link ${link.source}->${link.target} is up but its target has no handler`);
    if (this.scheduler.trace.enabled) this.scheduler.log(`net deliver ${link.source}->${link.target} #${head.id} ${this.describe(head.message)}`);
    handler.receive(link.source, head.message);
    this.pump(link);
  }

  private scheduleFault(meanIntervalMs: number, fire: () => void): void {
    if (meanIntervalMs === 0 || !this.faultsActive) return;
    const event = this.scheduler.after(
      this.prng.int(1, 2 * meanIntervalMs),
      () => {
        this.faultEvents = this.faultEvents.filter((pending) => pending !== event);
        if (!this.faultsActive) return;
        fire();
        this.scheduleFault(meanIntervalMs, fire);
      },
      'net fault',
    );
    this.faultEvents.push(event);
  }

  private randomLinkFailure(): void {
    const up = [...this.links.values()].filter((link) => link.status === 'up');
    if (up.length === 0) return;
    const link = this.prng.pick(up);
    this.failLink(link.source, link.target, { bothDirections: true });
  }

  private randomPartition(): void {
    if (this.groups !== undefined || this.nodes.size < 2) return;
    const nodes = this.prng.shuffle(this.nodeIds);
    // Half the time isolate one node (the common failure); otherwise split at a random point.
    const cut = this.prng.chance(0.5) ? 1 : this.prng.int(1, nodes.length - 1);
    this.partition([nodes.slice(0, cut), nodes.slice(cut)]);
    this.faultPartitionHeal = this.scheduler.after(
      this.prng.int(this.profile.partitionMsMin, this.profile.partitionMsMax),
      () => {
        this.faultPartitionHeal = undefined;
        this.heal();
      },
      'net heal',
    );
  }

  private randomClog(): void {
    const durationMs = this.prng.int(this.profile.clogMsMin, this.profile.clogMsMax);
    if (this.prng.chance(0.5)) {
      this.clogNode(this.prng.pick(this.nodeIds), durationMs);
    } else {
      const link = this.prng.pick([...this.links.values()]);
      this.clogLink(link.source, link.target, durationMs);
    }
  }
}

function linkKey(source: NodeId, target: NodeId): string {
  return `${source}\u0000${target}`;
}
