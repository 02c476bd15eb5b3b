// Group commit for any expensive idempotent operation (fdatasync above all): a caller is
// served by a run that started after its call, and every caller that arrives while a run
// is in progress shares the one run that follows it.

export class CoalescedRun {
  private readonly work: () => Promise<void>;
  private running: Promise<void> | undefined;
  private queued: Promise<void> | undefined;
  private runs = 0;

  constructor(work: () => Promise<void>) {
    this.work = work;
  }

  get runCount(): number {
    return this.runs;
  }

  run(): Promise<void> {
    if (!this.running) return this.start();
    this.queued ??= this.running
      .catch(() => undefined)
      .then(() => {
        this.queued = undefined;
        return this.start();
      });
    return this.queued;
  }

  private start(): Promise<void> {
    this.runs++;
    const running: Promise<void> = this.work().finally(() => {
      if (this.running === running) this.running = undefined;
    });
    this.running = running;
    return running;
  }
}
