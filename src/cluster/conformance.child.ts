// A child process for the coordinator conformance suite: real separate processes racing on the
// same backend, crashing with SIGKILL, and exiting on their own after close().
// Usage: node conformance.child.js '<json task>'; prints one JSON line per event on stdout.
import { createCoordinator } from './index.js';
import type { Coordinator, VolumeRecord } from './coordinator.js';

export type ChildTask =
  /**
   * CAS the record of `volume` forward until it reaches targetEpoch; report the epochs won.
   * Reports `ready` once connected and starts at the first line on stdin, so all racers start together.
   */
  | { mode: 'cas-race'; url: string; volume: string; workerId: string; replicas: string[]; targetEpoch: number }
  /** Register `nodeId` and keep reporting how long the lease is valid, until killed. */
  | { mode: 'hold-lease'; url: string; nodeId: string; leaseTtlMs: number }
  /** Open, register, watch, then close(): the process must exit by itself. */
  | { mode: 'open-close'; url: string; nodeId: string; leaseTtlMs: number };

function emit(event: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify(event) + '\n');
}

const endpoint = (port: number) => ({ host: '127.0.0.1', port });

async function casRace(coordinator: Coordinator, task: Extract<ChildTask, { mode: 'cas-race' }>): Promise<void> {
  const wins: number[] = [];
  let conflicts = 0;
  let current = await coordinator.getVolumeRecord(task.volume);
  if (current === undefined) throw new Error('the parent creates the record first');
  emit({ event: 'ready', workerId: task.workerId });
  await new Promise((resolve) => process.stdin.once('data', resolve));
  process.stdin.destroy();
  current = (await coordinator.getVolumeRecord(task.volume)) ?? current;
  while (current.epoch < task.targetEpoch) {
    const next: VolumeRecord = {
      epoch: current.epoch + 1,
      replicas: task.replicas,
      inSync: [task.workerId],
      arbiter: task.workerId,
      updatedAtMs: Date.now(),
    };
    const result = await coordinator.casVolumeRecord(task.volume, current.epoch, next);
    if (result.ok) {
      wins.push(next.epoch);
      current = next;
    } else {
      conflicts += 1;
      if (result.current === undefined) throw new Error('the record disappeared');
      if (result.current.epoch <= current.epoch) throw new Error(`a failed CAS returned epoch ${result.current.epoch}, not newer than ${current.epoch}`);
      current = result.current;
    }
  }
  emit({ event: 'done', workerId: task.workerId, wins, conflicts });
}

async function main(): Promise<void> {
  const task = JSON.parse(process.argv[2] ?? '') as ChildTask;
  const coordinator = await createCoordinator(task.url);
  switch (task.mode) {
    case 'cas-race':
      await casRace(coordinator, task);
      await coordinator.close();
      return;
    case 'hold-lease': {
      const session = await coordinator.registerNode(
        { id: task.nodeId, nbd: endpoint(10809), peer: endpoint(10810), admin: endpoint(10811) },
        { leaseTtlMs: task.leaseTtlMs },
      );
      const report = (): void => emit({ event: 'lease', leaseId: session.leaseId, validUntilWallMs: Date.now() + session.remainingMs() });
      report();
      setInterval(report, 20); // until SIGKILL
      return;
    }
    case 'open-close': {
      const session = await coordinator.registerNode(
        { id: task.nodeId, nbd: endpoint(10809), peer: endpoint(10810), admin: endpoint(10811) },
        { leaseTtlMs: task.leaseTtlMs },
      );
      let deliveries = 0;
      coordinator.watchNodes(() => (deliveries += 1));
      coordinator.watchVolumeRecord('absent', () => (deliveries += 1));
      while (deliveries < 2) await new Promise((resolve) => setTimeout(resolve, 10));
      await session.revoke();
      await coordinator.close();
      emit({ event: 'closed' });
      return;
    }
  }
}

main().catch((error: unknown) => {
  emit({ event: 'error', message: error instanceof Error ? error.stack ?? error.message : String(error) });
  process.exit(1);
});
