// The embedded coordinator: all nodes of one host share a directory, and the state lives in
// its files, not in a process, so it survives the SIGKILL of any node.
//
// Every change that must be atomic across processes is the creation of a new file in a
// numbered chain with link(2), which fails with EEXIST if the name exists: whoever creates
// `n+1` first wins, exactly once, with no lock to break when its holder dies. (A lock file
// with a pid needs "break the lock of a dead pid", which races with pid reuse and with two
// breakers; link() has no such window.) Content is written to a temporary file first, so a
// chain file is complete the moment it has a name.
//
//   ROOT/nodes/<id>/<gen>.json        a node's lease chain: alive (with expiresAtMs) or dead
//   ROOT/volumes/<name>.json          pointer to the volume's current incarnation
//   ROOT/incarnations/<inc>/spec.json the volume spec (replaced by rename)
//   ROOT/incarnations/<inc>/records/<seq>.json   the record chain: CAS = create seq+1
//   ROOT/tmp/                         files being written (same filesystem as the targets)
//
// Leases: a renewal is the creation of the next gen with a new expiresAtMs (same host, same
// clock). Whoever finds an alive entry past its expiry writes a "dead" entry as the next gen
// before it treats the node as gone, so a renewal that races it fails: once anybody has seen
// a lease expire, it stays expired (the etcd semantics).
//
// Chains are pruned from the old end, which frees names: a writer that stalled between reading
// the newest entry and linking the next could land in a freed name. So after every link the
// writer lists the chain: an entry is genuine only if nothing was pruned at or above it, i.e.
// it lies within the newest HISTORY entries (entries are pruned only below max − HISTORY, and
// max only grows). Readers read the newest entry, watchers only the newest HISTORY entries.
//
// Volume deletion moves the pointer away (one rename); a new volume of the same name gets a new
// incarnation, so a CAS still in flight against the old one can never land in the new one.
// Watches poll (fs.watch misses events on some filesystems and across processes). Leases
// compare expiresAtMs with the wall clock of the same host: every process sees the same time.
// Needs a filesystem with hard links (ext4, xfs, btrfs, tmpfs; not most network filesystems).
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MirrorsanError, assert, isMirrorsanError } from '../errors.js';
import { createLogger } from '../util/log.js';
import type { Logger } from '../util/log.js';
import {
  RecordWatchFilter,
  WATCHES_MAX,
  assertCasArguments,
  assertRegistrationInput,
  assertVolumeName,
  assertVolumeSpec,
  copyRecord,
  defaultWaitForPreviousMs,
  isSafeName,
  nodesFingerprint,
  parseNodeRegistration,
  parseVolumeRecord,
  parseVolumeSpec,
  sortNodes,
} from './coordinator.js';
import type {
  CasResult,
  Coordinator,
  NodeRegistration,
  NodeRegistrationInput,
  NodeSession,
  RegisterOptions,
  Unsubscribe,
  VolumeRecord,
  VolumeSpec,
} from './coordinator.js';
import { LeaseKeeper } from './session.js';
import type { RenewResult } from './session.js';

export interface EmbeddedCoordinatorOptions {
  /** The directory every node of this host shares, e.g. DATA_DIR/coordinator. */
  dir: string;
  /** How often watches look at the files. */
  pollIntervalMs?: number;
  logger?: Logger;
}

const POLL_INTERVAL_DEFAULT_MS = 100;
/** Record files kept per volume: a watcher that polls less often than this many CAS loses epochs. */
export const RECORD_HISTORY = 128;
/** Lease-chain files kept per node (renewals are frequent; only the newest matters). */
const NODE_HISTORY = 8;
/** Attempts of an optimistic read/create loop before reporting the directory as too busy. */
const RETRIES_MAX = 16;
/** Files left in tmp/ or unreferenced incarnations older than this belong to dead writers. */
const ORPHAN_AGE_MS = 60_000;

const SEQ_FILE = /^(\d{16})\.json$/;
const seqName = (seq: number): string => `${String(seq).padStart(16, '0')}.json`;

type NodeEntry =
  | { state: 'alive'; registration: NodeRegistration; ttlMs: number; expiresAtMs: number }
  | { state: 'dead'; leaseId: string; reason: string; atMs: number };

/**
 * Lease entries are not fsynced (a renewal per TTL/3 per node would queue behind data I/O, and
 * leases mean nothing after the host restarts), so after a power loss the newest one may be
 * empty: it counts as dead rather than making the whole directory unreadable.
 */
