// The grant protocol run end to end in the seeded simulator (src/testing/): three nodes, one of
// them also the arbiter, all of them writers; the network delays, reorders across links, and
// (per the seed's fault profile) fails links, partitions and clogs them. Clients on every node
// issue random overlapping writes of one to three regions. A write executes only once its
// node's Holder admits it; "every in-sync member acknowledged it" comes after a random
// simulated delay, and then the write completes.
//
// The checkers (any breach throws an InvariantViolation wrapped with the seed):
// - mutual exclusion: no two nodes ever have admitted, unacknowledged writes on one region;
// - generation order: the writes admitted on a region carry non-decreasing generations, and a
//   generation belongs to exactly one node (so every replica applies conflicting writes in
//   grant order: I4's premise);
// - FIFO at the arbiter: a region is granted to the requesters it queued, in queue order;
// - liveness: once faults stop, every write completes before a deadline (no deadlock, no
//   starvation), and then every grant a node believes it holds is the arbiter's too.
// Epoch changes (about half the seeds, one or two per run): the coordinator moves the volume to
// a new epoch with a randomly chosen arbiter; each node hears of it after its own delay (or
// skips an epoch it heard of too late). Mutual exclusion must hold across epochs too: that is
// what the holders' drain and the new arbiter's DRAINED fence are for.
// Nodes do not crash here (a crash loses the holder's table; the membership layer fences such a
// node with its lease, which belongs to that layer's simulation).
import { assert } from '../errors.js';
import { SimNetwork, randomNetworkProfile, type Link, type NetworkHandler } from '../testing/network.js';
import { Prng } from '../testing/prng.js';
import { Scheduler } from '../testing/scheduler.js';
import type { SeedRun } from '../testing/seeds.js';
import { InvariantViolation } from '../testing/trace.js';
import { scheduleEpochChanges } from '../testing/epoch-changes.js';
import { Arbiter, type ArbiterBug, type ArbiterEffect } from './arbiter.js';
import { Holder, type HolderBug, type HolderEffect } from './holder.js';
import { describePolicingMessage, policingRecipient, type NodeId, type PolicingMessage } from './messages.js';
import { regionsOf } from './regions.js';

export interface PolicingScenarioOptions {
  holderBug?: HolderBug;
  arbiterBug?: ArbiterBug;
  /** Simulated time during which clients write and faults happen. Default 800 ms. */
  workloadMs?: number;
  clientsPerNode?: number;
  regionCount?: number;
  /** Random link failures, partitions and clogs from the seed's profile. Default true. */
  faults?: boolean;
  /** Probability that a run has epoch changes (one or two). Default 0.5. */
  epochChangeProbability?: number;
  /** The arbiter's queue bound per region. Default 2 (every other node: never full). */
  waitersPerRegionMax?: number;
}

export interface PolicingScenarioReport {
  seed: number;
  networkProfile: string;
  writesCompleted: number;
  writesRefused: number;
  /** Admissions on a region whose previous admission was another node's: real contention. */
  handovers: number;
  grants: number;
  revokes: number;
  holdOverdue: number;
  epochChanges: number;
  linkFailures: number;
  steps: number;
}

const NODES: readonly NodeId[] = ['n1', 'n2', 'n3'];
const FIRST_ARBITER: NodeId = 'n1';
const VOLUME = 'vol';
const FIRST_EPOCH = 1;
const RESEND_INTERVAL_MS = 50;
const REGION_SIZE_BYTES = 4096;
const TICK_INTERVAL_MS = 10;
const GRANT_HOLD_MAX_MS = 200;
/** Liveness: once faults and new writes stop, everything must complete within this. */
const SETTLE_DEADLINE_MS = 10_000;
const STEPS_MAX = 500_000;

