// The two record changes of a catch-up (docs/replication.md, "Catch-up"), as pure functions
// over the coordinator's VolumeRecord; the node performs them by compare-and-swap on the epoch.
//   join:    a replica outside the in-sync set asks to catch up: it joins `catchingUp`, so from
//            the next epoch on every writer mirrors to it (and waits for it);
//   promote: a catching-up replica that copied everything moves into `inSync`.
//   leave diskless: a replica whose disk failed (docs/replication.md, "Disk failure") leaves
//            both sets: it holds no replica any more until it is re-attached and catches up.
// Each returns the next record, or undefined when the change does not apply (any more).
import type { VolumeRecord } from './coordinator.js';

/** `self` starts catching up: it must be a replica, outside the in-sync and catching-up sets. */
export function joinCatchUp(record: VolumeRecord, self: string, nowMs: number): VolumeRecord | undefined {
  const catchingUp = record.catchingUp ?? [];
  if (!record.replicas.includes(self) || record.inSync.includes(self) || catchingUp.includes(self)) return undefined;
  return { ...record, epoch: record.epoch + 1, catchingUp: [...catchingUp, self], updatedAtMs: nowMs };
}

/**
 * `self` restarted with writes of its own the others never received: from in sync to catching
 * up. Never the last in-sync member (it holds the only copy then). The arbiter stays.
 */
export function leaveToCatchUp(record: VolumeRecord, self: string, nowMs: number): VolumeRecord | undefined {
  if (!record.inSync.includes(self) || record.inSync.length < 2) return undefined;
  return {
    ...record,
    epoch: record.epoch + 1,
    inSync: record.inSync.filter((node) => node !== self),
    catchingUp: [...(record.catchingUp ?? []), self],
    updatedAtMs: nowMs,
  };
}

/** `self` finished its catch-up: from catching up to in sync (it must still be catching up). */
export function promoteCaughtUp(record: VolumeRecord, self: string, nowMs: number): VolumeRecord | undefined {
  const catchingUp = record.catchingUp ?? [];
  if (!catchingUp.includes(self)) return undefined;
  const next: VolumeRecord = { ...record, epoch: record.epoch + 1, inSync: [...record.inSync, self], updatedAtMs: nowMs };
  const rest = catchingUp.filter((node) => node !== self);
  if (rest.length > 0) next.catchingUp = rest;
  else delete next.catchingUp;
  return next;
}

/**
 * `self`'s disk failed: it leaves `inSync` (never as the last in-sync member: that one holds
 * the only up-to-date copy, failed disk or not) or `catchingUp`, and is then in neither: no
 * writer mirrors to it, nobody waits for it, and it serves its clients by forwarding. The
 * arbiter moves to the first remaining in-sync member if it was `self` (the record's, or by
 * default the first in-sync member), since only a member can arbitrate.
 */
export function leaveDiskless(record: VolumeRecord, self: string, nowMs: number): VolumeRecord | undefined {
  const catchingUp = record.catchingUp ?? [];
  const inSyncHere = record.inSync.includes(self);
  if (!inSyncHere && !catchingUp.includes(self)) return undefined;
  if (inSyncHere && record.inSync.length < 2) return undefined;
  const inSync = record.inSync.filter((node) => node !== self);
  const arbiter = record.arbiter ?? record.inSync[0]!;
  const next: VolumeRecord = { ...record, epoch: record.epoch + 1, inSync, arbiter: arbiter === self ? inSync[0]! : arbiter, updatedAtMs: nowMs };
  const restCatchingUp = catchingUp.filter((node) => node !== self);
  if (restCatchingUp.length > 0) next.catchingUp = restCatchingUp;
  else delete next.catchingUp;
  return next;
}
