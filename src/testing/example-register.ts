// A small but real protocol that proves the simulator end to end: a primary-backup replicated
// register of a few blocks, on three simulated nodes with a simulated network and disks.
//
// Protocol (primary n1, backups n2 and n3, fixed membership: no coordinator):
// - A client write gets the next sequence number at the primary, goes into the primary's log
//   (appended and fdatasynced), and only then is sent to every backup (so no backup ever holds
//   an entry the primary could have lost in an ordinary crash). A backup appends it, syncs,
//   and acknowledges cumulatively. The primary commits an entry once it is durable everywhere
//   (I1), applies it to the readable state, and answers the client. Reads are served from the
//   committed state at the primary.
// - Links fail and reconnect: on every linkUp a backup says hello{durable sequence}; the
//   primary resends from there (duplicates of entries the backup already has are re-acked,
//   never re-applied).
// - A restarted primary may have lost its log's tail (torn writes) or its whole disk (a
//   replaced drive). It recovers by fetching every backup's log and adopting the longest of
//   them and its own (they are all prefixes of one history: the primary never reuses a
//   sequence any replica holds). Until all of that is committed again it serves no reads: a
//   read must not see an entry a later failure could still lose.
// - Log records carry a CRC32C (I5): recovery keeps the longest valid prefix and cuts the rest.
//
// Fault model of the scenario (runRegisterScenario): the network's seeded fault profile; crashes
// and restarts of every node, with unsynced writes lost or torn; the primary's disk is
// sometimes replaced by an empty one; n2's disk sometimes flips a bit at rest. n3's disk is
// never wiped or corrupted: every acknowledged write always has one intact copy, which is I1's
// premise ("while at least one member of the in-sync set survives").
//
// RegisterBug switches on a deliberate mistake, to show that the checkers catch it.
import { assert } from '../errors.js';
import { crc32c } from '../util/crc32c.js';
import { BlockHistory, assertCheck, checkReplicasConverged, type CheckResult } from './checker.js';
import { HONEST_DISK_PROFILES, SimDisk, randomDiskProfile, type DiskProfile, type SimFile } from './disk.js';
import { SimNetwork, randomNetworkProfile, type Link, type NetworkHandler, type NodeId } from './network.js';
import { Prng } from './prng.js';
import { Scheduler, type ScheduledEvent } from './scheduler.js';
import type { SeedRun } from './seeds.js';
import { InvariantViolation } from './trace.js';

// ---- log records (pure codec) ---------------------------------------------------------------

export interface RegisterEntry {
  readonly seq: number;
  readonly block: number;
  /** The value written: unique per write in the scenario, so checkers can tell writes apart. */
  readonly tag: number;
}

/** magic u32 | seq u32 | block u32 | tag u32 | crc32c u32 of the first 16 bytes, big-endian. */
export const REGISTER_RECORD_BYTES = 20;
const REGISTER_RECORD_MAGIC = 0x52454731; // "REG1"

export function encodeRegisterRecord(entry: RegisterEntry): Buffer {
  const record = Buffer.alloc(REGISTER_RECORD_BYTES);
  record.writeUInt32BE(REGISTER_RECORD_MAGIC, 0);
  record.writeUInt32BE(entry.seq, 4);
  record.writeUInt32BE(entry.block, 8);
  record.writeUInt32BE(entry.tag, 12);
  record.writeUInt32BE(crc32c(record.subarray(0, 16)), 16);
  return record;
}

export interface DecodedRegisterLog {
  entries: RegisterEntry[];
  /** Bytes of valid records; anything after is cut at recovery. */
  validBytes: number;
  /** Why decoding stopped before the end, if it did. */
  cutReason: string | undefined;
}

/** The longest valid prefix of a log file: consecutive sequences from 1, every CRC correct. */
export function decodeRegisterLog(bytes: Uint8Array): DecodedRegisterLog {
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  const entries: RegisterEntry[] = [];
  let offset = 0;
  for (; offset + REGISTER_RECORD_BYTES <= view.length; offset += REGISTER_RECORD_BYTES) {
    const seq = view.readUInt32BE(offset + 4);
    if (view.readUInt32BE(offset) !== REGISTER_RECORD_MAGIC) return { entries, validBytes: offset, cutReason: `bad magic at ${offset}` };
    if (crc32c(view.subarray(offset, offset + 16)) !== view.readUInt32BE(offset + 16)) return { entries, validBytes: offset, cutReason: `bad crc at ${offset}` };
    if (seq !== entries.length + 1) return { entries, validBytes: offset, cutReason: `sequence ${seq} at ${offset}, expected ${entries.length + 1}` };
    entries.push({ seq, block: view.readUInt32BE(offset + 8), tag: view.readUInt32BE(offset + 12) });
  }
  const cutReason = offset < view.length ? `partial record at ${offset}` : undefined;
  return { entries, validBytes: offset, cutReason };
}