export function runPolicingScenario(seed: number, run: SeedRun, options: PolicingScenarioOptions = {}): PolicingScenarioReport {
  const workloadMs = options.workloadMs ?? 800;
  const clientsPerNode = options.clientsPerNode ?? 2;
  const regionCount = options.regionCount ?? 6;
  const root = new Prng(seed);
  const scheduler = new Scheduler({ seed, trace: run.trace });
  const profile = randomNetworkProfile(root.fork('network-profile'));
  const network = new SimNetwork<PolicingMessage>({ scheduler, prng: root.fork('network'), nodes: NODES, profile, describe: describePolicingMessage });
  const workload = root.fork('workload');
  scheduler.log(`seed ${seed} profile ${profile.name} holderBug ${options.holderBug ?? 'none'} arbiterBug ${options.arbiterBug ?? 'none'}`);
  const report: PolicingScenarioReport = {
    seed,
    networkProfile: profile.name,
    writesCompleted: 0,
    writesRefused: 0,
    handovers: 0,
    grants: 0,
    revokes: 0,
    holdOverdue: 0,
    epochChanges: 0,
    linkFailures: 0,
    steps: 0,
  };

  const violation = (invariant: string, message: string): never => {
    throw scheduler.failure(`${invariant} violated: ${message}`, new InvariantViolation(invariant, message));
  };

  // ---- checkers --------------------------------------------------------------------------
  /** region -> node -> admitted, unacknowledged writes. */
  const active = new Map<number, Map<NodeId, number>>();
  const lastAdmission = new Map<number, { epoch: number; generation: number; node: NodeId }>();
  /** "region/epoch/generation" -> the node it was granted to. */
  const generationOwner = new Map<string, NodeId>();
  /** The arbiter's queue per "epoch/region", as its 'queued' effects announced it. */
  const fifo = new Map<string, NodeId[]>();
  const lastGrantGeneration = new Map<string, number>();

  const checkAdmission = (node: NodeId, writeId: number, epoch: number, regions: readonly number[], generations: readonly number[]): void => {
    regions.forEach((region, index) => {
      const generation = generations[index]!;
      const counts = active.get(region) ?? new Map<NodeId, number>();
      active.set(region, counts);
      for (const [other, count] of counts) {
        if (other !== node && count > 0) violation('mutual exclusion', `${node} admitted write ${writeId} on region ${region} (gen ${generation}) while ${other} has ${count} unacknowledged writes there`);
      }
      counts.set(node, (counts.get(node) ?? 0) + 1);
      const key = `${region}/${epoch}/${generation}`;
      const owner = generationOwner.get(key);
      if (owner !== undefined && owner !== node) violation('generation order', `region ${region} epoch ${epoch} generation ${generation} used by ${owner} and ${node}`);
      generationOwner.set(key, node);
      const last = lastAdmission.get(region);
      if (last !== undefined && (epoch < last.epoch || (epoch === last.epoch && generation < last.generation))) {
        violation('generation order', `${node} admitted write ${writeId} on region ${region} at ${epoch}/${generation} after ${last.epoch}/${last.generation}`);
      }
      if (last !== undefined && last.node !== node) report.handovers++;
      lastAdmission.set(region, { epoch, generation, node });
    });
  };
  const checkAcknowledged = (node: NodeId, regions: readonly number[]): void => {
    for (const region of regions) {
      const counts = active.get(region)!;
      const count = counts.get(node) ?? 0;
      assert(count > 0, `${node} acknowledged a write on region ${region} it never admitted`);
      counts.set(node, count - 1);
    }
  };
  const checkArbiterEffect = (epoch: number, effect: ArbiterEffect): void => {
    if (effect.kind === 'queued') {
      const queue = fifo.get(`${epoch}/${effect.region}`) ?? [];
      fifo.set(`${epoch}/${effect.region}`, queue);
      if (effect.position !== queue.length) violation('FIFO', `arbiter queued ${effect.node} at ${effect.position} on region ${effect.region}, model queue is [${queue.join(',')}]`);
      queue.push(effect.node);
    } else if (effect.kind === 'send' && effect.message.type === 'GRANT') {
      const region = effect.message.region;
      const previous = lastGrantGeneration.get(`${epoch}/${region}`) ?? 0;
      if (effect.message.generation <= previous) return; // a resend of a grant already counted
      if (effect.message.generation !== previous + 1) violation('generation order', `region ${region} granted at ${effect.message.generation} after ${previous}`);
      lastGrantGeneration.set(`${epoch}/${region}`, effect.message.generation);
      report.grants++;
      const queue = fifo.get(`${epoch}/${region}`) ?? [];
      if (queue.length > 0) {
        if (queue[0] !== effect.target) violation('FIFO', `region ${region} granted to ${effect.target}, but [${queue.join(',')}] were queued first`);
        queue.shift();
      }
    } else if (effect.kind === 'send' && effect.message.type === 'REVOKE') {
      report.revokes++;
    } else if (effect.kind === 'holdOverdue') {
      report.holdOverdue++;
    }
  };

  // ---- nodes -----------------------------------------------------------------------------
  let clientsActive = true;
  let nextWriteId = 1;
  let writesIssued = 0;
  interface WriteRecord {
    node: NodeId;
    client: number;
    regions: readonly number[];
  }
  const writes = new Map<number, WriteRecord>();

  class PolicingNode implements NetworkHandler<PolicingMessage> {
    readonly id: NodeId;
    readonly holder: Holder;
    /** The arbiter this node runs for the newest epoch it knows, if it is that epoch's arbiter. */
    arbiter: Arbiter | undefined;
    knownEpoch = FIRST_EPOCH;

    constructor(id: NodeId) {
      this.id = id;
      this.holder = new Holder({
        volume: VOLUME,
        epoch: FIRST_EPOCH,
        self: id,
        arbiter: FIRST_ARBITER,
        regionCount,
        waitingWritesMax: 64,
        grantHoldMaxMs: GRANT_HOLD_MAX_MS,
        resendIntervalMs: RESEND_INTERVAL_MS,
        bug: options.holderBug ?? 'none',
      });
      this.arbiter = id === FIRST_ARBITER ? newArbiter(FIRST_EPOCH) : undefined;
    }

    /** The coordinator's news of a new epoch reaches this node. */
    epochChanged(epoch: number, arbiter: NodeId): void {
      if (epoch <= this.knownEpoch) return; // heard of a newer one first
      this.knownEpoch = epoch;
      scheduler.log(`${this.id} learns epoch ${epoch} arbiter ${arbiter}`);
      this.arbiter = arbiter === this.id ? newArbiter(epoch) : undefined;
      this.runHolder(this.holder.changeEpoch(epoch, arbiter));
    }

    receive(source: NodeId, message: PolicingMessage): void {
      const arbiter = this.arbiter;
      if (policingRecipient(message, (epoch) => arbiter?.epoch === epoch) === 'holder') {
        this.runHolder(this.holder.receive(source, message));
      } else if (arbiter !== undefined) {
        this.runArbiter(arbiter.receive(source, message));
      } else {
        // Meant for an arbiter this node no longer (or not yet) runs: the sender resends.
        scheduler.log(`${this.id} drops ${describePolicingMessage(message)} from ${source}: not an arbiter`);
      }
    }
    linkUp(link: Link): void {
      const peer = link.source === this.id ? link.target : link.source;
      this.runHolder(this.holder.linkUp(peer));
      if (this.arbiter !== undefined) this.runArbiter(this.arbiter.linkUp(peer));
    }
    linkDown(): void {
      // Nothing to do: what was lost is resent on linkUp.
    }

    tick(): void {
      const nowMs = scheduler.nowMs();
      this.runHolder(this.holder.tick(nowMs));
      if (this.arbiter !== undefined) this.runArbiter(this.arbiter.tick(nowMs));
      scheduler.after(TICK_INTERVAL_MS, () => this.tick(), `tick ${this.id}`);
    }

    write(client: number): void {
      const volumeBytes = regionCount * REGION_SIZE_BYTES;
      const offsetBytes = workload.int(0, volumeBytes - 1);
      const lengthBytes = Math.min(workload.int(1, 2 * REGION_SIZE_BYTES + 1), volumeBytes - offsetBytes);
      const regions = regionsOf(offsetBytes, lengthBytes, REGION_SIZE_BYTES);
      const writeId = nextWriteId++;
      writesIssued++;
      writes.set(writeId, { node: this.id, client, regions });
      scheduler.log(`${this.id} client ${client} write ${writeId} regions ${regions.join(',')}`);
      this.runHolder(this.holder.acquire(writeId, regions));
    }

    private send(target: NodeId, message: PolicingMessage, to: 'arbiter' | 'holder'): void {
      if (target !== this.id) {
        network.send(this.id, target, message);
        return;
      }
      // Between this node's own holder and arbiter: delivered locally, as an event (never
      // re-entrantly), in order; the direction is known, so DRAINED needs no guessing.
      scheduler.after(
        0,
        () => {
          if (to === 'holder') this.runHolder(this.holder.receive(this.id, message));
          else if (this.arbiter !== undefined) this.runArbiter(this.arbiter.receive(this.id, message));
        },
        'local',
      );
    }

    private runArbiter(effects: readonly ArbiterEffect[]): void {
      const arbiter = this.arbiter!;
      arbiter.assertInvariants();
      for (const effect of effects) {
        checkArbiterEffect(arbiter.epoch, effect);
        if (effect.kind === 'send') this.send(effect.target, effect.message, 'holder');
        else if (effect.kind !== 'queued') scheduler.log(`${this.id} arbiter ${effect.kind} ${JSON.stringify(effect)}`);
      }
    }

    private runHolder(effects: readonly HolderEffect[]): void {
      this.holder.assertInvariants();
      for (const effect of effects) {
        switch (effect.kind) {
          case 'send':
            this.send(effect.target, effect.message, 'arbiter');
            break;
          case 'admit': {
            scheduler.log(`${this.id} admit write ${effect.writeId} epoch ${effect.epoch} regions ${effect.regions.join(',')} gens ${effect.generations.join(',')}`);
            checkAdmission(this.id, effect.writeId, effect.epoch, effect.regions, effect.generations);
            // Executed locally and sent to the peers; every in-sync member acknowledges later.
            scheduler.after(workload.int(1, 40), () => this.acknowledged(effect.writeId), `ack ${effect.writeId}`);
            break;
          }
          case 'refuse':
            report.writesRefused++;
            this.finish(effect.writeId);
            break;
          case 'holdOverdue':
            report.holdOverdue++;
            scheduler.log(`${this.id} holdOverdue region ${effect.region}`);
            break;
          case 'ignored':
          case 'epochChanged':
            scheduler.log(`${this.id} ${effect.kind} ${JSON.stringify(effect)}`);
            break;
        }
      }
    }

    private acknowledged(writeId: number): void {
      const record = writes.get(writeId)!;
      checkAcknowledged(this.id, record.regions);
      scheduler.log(`${this.id} acknowledged write ${writeId}`);
      report.writesCompleted++;
      this.runHolder(this.holder.writeAcknowledged(writeId));
      this.finish(writeId);
    }

    private finish(writeId: number): void {
      const record = writes.get(writeId)!;
      writes.delete(writeId);
      scheduleClient(this, record.client);
    }
  }

  const newArbiter = (epoch: number): Arbiter =>
    new Arbiter({ volume: VOLUME, epoch, regionCount, waitersPerRegionMax: options.waitersPerRegionMax ?? NODES.length - 1, grantHoldMaxMs: GRANT_HOLD_MAX_MS, members: NODES, bug: options.arbiterBug ?? 'none' });
  const nodes = NODES.map((id) => new PolicingNode(id));
  // The coordinator: epoch changes at random times of the workload, each heard by every node
  // after its own delay.
  const coordinator = scheduleEpochChanges({
    scheduler,
    prng: root.fork('epochs'),
    probability: options.epochChangeProbability ?? 0.5,
    workloadMs,
    nodes: NODES,
    firstEpoch: FIRST_EPOCH,
    firstArbiter: FIRST_ARBITER,
    onChange: () => report.epochChanges++,
    deliver: (id, epoch, arbiter) => nodes.find((node) => node.id === id)!.epochChanged(epoch, arbiter),
  });
  const scheduleClient = (node: PolicingNode, client: number): void => {
    if (!clientsActive) return;
    scheduler.after(workload.int(0, 15), () => {
      if (clientsActive) node.write(client);
    }, `client ${node.id}/${client}`);
  };

  for (const node of nodes) network.start(node.id, node);
  for (const node of nodes) scheduler.after(TICK_INTERVAL_MS, () => node.tick(), `tick ${node.id}`);
  if (options.faults ?? true) network.startFaults();
  for (const node of nodes) for (let client = 0; client < clientsPerNode; client++) scheduleClient(node, client);

  report.steps += scheduler.runUntilSync(workloadMs, { stepsMax: STEPS_MAX }).steps;

  // Faults and new writes stop: every write issued must complete (liveness).
  clientsActive = false;
  network.stopFaults();
  const settled = (): boolean => writes.size === 0 && network.settled;
  report.steps += scheduler.runUntilSync(settled, { stepsMax: STEPS_MAX, deadlineMs: scheduler.nowMs() + SETTLE_DEADLINE_MS }).steps;

  // Quiescent: nothing waits, and whatever a node believes it holds, the arbiter agrees.
  const arbiter = nodes.find((node) => node.id === coordinator.arbiter)!.arbiter!;
  assert(arbiter.epoch === coordinator.epoch && !arbiter.fenced, 'the last epoch\'s arbiter runs, unfenced');
  for (const node of nodes) {
    if (node.holder.epoch !== coordinator.epoch) violation('liveness', `${node.id} is still in epoch ${node.holder.epoch}, not ${coordinator.epoch}`);
    if (node.holder.writesWaiting !== 0 || node.holder.writesAdmitted !== 0) violation('liveness', `${node.id} still has writes after settling`);
    for (let region = 0; region < regionCount; region++) {
      const grant = node.holder.grantOf(region);
      if (!grant.held) continue;
      const view = arbiter.region(region);
      if (view.holder !== node.id || view.generation !== grant.generation) {
        violation('grant agreement', `${node.id} holds region ${region} gen ${grant.generation}, the arbiter says ${view.holder ?? 'nobody'} gen ${view.generation}`);
      }
    }
  }
  assert(writesIssued === report.writesCompleted + report.writesRefused, 'every write issued completed or was refused');
  report.linkFailures = network.stats.linkFailures;
  return report;
}