function parseNodeEntryLenient(value: unknown, what: string): NodeEntry {
  try {
    return parseNodeEntry(value, what);
  } catch {
    return { state: 'dead', leaseId: '', reason: 'unreadable entry', atMs: 0 };
  }
}

interface Pointer {
  name: string;
  incarnation: string;
}

type PublishOutcome = 'created' | 'exists' | 'missing-dir';

function errnoOf(error: unknown): string | undefined {
  return typeof error === 'object' && error !== null && 'code' in error && typeof error.code === 'string' ? error.code : undefined;
}

function unavailable(what: string, error: unknown): MirrorsanError {
  const detail = error instanceof Error ? error.message : String(error);
  return new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: ${what}: ${detail}`, { cause: error });
}

function parseNodeEntry(value: unknown, what: string): NodeEntry {
  const corrupt = (detail: string): never => {
    throw new MirrorsanError('COORD_CORRUPT', `${what}: ${detail}`);
  };
  if (typeof value !== 'object' || value === null) return corrupt('not an object');
  const object = value as Record<string, unknown>;
  if (object.state === 'alive') {
    if (!Number.isSafeInteger(object.ttlMs) || !Number.isSafeInteger(object.expiresAtMs)) return corrupt('ttlMs/expiresAtMs missing');
    return {
      state: 'alive',
      registration: parseNodeRegistration(object.registration, what),
      ttlMs: object.ttlMs as number,
      expiresAtMs: object.expiresAtMs as number,
    };
  }
  if (object.state === 'dead') {
    if (typeof object.leaseId !== 'string' || typeof object.reason !== 'string' || !Number.isSafeInteger(object.atMs)) {
      return corrupt('dead entry incomplete');
    }
    return { state: 'dead', leaseId: object.leaseId, reason: object.reason, atMs: object.atMs as number };
  }
  return corrupt(`unknown state ${JSON.stringify(object.state)}`);
}

interface RecordSubscription {
  kind: 'record';
  name: string;
  onChange: (record: VolumeRecord | undefined) => void;
  filter: RecordWatchFilter;
  /** Incarnation and record seq last read; seq 0 = nothing read yet. */
  incarnation: string | undefined;
  seq: number;
  primed: boolean;
  active: boolean;
}

interface NodesSubscription {
  kind: 'nodes';
  onChange: (nodes: NodeRegistration[]) => void;
  fingerprint: string | undefined;
  active: boolean;
}

type Subscription = RecordSubscription | NodesSubscription;

export class EmbeddedCoordinator implements Coordinator {
  private readonly root: string;
  private readonly pollIntervalMs: number;
  private readonly logger: Logger;
  private readonly sessions = new Set<LeaseKeeper>();
  private readonly subscriptions = new Set<Subscription>();
  private pollTimer: NodeJS.Timeout | undefined;
  private poll: Promise<void> | undefined;
  /** Work started in the background (marking a given-up lease dead): close() waits for it. */
  private readonly background = new Set<Promise<void>>();
  private closed = false;

  private constructor(options: EmbeddedCoordinatorOptions) {
    this.root = options.dir;
    this.pollIntervalMs = options.pollIntervalMs ?? POLL_INTERVAL_DEFAULT_MS;
    assert(this.pollIntervalMs >= 10 && this.pollIntervalMs <= 60_000, 'pollIntervalMs within 10..60000');
    this.logger = options.logger ?? createLogger({ component: 'coordinator' });
  }

  /** Opens (and creates if needed) the shared directory; cleans what crashed writers left. */
  static async open(options: EmbeddedCoordinatorOptions): Promise<EmbeddedCoordinator> {
    const coordinator = new EmbeddedCoordinator(options);
    try {
      for (const sub of ['nodes', 'volumes', 'incarnations', 'tmp']) {
        await fs.mkdir(join(coordinator.root, sub), { recursive: true });
      }
      await coordinator.collectOrphans();
    } catch (error) {
      throw unavailable(`cannot open ${coordinator.root}`, error);
    }
    return coordinator;
  }

  // ------------------------------------------------------------------------------------------
  // Nodes and leases

  async registerNode(input: NodeRegistrationInput, options: RegisterOptions): Promise<NodeSession> {
    assertRegistrationInput(input, options);
    const ttlMs = options.leaseTtlMs;
    const deadlineMs = Date.now() + (options.waitForPreviousMs ?? defaultWaitForPreviousMs(ttlMs));
    const leaseId = randomBytes(8).toString('hex');
    const nodeDir = join(this.root, 'nodes', input.id);
    return this.guard('register node', async () => {
      for (;;) {
        this.checkOpen();
        await fs.mkdir(nodeDir, { recursive: true });
        const latest = await this.readLatest(nodeDir, parseNodeEntryLenient, true);
        const nowMs = Date.now();
        if (latest.value?.state === 'alive' && latest.value.expiresAtMs > nowMs) {
          if (nowMs >= deadlineMs) {
            throw new MirrorsanError(
              'COORD_NODE_ID_TAKEN',
              `node id ${input.id} is held by live lease ${latest.value.registration.leaseId} until ${new Date(latest.value.expiresAtMs).toISOString()}`,
            );
          }
          await sleep(Math.max(1, Math.min(100, latest.value.expiresAtMs - nowMs + 1, deadlineMs - nowMs)));
          continue;
        }
        const registration: NodeRegistration = {
          id: input.id,
          nbd: { ...input.nbd },
          peer: { ...input.peer },
          admin: { ...input.admin },
          leaseId,
          registeredAtMs: nowMs,
        };
        const entry: NodeEntry = { state: 'alive', registration, ttlMs, expiresAtMs: nowMs + ttlMs };
        const outcome = await this.publishExclusive(join(nodeDir, seqName(latest.seq + 1)), entry, false);
        if (outcome !== 'created') continue; // raced with a renewal, a reaper or a node-dir cleanup
        if (!(await this.isChainHead(nodeDir, latest.seq + 1))) continue; // landed in a pruned name
        this.logger.info('node registered', { node: input.id, lease: leaseId, ttlMs });
        return this.startSession(registration, ttlMs, latest.seq + 1, nowMs + ttlMs);
      }
    });
  }

  private startSession(registration: NodeRegistration, ttlMs: number, seq: number, validUntilMs: number): LeaseKeeper {
    const nodeDir = join(this.root, 'nodes', registration.id);
    const chain = { seq };
    const session: LeaseKeeper = new LeaseKeeper({
      nodeId: registration.id,
      leaseId: registration.leaseId,
      ttlMs,
      validUntilMs,
      now: Date.now,
      logger: this.logger,
      renew: () => this.renewLease(nodeDir, registration, ttlMs, chain),
      revokeRemote: () => this.endLease(nodeDir, registration.leaseId, chain, 'revoked'),
      onEnded: () => {
        this.sessions.delete(session);
        const reason = session.lost;
        // A lease this node gave up on is marked dead at once, so the others need not wait out
        // its TTL and this node id can register again. `closed` stands for a crash: no marking.
        if (reason === 'expired' || reason === 'rejected') {
          const marking = this.endLease(nodeDir, registration.leaseId, chain, `given up (${reason})`).finally(() =>
            this.background.delete(marking),
          );
          this.background.add(marking);
        }
      },
    });
    this.sessions.add(session);
    return session;
  }

  private async renewLease(
    nodeDir: string,
    registration: NodeRegistration,
    ttlMs: number,
    chain: { seq: number },
  ): Promise<RenewResult> {
    const sentAtMs = Date.now();
    const entry: NodeEntry = { state: 'alive', registration, ttlMs, expiresAtMs: sentAtMs + ttlMs };
    const target = chain.seq + 1;
    let outcome: PublishOutcome;
    try {
      outcome = await this.publishExclusive(join(nodeDir, seqName(target)), entry, false);
    } catch (error) {
      return { kind: 'failed', error };
    }
    if (outcome === 'missing-dir') {
      // Distinguish "the directory is unreachable" (retry while the lease lasts) from "this
      // node's registration was removed" (the lease is gone for good).
      if (!(await this.rootPresent())) return { kind: 'failed', error: new Error(`${this.root} is missing`) };
      return { kind: 'rejected', detail: 'the registration directory was removed' };
    }
    if (outcome === 'exists') {
      let detail = 'another entry took the next place in the lease chain';
      try {
        const next = parseNodeEntry(await this.readJson(join(nodeDir, seqName(target))), 'lease entry');
        detail = next.state === 'dead' ? `marked dead (${next.reason})` : `taken over by lease ${next.registration.leaseId}`;
      } catch {
        // The detail is for the log only.
      }
      return { kind: 'rejected', detail };
    }
    let seqs: number[] | undefined;
    try {
      seqs = await this.listSeqs(nodeDir);
    } catch (error) {
      return { kind: 'failed', error };
    }
    // Only this session appends alive entries for this lease, and nobody appends after a fresh
    // one: anything newer means our entry landed in a pruned name after the chain moved on.
    if (seqs === undefined || seqs.at(-1) !== target) return { kind: 'rejected', detail: 'the lease chain moved on' };
    chain.seq = target;
    for (const seq of seqs) {
      if (seq > target - NODE_HISTORY) break;
      await this.unlinkQuietly(join(nodeDir, seqName(seq)));
    }
    return { kind: 'renewed', validUntilMs: sentAtMs + ttlMs };
  }

  /** Appends a "dead" entry while the chain still ends with this lease (a renewal may race it). */
  private async endLease(nodeDir: string, leaseId: string, chain: { seq: number }, reason: string): Promise<void> {
    try {
      for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
        const entry: NodeEntry = { state: 'dead', leaseId, reason, atMs: Date.now() };
        const outcome = await this.publishExclusive(join(nodeDir, seqName(chain.seq + 1)), entry, false);
        if (outcome === 'missing-dir') return;
        if (outcome === 'created') {
          chain.seq += 1;
          return;
        }
        const latest = await this.readLatest(nodeDir, parseNodeEntryLenient, true);
        if (!(latest.value?.state === 'alive' && latest.value.registration.leaseId === leaseId)) return; // not ours any more
        chain.seq = latest.seq;
      }
    } catch (error) {
      this.logger.warn('could not mark a lease dead; it runs out on its own', { lease: leaseId, error: String(error) });
    }
  }

  async liveNodes(): Promise<NodeRegistration[]> {
    this.checkOpen();
    return this.guard('list nodes', async () => {
      const nodesDir = join(this.root, 'nodes');
      const ids = (await fs.readdir(nodesDir)).filter(isSafeName);
      const live: NodeRegistration[] = [];
      for (const id of ids) {
        const registration = await this.liveRegistration(join(nodesDir, id));
        if (registration) live.push(registration);
      }
      return sortNodes(live);
    });
  }

  /** The node's registration if its lease is alive; marks an expired one dead first. */
  private async liveRegistration(nodeDir: string): Promise<NodeRegistration | undefined> {
    for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
      const latest = await this.readLatest(nodeDir, parseNodeEntryLenient, true);
      const entry = latest.value;
      if (entry === undefined || entry.state === 'dead') return undefined;
      const nowMs = Date.now();
      if (entry.expiresAtMs > nowMs) return entry.registration;
      const dead: NodeEntry = { state: 'dead', leaseId: entry.registration.leaseId, reason: 'expired', atMs: nowMs };
      const outcome = await this.publishExclusive(join(nodeDir, seqName(latest.seq + 1)), dead, false);
      if (outcome === 'missing-dir') return undefined;
      if (outcome === 'created' && (await this.isChainHead(nodeDir, latest.seq + 1))) {
        this.logger.info('lease expired', { node: entry.registration.id, lease: entry.registration.leaseId });
        return undefined;
      }
      // Renewed, marked or re-registered meanwhile (or our marker landed in a pruned name): look again.
    }
    throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: ${nodeDir} changes too fast to read`);
  }

  // ------------------------------------------------------------------------------------------
  // Volume specs

  async putVolumeSpec(spec: VolumeSpec, options: { createOnly: boolean }): Promise<boolean> {
    assertVolumeSpec(spec);
    const stored = parseVolumeSpec(spec, 'volume spec');
    return this.guard(`put volume ${spec.name}`, async () => {
      for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
        this.checkOpen();
        const pointer = await this.readPointer(spec.name);
        if (pointer) {
          if (options.createOnly) return false;
          try {
            await this.publishReplace(join(this.incarnationDir(pointer.incarnation), 'spec.json'), stored);
          } catch (error) {
            if (errnoOf(error) === 'ENOENT') continue; // deleted meanwhile: create it anew
            throw error;
          }
          // Written into an incarnation that was deleted meanwhile? Then it did not count.
          if ((await this.readPointer(spec.name))?.incarnation === pointer.incarnation) return true;
          continue;
        }
        const incarnation = randomBytes(8).toString('hex');
        const dir = this.incarnationDir(incarnation);
        await fs.mkdir(join(dir, 'records'), { recursive: true });
        await this.publishReplace(join(dir, 'spec.json'), stored);
        const outcome = await this.publishExclusive(this.pointerPath(spec.name), { name: spec.name, incarnation }, true);
        if (outcome === 'created') {
          this.logger.info('volume created', { volume: spec.name, incarnation });
          return true;
        }
        await fs.rm(dir, { recursive: true, force: true });
        if (outcome === 'missing-dir') {
          throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: ${join(this.root, 'volumes')} is missing`);
        }
        if (options.createOnly) return false;
      }
      throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: volume ${spec.name} changes too fast to write`);
    });
  }

  async getVolumeSpec(name: string): Promise<VolumeSpec | undefined> {
    assertVolumeName(name);
    this.checkOpen();
    return this.guard(`get volume ${name}`, async () => {
      for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
        const pointer = await this.readPointer(name);
        if (!pointer) return undefined;
        const path = join(this.incarnationDir(pointer.incarnation), 'spec.json');
        const value = await this.readJson(path);
        if (value !== undefined) return parseVolumeSpec(value, path);
        // The incarnation went away between the two reads: the volume was deleted; look again.
      }
      throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: volume ${name} changes too fast to read`);
    });
  }

  async listVolumeSpecs(): Promise<VolumeSpec[]> {
    this.checkOpen();
    const names = await this.guard('list volumes', async () =>
      (await fs.readdir(join(this.root, 'volumes')))
        .filter((file) => file.endsWith('.json'))
        .map((file) => file.slice(0, -'.json'.length))
        .filter(isSafeName)
        .sort(),
    );
    const specs: VolumeSpec[] = [];
    for (const name of names) {
      const spec = await this.getVolumeSpec(name);
      if (spec) specs.push(spec);
    }
    return specs;
  }

  async deleteVolume(name: string): Promise<boolean> {
    assertVolumeName(name);
    this.checkOpen();
    return this.guard(`delete volume ${name}`, async () => {
      // One rename is the delete; whatever incarnation the moved pointer names is the one deleted.
      const moved = join(this.root, 'tmp', `deleted-${name}-${randomBytes(6).toString('hex')}.json`);
      try {
        await fs.rename(this.pointerPath(name), moved);
      } catch (error) {
        if (errnoOf(error) === 'ENOENT') return false;
        throw error;
      }
      await this.syncDir(join(this.root, 'volumes'));
      const pointer = this.parsePointer(await this.readJson(moved), moved);
      await fs.rm(this.incarnationDir(pointer.incarnation), { recursive: true, force: true });
      await this.unlinkQuietly(moved);
      this.logger.info('volume deleted', { volume: name, incarnation: pointer.incarnation });
      return true;
    });
  }

  // ------------------------------------------------------------------------------------------
  // Volume records

  async getVolumeRecord(name: string): Promise<VolumeRecord | undefined> {
    assertVolumeName(name);
    this.checkOpen();
    return this.guard(`get record of ${name}`, async () => (await this.readRecord(name))?.record);
  }

  private async readRecord(name: string): Promise<{ incarnation: string; seq: number; record: VolumeRecord | undefined } | undefined> {
    for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
      const pointer = await this.readPointer(name);
      if (!pointer) return undefined;
      const recordsDir = join(this.incarnationDir(pointer.incarnation), 'records');
      const latest = await this.readLatest(recordsDir, parseVolumeRecord);
      if (latest.missing) continue; // deleted between the two reads
      return { incarnation: pointer.incarnation, seq: latest.seq, record: latest.value };
    }
    throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: volume ${name} changes too fast to read`);
  }

  async casVolumeRecord(name: string, expectedEpoch: number | null, next: VolumeRecord): Promise<CasResult> {
    assertCasArguments(name, expectedEpoch, next);
    this.checkOpen();
    const stored = copyRecord(next);
    return this.guard(`CAS record of ${name}`, async () => {
      const state = await this.readRecord(name);
      if (!state) throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} does not exist`);
      const current = state.record;
      const matches = expectedEpoch === null ? current === undefined : current?.epoch === expectedEpoch;
      if (!matches) return { ok: false, current };
      const recordsDir = join(this.incarnationDir(state.incarnation), 'records');
      const seq = state.seq + 1;
      const outcome = await this.publishExclusive(join(recordsDir, seqName(seq)), stored, true);
      if (outcome === 'created') {
        const seqs = (await this.listSeqs(recordsDir)) ?? [];
        const headSeq = seqs.at(-1) ?? seq;
        if (headSeq - seq >= RECORD_HISTORY) {
          // Either our entry landed in a pruned name, or the chain moved RECORD_HISTORY steps
          // past it before we looked: we cannot tell which. The caller re-reads the record.
          throw new MirrorsanError('COORD_UNAVAILABLE', `CAS of ${name} to epoch ${next.epoch}: outcome unknown (this process stalled)`);
        }
        // A delete (the pointer moved) before our link would make this CAS land in a dead volume.
        if ((await this.readPointer(name))?.incarnation !== state.incarnation) {
          throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} was deleted`);
        }
        for (const old of seqs) {
          if (old > headSeq - RECORD_HISTORY) break;
          await this.unlinkQuietly(join(recordsDir, seqName(old)));
        }
        return { ok: true };
      }
      if (outcome === 'missing-dir') throw new MirrorsanError('VOLUME_NOT_FOUND', `volume ${name} was deleted`);
      // Another CAS took place `seq` first: its record (or a later one) is the current one.
      const after = await this.readRecord(name);
      return { ok: false, current: after?.record };
    });
  }

  // ------------------------------------------------------------------------------------------
  // Watches (polling)

  watchVolumeRecord(name: string, onChange: (record: VolumeRecord | undefined) => void): Unsubscribe {
    assertVolumeName(name);
    return this.subscribe({
      kind: 'record',
      name,
      onChange,
      filter: new RecordWatchFilter(),
      incarnation: undefined,
      seq: 0,
      primed: false,
      active: true,
    });
  }

  watchNodes(onChange: (nodes: NodeRegistration[]) => void): Unsubscribe {
    return this.subscribe({ kind: 'nodes', onChange, fingerprint: undefined, active: true });
  }

  private subscribe(subscription: Subscription): Unsubscribe {
    this.checkOpen();
    assert(this.subscriptions.size < WATCHES_MAX, `at most ${WATCHES_MAX} watches per coordinator client`);
    this.subscriptions.add(subscription);
    this.schedulePoll(0); // the current value, soon and asynchronously
    return () => {
      subscription.active = false;
      this.subscriptions.delete(subscription);
    };
  }

  private schedulePoll(delayMs: number): void {
    if (this.closed || this.subscriptions.size === 0) return;
    if (this.pollTimer !== undefined) {
      if (delayMs > 0) return; // already scheduled
      clearTimeout(this.pollTimer);
    }
    this.pollTimer = setTimeout(() => {
      this.pollTimer = undefined;
      if (this.poll) return;
      this.poll = this.pollOnce().finally(() => {
        this.poll = undefined;
        this.schedulePoll(this.pollIntervalMs);
      });
    }, delayMs);
  }

  private async pollOnce(): Promise<void> {
    let nodes: NodeRegistration[] | undefined;
    for (const subscription of [...this.subscriptions]) {
      if (!subscription.active || this.closed) continue;
      try {
        if (subscription.kind === 'nodes') {
          nodes ??= await this.liveNodes();
          const current = nodes;
          const fingerprint = nodesFingerprint(current);
          if (fingerprint !== subscription.fingerprint && subscription.active) {
            subscription.fingerprint = fingerprint;
            deliver(() => subscription.onChange(current.map((node) => ({ ...node }))));
          }
        } else {
          await this.pollRecord(subscription);
        }
      } catch (error) {
        if (this.closed) return;
        this.logger.warn('watch poll failed; retrying', { error: error instanceof Error ? error.message : String(error) });
      }
    }
  }

  private async pollRecord(subscription: RecordSubscription): Promise<void> {
    const offer = (incarnation: string | undefined, record: VolumeRecord | undefined): void => {
      for (const value of subscription.filter.offer(incarnation, record)) {
        if (subscription.active) deliver(() => subscription.onChange(value));
      }
    };
    const pointer = await this.readPointer(subscription.name);
    if (!pointer) {
      subscription.incarnation = undefined;
      subscription.seq = 0;
      subscription.primed = true;
      offer(undefined, undefined);
      return;
    }
    const recordsDir = join(this.incarnationDir(pointer.incarnation), 'records');
    if (!subscription.primed) {
      // On subscribe: the current value only, not the history.
      const latest = await this.readLatest(recordsDir, parseVolumeRecord);
      if (latest.missing) return; // deleted meanwhile; the next poll sees it
      subscription.primed = true;
      subscription.incarnation = pointer.incarnation;
      subscription.seq = latest.seq;
      offer(latest.value === undefined ? undefined : pointer.incarnation, latest.value);
      return;
    }
    if (subscription.incarnation !== pointer.incarnation) {
      subscription.incarnation = pointer.incarnation;
      subscription.seq = 0;
    }
    const seqs = await this.listSeqs(recordsDir);
    if (seqs === undefined) return;
    const headSeq = seqs.at(-1) ?? 0;
    for (const seq of seqs) {
      // Below the newest RECORD_HISTORY entries lie pruned names and strays (see the header).
      if (seq <= subscription.seq || seq <= headSeq - RECORD_HISTORY) continue;
      const path = join(recordsDir, seqName(seq));
      const value = await this.readJson(path);
      if (value === undefined) continue; // pruned: fell behind by more than RECORD_HISTORY
      offer(pointer.incarnation, parseVolumeRecord(value, path));
      subscription.seq = seq;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.pollTimer);
    this.pollTimer = undefined;
    for (const subscription of this.subscriptions) subscription.active = false;
    this.subscriptions.clear();
    const sessions = [...this.sessions];
    for (const session of sessions) session.close();
    this.sessions.clear();
    // Resolve only when nothing touches the directory any more (the caller may remove it).
    await Promise.all([...sessions.map((session) => session.drained()), this.poll, ...this.background]);
  }

  // ------------------------------------------------------------------------------------------
  // Files

  private checkOpen(): void {
    if (this.closed) throw new MirrorsanError('COORD_CLOSED', 'embedded coordinator is closed');
  }

  /** Operating errors of the file system become COORD_UNAVAILABLE; our own errors pass. */
  private async guard<T>(what: string, body: () => Promise<T>): Promise<T> {
    try {
      return await body();
    } catch (error) {
      if (isMirrorsanError(error) || errnoOf(error) === undefined) throw error;
      throw unavailable(what, error);
    }
  }

  private incarnationDir(incarnation: string): string {
    return join(this.root, 'incarnations', incarnation);
  }

  private pointerPath(name: string): string {
    return join(this.root, 'volumes', `${name}.json`);
  }

  private parsePointer(value: unknown, what: string): Pointer {
    const object = value as Partial<Pointer> | undefined;
    if (typeof object?.name !== 'string' || typeof object.incarnation !== 'string' || !/^[0-9a-f]{16}$/.test(object.incarnation)) {
      throw new MirrorsanError('COORD_CORRUPT', `${what}: not a volume pointer`);
    }
    return { name: object.name, incarnation: object.incarnation };
  }

  private async readPointer(name: string): Promise<Pointer | undefined> {
    const path = this.pointerPath(name);
    const value = await this.readJson(path);
    return value === undefined ? undefined : this.parsePointer(value, path);
  }

  private async rootPresent(): Promise<boolean> {
    try {
      await fs.stat(join(this.root, 'nodes'));
      return true;
    } catch {
      return false;
    }
  }

  /** The parsed file, or undefined if it does not exist. */
  private async readJson(path: string): Promise<unknown> {
    let text: string;
    try {
      text = await fs.readFile(path, 'utf8');
    } catch (error) {
      if (errnoOf(error) === 'ENOENT') return undefined;
      throw error;
    }
    try {
      return JSON.parse(text);
    } catch (error) {
      // Files are renamed or linked into place complete, so a parse failure is real damage.
      throw new MirrorsanError('COORD_CORRUPT', `${path}: not JSON`, { cause: error });
    }
  }

  /** The sequence numbers in a chain directory, ascending; undefined if the directory is gone. */
  private async listSeqs(dir: string): Promise<number[] | undefined> {
    let files: string[];
    try {
      files = await fs.readdir(dir);
    } catch (error) {
      if (errnoOf(error) === 'ENOENT') return undefined;
      throw error;
    }
    const seqs: number[] = [];
    for (const file of files) {
      const match = SEQ_FILE.exec(file);
      if (match?.[1] !== undefined) seqs.push(Number(match[1]));
    }
    return seqs.sort((a, b) => a - b);
  }

  /** Whether `seq` is the newest entry of the chain in `dir`. */
  private async isChainHead(dir: string, seq: number): Promise<boolean> {
    return (await this.listSeqs(dir))?.at(-1) === seq;
  }

  /** The newest entry of a chain (seq 0 and no value when empty). */
  private async readLatest<T>(
    dir: string,
    parse: (value: unknown, what: string) => T,
    tolerateTornJson = false,
  ): Promise<{ seq: number; value: T | undefined; missing: boolean }> {
    for (let attempt = 0; attempt < RETRIES_MAX; attempt++) {
      const seqs = await this.listSeqs(dir);
      if (seqs === undefined) return { seq: 0, value: undefined, missing: true };
      const seq = seqs[seqs.length - 1];
      if (seq === undefined) return { seq: 0, value: undefined, missing: false };
      const path = join(dir, seqName(seq));
      let value: unknown;
      try {
        value = await this.readJson(path);
      } catch (error) {
        if (!(tolerateTornJson && isMirrorsanError(error, 'COORD_CORRUPT'))) throw error;
        value = null; // handed to the lenient parser
      }
      if (value === undefined) continue; // pruned after the listing: newer entries exist
      return { seq, value: parse(value, path), missing: false };
    }
    throw new MirrorsanError('COORD_UNAVAILABLE', `embedded coordinator: ${dir} changes too fast to read`);
  }

  /** Writes `value` to a new temporary file (fsynced when durable) and returns its path. */
  private async writeTemporary(value: unknown, durable: boolean): Promise<string> {
    const path = join(this.root, 'tmp', `${process.pid}-${randomBytes(8).toString('hex')}.json`);
    const handle = await fs.open(path, 'wx');
    try {
      await handle.writeFile(JSON.stringify(value) + '\n');
      if (durable) await handle.sync();
    } catch (error) {
      await handle.close().catch(() => {});
      await this.unlinkQuietly(path);
      throw error;
    }
    await handle.close();
    return path;
  }

  /** Creates `target` with `value` only if no file has that name: the atomic step of every chain. */
  private async publishExclusive(target: string, value: unknown, durable: boolean): Promise<PublishOutcome> {
    const temporary = await this.writeTemporary(value, durable);
    try {
      await fs.link(temporary, target);
    } catch (error) {
      const code = errnoOf(error);
      if (code === 'EEXIST') return 'exists';
      // link() reports ENOENT for a missing source too: only a missing target dir is "missing-dir".
      if (code === 'ENOENT' && (await fs.stat(temporary).then(() => true, () => false))) return 'missing-dir';
      throw error;
    } finally {
      await this.unlinkQuietly(temporary);
    }
    if (durable) await this.syncDir(join(target, '..'));
    return 'created';
  }

  /** Replaces `target` atomically (the directory must exist). */
  private async publishReplace(target: string, value: unknown): Promise<void> {
    const temporary = await this.writeTemporary(value, true);
    try {
      await fs.rename(temporary, target);
    } catch (error) {
      await this.unlinkQuietly(temporary);
      throw error;
    }
    await this.syncDir(join(target, '..'));
  }

  private async syncDir(dir: string): Promise<void> {
    const handle = await fs.open(dir, 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }

  private async unlinkQuietly(path: string): Promise<void> {
    await fs.unlink(path).catch(() => {});
  }

  /** Temporary files and unreferenced incarnations left by writers that died mid-operation. */
  private async collectOrphans(): Promise<void> {
    const cutoffMs = Date.now() - ORPHAN_AGE_MS;
    const tmpDir = join(this.root, 'tmp');
    for (const file of await fs.readdir(tmpDir)) {
      const stat = await fs.stat(join(tmpDir, file)).catch(() => undefined);
      if (stat && stat.mtimeMs < cutoffMs) await this.unlinkQuietly(join(tmpDir, file));
    }
    const referenced = new Set<string>();
    for (const file of await fs.readdir(join(this.root, 'volumes'))) {
      if (!file.endsWith('.json')) continue;
      const path = join(this.root, 'volumes', file);
      try {
        const value = await this.readJson(path);
        if (value !== undefined) referenced.add(this.parsePointer(value, path).incarnation);
      } catch (error) {
        // Without every pointer we cannot tell garbage from data: collect nothing.
        this.logger.warn('unreadable volume pointer; not collecting incarnations', { path, error: String(error) });
        return;
      }
    }
    for (const incarnation of await fs.readdir(join(this.root, 'incarnations'))) {
      if (referenced.has(incarnation)) continue;
      const dir = this.incarnationDir(incarnation);
      const stat = await fs.stat(dir).catch(() => undefined);
      if (stat && stat.mtimeMs < cutoffMs) {
        this.logger.info('removing an unreferenced volume incarnation', { incarnation });
        await fs.rm(dir, { recursive: true, force: true });
      }
    }
  }
}

/** A watch callback that throws is a bug in the caller: crash loudly, outside the poll loop. */
function deliver(call: () => void): void {
  try {
    call();
  } catch (error) {
    setImmediate(() => {
      throw error;
    });
  }
}