// ---- the protocol's state machine (pure) ------------------------------------------------------

export type RegisterMessage =
  | { readonly kind: 'append'; readonly entry: RegisterEntry }
  /** Cumulative: every entry up to seq is durable at the sender. */
  | { readonly kind: 'ack'; readonly seq: number }
  /** A backup's first word on a new link: its durable log ends at durableSeq. */
  | { readonly kind: 'hello'; readonly durableSeq: number }
  | { readonly kind: 'fetch' }
  | { readonly kind: 'log'; readonly entries: readonly RegisterEntry[]; readonly durableSeq: number };

export type RegisterReply = { readonly ok: true; readonly value?: number } | { readonly ok: false; readonly reason: 'unavailable' | 'busy' };

/**
 * What the shell must do, in order. Persist before send is the state machine's job: it emits a
 * send of an entry only once persisted() reported it durable, so the shell may run a persist
 * and later sends concurrently.
 */
export type RegisterEffect =
  | { readonly kind: 'send'; readonly target: NodeId; readonly message: RegisterMessage }
  /** Write these consecutive entries to the log, fdatasync, then call persisted(last seq). */
  | { readonly kind: 'persist'; readonly entries: readonly RegisterEntry[] }
  | { readonly kind: 'reply'; readonly request: number; readonly reply: RegisterReply };

export type RegisterBug =
  | 'none'
  /** The primary answers a write once its own log has it, without waiting for the backups. */
  | 'ackBeforeReplicated'
  /** The primary serves reads from entries it has logged but not yet committed. */
  | 'readUncommitted';

export interface RegisterConfig {
  readonly self: NodeId;
  readonly primary: NodeId;
  readonly backups: readonly NodeId[];
  readonly blocks: number;
  readonly bug?: RegisterBug;
  /** Reads queued at a primary that is catching up; more are refused as busy. */
  readonly queuedReadsMax?: number;
}

interface PeerProgress {
  /** A hello (or log reply) arrived since the primary's link to it last went down. */
  synced: boolean;
  /** Highest sequence sent on the current link (or known present in its memory). */
  sentSeq: number;
  /** Highest sequence it reported durable. */
  matchSeq: number;
}

export class RegisterReplica {
  readonly config: RegisterConfig;
  readonly isPrimary: boolean;
  private readonly bug: RegisterBug;
  /** log[i].seq === i + 1. */
  private readonly entries: RegisterEntry[];
  private durable: number;
  private requested: number;
  /** Backup: applied through `durable`. Primary: committed state. */
  private readonly state: Uint32Array;
  private applied = 0;
  /** Primary, readUncommitted bug only: state with everything durable here applied. */
  private readonly tentative: Uint32Array;
  private tentativeApplied = 0;
  private mode: 'recovering' | 'active';
  private readonly peers = new Map<NodeId, PeerProgress>();
  private readonly fetched = new Map<NodeId, { entries: readonly RegisterEntry[]; durableSeq: number }>();
  private committed = 0;
  private readableFromSeq = 0;
  private readonly pendingWrites = new Map<number, number>();
  private readonly pendingReads: Array<{ request: number; block: number }> = [];
  /** Appends that skipped ahead of the log (never expected on FIFO links). */
  gapsIgnored = 0;

  /** `recovered`: the valid prefix of this node's log on disk (durable). */
  constructor(config: RegisterConfig, recovered: readonly RegisterEntry[]) {
    assert(config.blocks >= 1, 'a register has at least one block');
    this.config = config;
    this.isPrimary = config.self === config.primary;
    assert(this.isPrimary || config.backups.includes(config.self), `${config.self} is neither primary nor backup`);
    this.bug = config.bug ?? 'none';
    recovered.forEach((entry, index) => assert(entry.seq === index + 1, 'recovered entries are consecutive from 1'));
    this.entries = [...recovered];
    this.durable = recovered.length;
    this.requested = recovered.length;
    this.state = new Uint32Array(config.blocks);
    this.tentative = new Uint32Array(config.blocks);
    for (const backup of config.backups) this.peers.set(backup, { synced: false, sentSeq: 0, matchSeq: 0 });
    // A primary cannot know what its backups hold (its own log may be short or gone): it
    // recovers first. A backup's log is its truth until the primary resends.
    this.mode = this.isPrimary ? 'recovering' : 'active';
    if (!this.isPrimary) this.applyThrough(this.durable);
  }

  // -- inputs --

  clientWrite(request: number, block: number, tag: number): RegisterEffect[] {
    assert(this.isPrimary, 'clients write at the primary');
    assert(Number.isInteger(block) && block >= 0 && block < this.config.blocks, `block ${block} out of range`);
    if (this.mode !== 'active') return [{ kind: 'reply', request, reply: { ok: false, reason: 'unavailable' } }];
    const entry: RegisterEntry = { seq: this.entries.length + 1, block, tag };
    this.entries.push(entry);
    this.pendingWrites.set(entry.seq, request);
    return [this.persistThrough(entry.seq)];
  }

  clientRead(request: number, block: number): RegisterEffect[] {
    assert(this.isPrimary, 'clients read at the primary');
    assert(Number.isInteger(block) && block >= 0 && block < this.config.blocks, `block ${block} out of range`);
    if (this.mode !== 'active') return [{ kind: 'reply', request, reply: { ok: false, reason: 'unavailable' } }];
    if (this.readable()) return [this.readReply(request, block)];
    if (this.pendingReads.length >= (this.config.queuedReadsMax ?? 256)) return [{ kind: 'reply', request, reply: { ok: false, reason: 'busy' } }];
    this.pendingReads.push({ request, block });
    return [];
  }

  receive(source: NodeId, message: RegisterMessage): RegisterEffect[] {
    return this.isPrimary ? this.primaryReceive(source, message) : this.backupReceive(source, message);
  }

  linkUp(link: Link): RegisterEffect[] {
    if (this.isPrimary) return [];
    const peer = link.source === this.config.self ? link.target : link.source;
    if (peer !== this.config.primary) return [];
    // Whichever direction came back, tell the primary where this log stands so it can resend.
    return [{ kind: 'send', target: this.config.primary, message: { kind: 'hello', durableSeq: this.durable } }];
  }

  linkDown(link: Link): RegisterEffect[] {
    if (!this.isPrimary) return [];
    const backup = link.source === this.config.self ? link.target : link.source;
    const peer = this.peers.get(backup);
    if (peer === undefined) return [];
    // What was in flight is lost; sending resumes after the backup's next hello.
    if (link.source === this.config.self) peer.synced = false;
    if (this.mode === 'recovering') {
      // Its answer and acks may predate a crash that shortened its log: ask again once it is back.
      this.fetched.delete(backup);
      peer.matchSeq = 0;
    }
    return [];
  }

  /** The shell made every entry through `seq` durable. */
  persisted(seq: number): RegisterEffect[] {
    assert(seq > this.durable && seq <= this.requested, `persisted(${seq}) outside (${this.durable}, ${this.requested}]`);
    this.durable = seq;
    if (!this.isPrimary) {
      this.applyThrough(seq);
      return [{ kind: 'send', target: this.config.primary, message: { kind: 'ack', seq } }];
    }
    const effects: RegisterEffect[] = [];
    for (const [backup, peer] of this.peers) if (peer.synced) this.sendNew(backup, peer, effects);
    this.commit(effects);
    return effects;
  }

  // -- inspection (tests and the scenario's checks) --

  get lastSeq(): number {
    return this.entries.length;
  }
  get durableSeq(): number {
    return this.durable;
  }
  get commitSeq(): number {
    return this.committed;
  }
  get active(): boolean {
    return this.mode === 'active';
  }
  get pendingClientOperations(): number {
    return this.pendingWrites.size + this.pendingReads.length;
  }
  log(): readonly RegisterEntry[] {
    return this.entries;
  }
  /** The block values the log implies (every entry applied in order): a replica's bytes for I4. */
  logImage(): Buffer {
    const image = new Uint32Array(this.config.blocks);
    for (const entry of this.entries) image[entry.block] = entry.tag;
    return Buffer.from(image.buffer);
  }

  // -- primary --

  private primaryReceive(source: NodeId, message: RegisterMessage): RegisterEffect[] {
    const peer = this.peers.get(source);
    assert(peer !== undefined, `primary got ${message.kind} from non-backup ${source}`);
    const effects: RegisterEffect[] = [];
    switch (message.kind) {
      case 'hello':
        if (this.mode === 'recovering') effects.push({ kind: 'send', target: source, message: { kind: 'fetch' } });
        else this.resync(source, peer, message.durableSeq, effects);
        break;
      case 'ack':
        // While recovering too: an entry the backup made durable after answering the fetch
        // must count, or nothing would ever make it acknowledge that entry again.
        peer.matchSeq = Math.max(peer.matchSeq, message.seq);
        if (this.mode === 'active') {
          assert(message.seq <= this.entries.length, `backup ${source} acknowledged ${message.seq} > ${this.entries.length}`);
          this.commit(effects);
        }
        break;
      case 'log':
        if (this.mode === 'recovering') {
          this.fetched.set(source, { entries: message.entries, durableSeq: message.durableSeq });
          peer.synced = true;
          if (this.fetched.size === this.config.backups.length) this.adoptLongestLog(effects);
        } else {
          // An answer that arrived after recovery finished still says where its log stands.
          this.resync(source, peer, message.durableSeq, effects);
        }
        break;
      case 'append':
      case 'fetch':
        assert(false, `primary got ${message.kind} from ${source}`);
    }
    return effects;
  }

  /** The backup's durable log ends at durableSeq: resend from there. */
  private resync(backup: NodeId, peer: PeerProgress, durableSeq: number, effects: RegisterEffect[]): void {
    assert(durableSeq <= this.entries.length, `backup ${backup} is ahead of the primary (${durableSeq} > ${this.entries.length})`);
    peer.synced = true;
    peer.sentSeq = durableSeq;
    // Not max(): a backup whose recovery cut a corrupt record really has less now.
    peer.matchSeq = durableSeq;
    this.sendNew(backup, peer, effects);
    this.commit(effects);
  }

  private adoptLongestLog(effects: RegisterEffect[]): void {
    let longest: readonly RegisterEntry[] = this.entries;
    for (const { entries } of this.fetched.values()) if (entries.length > longest.length) longest = entries;
    // Every log is a prefix of one history; a fork would mean a sequence was reused.
    for (const candidate of [this.entries, ...[...this.fetched.values()].map((reply) => reply.entries)]) {
      candidate.forEach((entry, index) => {
        const adopted = longest[index]!;
        assert(entry.seq === adopted.seq && entry.block === adopted.block && entry.tag === adopted.tag, `history forked at sequence ${entry.seq}`);
      });
    }
    const ownLength = this.entries.length;
    for (const entry of longest.slice(ownLength)) this.entries.push(entry);
    for (const [backup, reply] of this.fetched) {
      const peer = this.peers.get(backup)!;
      peer.matchSeq = Math.max(peer.matchSeq, reply.durableSeq);
      peer.sentSeq = reply.entries.length;
    }
    this.fetched.clear();
    this.mode = 'active';
    // Anything recovered may be uncommitted: no reads until all of it is durable everywhere.
    this.readableFromSeq = this.entries.length;
    if (this.entries.length > ownLength) effects.push(this.persistThrough(this.entries.length));
    for (const [backup, peer] of this.peers) if (peer.synced) this.sendNew(backup, peer, effects);
    this.commit(effects);
  }

  private sendNew(backup: NodeId, peer: PeerProgress, effects: RegisterEffect[]): void {
    // Only durable entries leave: a backup must never hold what this primary could still lose.
    for (let seq = peer.sentSeq + 1; seq <= this.durable; seq++) {
      effects.push({ kind: 'send', target: backup, message: { kind: 'append', entry: this.entries[seq - 1]! } });
    }
    peer.sentSeq = Math.max(peer.sentSeq, this.durable);
  }

  private commit(effects: RegisterEffect[]): void {
    let target = this.durable;
    if (this.bug !== 'ackBeforeReplicated') for (const peer of this.peers.values()) target = Math.min(target, peer.matchSeq);
    if (this.bug === 'readUncommitted') this.applyTentativeThrough(this.durable);
    if (target <= this.committed) return;
    this.applyThrough(target);
    for (let seq = this.committed + 1; seq <= target; seq++) {
      const request = this.pendingWrites.get(seq);
      if (request === undefined) continue;
      this.pendingWrites.delete(seq);
      effects.push({ kind: 'reply', request, reply: { ok: true } });
    }
    this.committed = target;
    if (this.readable()) {
      for (const { request, block } of this.pendingReads.splice(0)) effects.push(this.readReply(request, block));
    }
  }

  private readable(): boolean {
    return this.mode === 'active' && this.committed >= this.readableFromSeq;
  }

  private readReply(request: number, block: number): RegisterEffect {
    const source = this.bug === 'readUncommitted' ? this.tentative : this.state;
    return { kind: 'reply', request, reply: { ok: true, value: source[block]! } };
  }

  private persistThrough(seq: number): RegisterEffect {
    const entries = this.entries.slice(this.requested, seq);
    assert(entries.length > 0 && entries[0]!.seq === this.requested + 1, 'persist requests are consecutive');
    this.requested = seq;
    return { kind: 'persist', entries };
  }

  private applyThrough(seq: number): void {
    for (; this.applied < seq; this.applied++) {
      const entry = this.entries[this.applied]!;
      this.state[entry.block] = entry.tag;
    }
  }

  private applyTentativeThrough(seq: number): void {
    for (; this.tentativeApplied < seq; this.tentativeApplied++) {
      const entry = this.entries[this.tentativeApplied]!;
      this.tentative[entry.block] = entry.tag;
    }
  }

  // -- backup --

  private backupReceive(source: NodeId, message: RegisterMessage): RegisterEffect[] {
    assert(source === this.config.primary, `backup got ${message.kind} from ${source}, not the primary`);
    switch (message.kind) {
      case 'append': {
        const entry = message.entry;
        if (entry.seq <= this.entries.length) {
          // A resend after reconnect: the same entry again (checked), never applied twice.
          const held = this.entries[entry.seq - 1]!;
          assert(held.block === entry.block && held.tag === entry.tag, `backup ${this.config.self}: sequence ${entry.seq} differs from the one held`);
          return entry.seq <= this.durable ? [{ kind: 'send', target: source, message: { kind: 'ack', seq: this.durable } }] : [];
        }
        if (entry.seq !== this.entries.length + 1) {
          this.gapsIgnored++;
          return [];
        }
        this.entries.push(entry);
        return [this.persistThrough(entry.seq)];
      }
      case 'fetch':
        return [{ kind: 'send', target: source, message: { kind: 'log', entries: this.entries.slice(), durableSeq: this.durable } }];
      case 'hello':
      case 'ack':
      case 'log':
        assert(false, `backup got ${message.kind} from the primary`);
    }
  }
}

// ---- the I/O shell: one node's disk and network around the state machine ------------------------

const LOG_FILE = 'register.log';

export interface RegisterNodeHooks {
  reply(request: number, reply: RegisterReply): void;
  /** An error the shell cannot handle: the scenario fails with it. */
  fatal(error: unknown): void;
  /** Recovery found an invalid record and cut the log there. */
  recoveryCut?(node: NodeId, reason: string): void;
}

export class RegisterNode implements NetworkHandler<RegisterMessage> {
  readonly id: NodeId;
  private readonly disk: SimDisk;
  private readonly network: SimNetwork<RegisterMessage>;
  private readonly scheduler: Scheduler;
  private readonly hooks: RegisterNodeHooks;
  private core: RegisterReplica | undefined;
  private file: SimFile | undefined;
  /** Entries waiting for the next group commit; one batch is written at a time. */
  private persistQueue: RegisterEntry[] = [];
  private persisting = false;
  private dead = false;

  constructor(options: { config: RegisterConfig; disk: SimDisk; network: SimNetwork<RegisterMessage>; scheduler: Scheduler; hooks: RegisterNodeHooks }) {
    this.id = options.config.self;
    this.disk = options.disk;
    this.network = options.network;
    this.scheduler = options.scheduler;
    this.hooks = options.hooks;
    void this.boot(options.config).catch((error: unknown) => this.hooks.fatal(error));
  }

  /** The state machine, once recovery has read the log. */
  get replica(): RegisterReplica | undefined {
    return this.core;
  }

  get busy(): boolean {
    return this.persisting || this.persistQueue.length > 0;
  }

  /** The node's process dies with its disk's cache; nothing of this incarnation runs again. */
  crash(options: { wipeDisk?: boolean } = {}): void {
    this.dead = true;
    if (this.network.isUp(this.id)) this.network.crash(this.id);
    if (options.wipeDisk) this.disk.wipe();
    else this.disk.crash();
  }

  clientWrite(request: number, block: number, tag: number): void {
    if (this.core === undefined) return this.hooks.reply(request, { ok: false, reason: 'unavailable' });
    this.run(this.core.clientWrite(request, block, tag));
  }

  clientRead(request: number, block: number): void {
    if (this.core === undefined) return this.hooks.reply(request, { ok: false, reason: 'unavailable' });
    this.run(this.core.clientRead(request, block));
  }

  receive(source: NodeId, message: RegisterMessage): void {
    this.run(this.core!.receive(source, message));
  }
  linkUp(link: Link): void {
    this.run(this.core!.linkUp(link));
  }
  linkDown(link: Link): void {
    this.run(this.core!.linkDown(link));
  }

  private async boot(config: RegisterConfig): Promise<void> {
    const file = await this.disk.open(LOG_FILE, { create: true });
    const sizeBytes = await file.size();
    const content = Buffer.alloc(sizeBytes);
    await file.read(content, 0);
    const decoded = decodeRegisterLog(content);
    if (decoded.cutReason !== undefined) {
      // I5: nothing past the first invalid record is applied; cut it so appends continue cleanly.
      this.scheduler.log(`${this.id} recovery cuts log at ${decoded.validBytes}: ${decoded.cutReason}`);
      this.hooks.recoveryCut?.(this.id, decoded.cutReason);
      await file.truncate(decoded.validBytes);
      await file.datasync();
    }
    this.file = file;
    this.core = new RegisterReplica(config, decoded.entries);
    this.scheduler.log(`${this.id} recovered ${decoded.entries.length} entries`);
    this.network.start(this.id, this);
  }

  private run(effects: readonly RegisterEffect[]): void {
    for (const effect of effects) {
      switch (effect.kind) {
        case 'send':
          this.network.send(this.id, effect.target, effect.message);
          break;
        case 'reply':
          this.hooks.reply(effect.request, effect.reply);
          break;
        case 'persist':
          this.persistQueue.push(...effect.entries);
          if (!this.persisting) void this.persistLoop().catch((error: unknown) => this.hooks.fatal(error));
          break;
      }
    }
  }

  private async persistLoop(): Promise<void> {
    this.persisting = true;
    while (this.persistQueue.length > 0) {
      const batch = this.persistQueue;
      this.persistQueue = [];
      const file = this.file!;
      await file.writev(batch.map(encodeRegisterRecord), (batch[0]!.seq - 1) * REGISTER_RECORD_BYTES);
      await file.datasync();
      assert(!this.dead, 'a crash leaves the disk promises of its incarnation unsettled');
      this.run(this.core!.persisted(batch[batch.length - 1]!.seq));
    }
    this.persisting = false;
  }
}

// ---- the scenario -------------------------------------------------------------------------------

export interface RegisterScenarioOptions {
  bug?: RegisterBug;
  /** Simulated time during which clients write and faults happen. Default 1500 ms. */
  workloadMs?: number;
  clients?: number;
  blocks?: number;
  /** Events one seed may run before it counts as a runaway. */
  stepsMax?: number;
}

export interface RegisterScenarioReport {
  seed: number;
  networkProfile: string;
  writesAcknowledged: number;
  readsAnswered: number;
  crashes: number;
  wipes: number;
  finalLogLength: number;
  steps: number;
  /** Injected disk faults by kind, over all nodes. */
  diskFaults: Record<string, number>;
  /** Recoveries that cut an invalid log tail (I5: detected, not applied). */
  recoveryCuts: number;
  /** Unsynced writes that crashes let reach the disk. */
  writtenBackAtCrash: number;
  network: { delivered: number; droppedInFlight: number; droppedLinkDown: number; linkFailures: number; partitions: number; clogs: number };
}

const NODES: readonly NodeId[] = ['n1', 'n2', 'n3'];
const PRIMARY = 'n1';
const BACKUPS: readonly NodeId[] = ['n2', 'n3'];
/** Liveness: once faults stop, the cluster must settle within this much simulated time. */
const SETTLE_DEADLINE_MS = 10_000;

/** One seed of the register simulation; throws (SimulationError or InvariantViolation) on failure. */
export async function runRegisterScenario(seed: number, run: SeedRun, options: RegisterScenarioOptions = {}): Promise<RegisterScenarioReport> {
  const bug = options.bug ?? 'none';
  const workloadMs = options.workloadMs ?? 1500;
  const clientCount = options.clients ?? 3;
  const blocks = options.blocks ?? 3;
  const stepsMax = options.stepsMax ?? 400_000;
  const root = new Prng(seed);
  const scheduler = new Scheduler({ seed, trace: run.trace });
  const networkProfile = randomNetworkProfile(root.fork('network-profile'));
  scheduler.log(`seed ${seed} network profile ${networkProfile.name} bug ${bug}`);
  const network = new SimNetwork<RegisterMessage>({
    scheduler,
    prng: root.fork('network'),
    nodes: NODES,
    profile: networkProfile,
    describe: describeMessage,
  });
  const diskProfiles: Record<string, DiskProfile> = {
    n1: randomDiskProfile(root.fork('disk-profile-n1'), HONEST_DISK_PROFILES),
    n2: { ...randomDiskProfile(root.fork('disk-profile-n2'), HONEST_DISK_PROFILES), corruptionProbabilityPerCrash: 0.3 },
    n3: randomDiskProfile(root.fork('disk-profile-n3'), HONEST_DISK_PROFILES),
  };
  const disks = new Map<NodeId, SimDisk>(
    // 8-byte sectors: small enough that a torn write can split a 20-byte record, which is
    // what recovery must detect (real logs have records much larger than a sector).
    NODES.map((node) => [node, new SimDisk({ name: node, scheduler, prng: root.fork(`disk-${node}`), profile: diskProfiles[node]!, sectorBytes: 8 })]),
  );

  let fatalError: unknown;
  const history = new BlockHistory(scheduler, { initialValue: 0 });
  const pending = new Map<number, { kind: 'write'; ticket: number; client: number } | { kind: 'read'; ticket: number; client: number; block: number }>();
  const nodes = new Map<NodeId, RegisterNode | undefined>();
  const report: RegisterScenarioReport = {
    seed,
    networkProfile: networkProfile.name,
    writesAcknowledged: 0,
    readsAnswered: 0,
    crashes: 0,
    wipes: 0,
    finalLogLength: 0,
    steps: 0,
    diskFaults: {},
    recoveryCuts: 0,
    writtenBackAtCrash: 0,
    network: { delivered: 0, droppedInFlight: 0, droppedLinkDown: 0, linkFailures: 0, partitions: 0, clogs: 0 },
  };
  let nextRequest = 1;
  let nextTag = 1;
  const issuedTags = new Map<number, number>(); // tag -> block
  const workloadPrng = root.fork('workload');
  let clientsActive = true;
  const finalReads = new Map<number, number>(); // block -> value read back after the power failure
  const finalReadRequests = new Map<number, number>(); // request -> block

  const hooks: RegisterNodeHooks = {
    reply(request, reply) {
      const finalBlock = finalReadRequests.get(request);
      const operation = pending.get(request);
      // Abandoned operations belonged to a crashed incarnation, which never answers.
      assert(operation !== undefined, `reply to unknown request ${request}`);
      pending.delete(request);
      if (operation.kind === 'write') {
        if (reply.ok) {
          history.writeAcknowledged(operation.ticket);
          report.writesAcknowledged++;
        } else history.writeFailed(operation.ticket);
      } else if (reply.ok) {
        assert(reply.value !== undefined, 'a read reply carries a value');
        history.readReturned(operation.ticket, reply.value);
        report.readsAnswered++;
        if (finalBlock !== undefined) finalReads.set(finalBlock, reply.value);
      }
      if (finalBlock === undefined) scheduleClient(operation.client);
    },
    fatal(error) {
      fatalError ??= error;
    },
    recoveryCut() {
      report.recoveryCuts++;
    },
  };

  const config = (self: NodeId): RegisterConfig => ({ self, primary: PRIMARY, backups: BACKUPS, blocks, bug });
  const boot = (node: NodeId): void => {
    nodes.set(node, new RegisterNode({ config: config(node), disk: disks.get(node)!, network, scheduler, hooks }));
  };

  // -- clients: think, then one read or write at the primary; a crash abandons what is in flight --
  const scheduleClient = (client: number): void => {
    if (!clientsActive) return;
    scheduler.after(workloadPrng.int(0, 20), () => issueClientOperation(client), `client ${client}`);
  };
  const issueClientOperation = (client: number): void => {
    if (!clientsActive) return;
    const primary = nodes.get(PRIMARY);
    const block = workloadPrng.int(0, blocks - 1);
    const request = nextRequest++;
    if (workloadPrng.chance(0.6)) {
      const tag = nextTag++;
      issuedTags.set(tag, block);
      pending.set(request, { kind: 'write', ticket: history.writeInvoked(block, tag, { fua: true }), client });
      if (primary === undefined) return hooks.reply(request, { ok: false, reason: 'unavailable' });
      primary.clientWrite(request, block, tag);
    } else {
      pending.set(request, { kind: 'read', ticket: history.readInvoked(block), client, block });
      if (primary === undefined) return hooks.reply(request, { ok: false, reason: 'unavailable' });
      primary.clientRead(request, block);
    }
  };

  // -- the nemesis: crashes and restarts, sometimes with a replaced (n1) disk --
  const nemesisPrng = root.fork('nemesis');
  const restarts = new Map<NodeId, ScheduledEvent>();
  let nemesisEvent: ScheduledEvent | undefined;
  const crashNode = (node: NodeId, wipeDisk: boolean): void => {
    const shell = nodes.get(node);
    if (shell === undefined) return;
    nodes.set(node, undefined);
    shell.crash({ wipeDisk });
    report.crashes++;
    if (wipeDisk) report.wipes++;
    scheduler.log(`nemesis crash ${node}${wipeDisk ? ' (disk replaced)' : ''}`);
    if (node === PRIMARY) {
      // Clients see the connection drop: in-flight operations have unknown outcomes.
      for (const [request, operation] of pending) {
        pending.delete(request);
        scheduleClient(operation.client);
      }
    }
  };
  const nemesis = (): void => {
    nemesisEvent = scheduler.after(
      nemesisPrng.int(50, 400),
      () => {
        const node = nemesisPrng.pick(NODES);
        if (nodes.get(node) !== undefined) {
          crashNode(node, node === PRIMARY && nemesisPrng.chance(0.3));
          restarts.set(
            node,
            scheduler.after(nemesisPrng.int(5, 250), () => {
              restarts.delete(node);
              boot(node);
            }, `restart ${node}`),
          );
        }
        nemesis();
      },
      'nemesis',
    );
  };

  const quiescent = (): boolean => {
    if (fatalError !== undefined) throw fatalError;
    const primary = nodes.get(PRIMARY)?.replica;
    if (primary === undefined || !primary.active || primary.pendingClientOperations > 0) return false;
    const length = primary.lastSeq;
    if (primary.commitSeq !== length) return false;
    for (const node of NODES) {
      const shell = nodes.get(node);
      const replica = shell?.replica;
      if (shell === undefined || replica === undefined || shell.busy || replica.lastSeq !== length || replica.durableSeq !== length) return false;
      if (disks.get(node)!.pendingOperations > 0) return false;
    }
    return network.settled && pending.size === 0;
  };
  const settle = async (what: string): Promise<void> => {
    const result = await scheduler.runUntil(quiescent, { stepsMax, deadlineMs: scheduler.nowMs() + SETTLE_DEADLINE_MS });
    report.steps += result.steps;
    scheduler.log(`settled: ${what}`);
  };
  const check = (result: CheckResult): void => {
    if (!result.ok) throw scheduler.failure(`${result.invariant} violated: ${result.message}`, new InvariantViolation(result.invariant, result.message));
  };
  const checkReplicas = (): void => {
    const primaryLog = nodes.get(PRIMARY)!.replica!;
    check(checkReplicasConverged(NODES.map((node) => ({ name: `${node} state`, bytes: nodes.get(node)!.replica!.logImage() }))));
    check(checkReplicasConverged(NODES.map((node) => ({ name: `${node} log file`, bytes: disks.get(node)!.durableContent(LOG_FILE) ?? Buffer.alloc(0) }))));
    // I5 from the other side: every entry on every replica is one a client wrote, to that block.
    for (const node of NODES) {
      for (const entry of nodes.get(node)!.replica!.log()) {
        if (issuedTags.get(entry.tag) !== entry.block) check({ ok: false, invariant: 'I5', message: `${node} holds entry ${entry.seq} (block ${entry.block}, tag ${entry.tag}) that no client wrote` });
      }
    }
    report.finalLogLength = primaryLog.lastSeq;
  };

  // 1. Boot, then the workload under faults.
  for (const node of NODES) boot(node);
  network.startFaults();
  nemesis();
  for (let client = 0; client < clientCount; client++) scheduleClient(client);
  const workload = await scheduler.runUntil(workloadMs, { stepsMax });
  report.steps += workload.steps;
  if (fatalError !== undefined) throw fatalError;

  // 2. Faults stop; everything comes back; the cluster must settle (liveness) and converge (I4).
  clientsActive = false;
  nemesisEvent?.cancel();
  network.stopFaults();
  for (const [node, event] of restarts) {
    event.cancel();
    boot(node);
  }
  restarts.clear();
  await settle('after the workload');
  checkReplicas();

  // 3. Power failure of the whole cluster: every acknowledged write (all are FUA) must survive (I1).
  const crashMs = scheduler.nowMs();
  for (const node of NODES) crashNode(node, false);
  for (const node of NODES) boot(node);
  await settle('after the power failure');
  for (let block = 0; block < blocks; block++) {
    const request = nextRequest++;
    finalReadRequests.set(request, block);
    pending.set(request, { kind: 'read', ticket: history.readInvoked(block), client: -1, block });
    nodes.get(PRIMARY)!.clientRead(request, block);
  }
  await settle('final reads');
  check(history.checkDurableAfterCrash(crashMs, finalReads));
  check(history.checkLinearizable());
  checkReplicas();
  if (fatalError !== undefined) throw fatalError;
  for (const disk of disks.values()) {
    for (const fault of disk.faults()) report.diskFaults[fault.kind] = (report.diskFaults[fault.kind] ?? 0) + 1;
    report.writtenBackAtCrash += disk.stats.writtenBackAtCrash;
  }
  const { delivered, droppedInFlight, droppedLinkDown, linkFailures, partitions, clogs } = network.stats;
  report.network = { delivered, droppedInFlight, droppedLinkDown, linkFailures, partitions, clogs };
  return report;
}

function describeMessage(message: RegisterMessage): string {
  switch (message.kind) {
    case 'append':
      return `append seq=${message.entry.seq} block=${message.entry.block} tag=${message.entry.tag}`;
    case 'ack':
      return `ack seq=${message.seq}`;
    case 'hello':
      return `hello durable=${message.durableSeq}`;
    case 'fetch':
      return 'fetch';
    case 'log':
      return `log entries=${message.entries.length} durable=${message.durableSeq}`;
  }
}
