// Child-process helpers for end-to-end tests: run a tool to completion with a deadline, or
// keep a long-lived server and wait for a line it prints. Output is always kept, because a
// failing interop test is only debuggable with what the client and the server said.
import { spawn } from 'node:child_process';
import type { ChildProcess, SpawnOptions } from 'node:child_process';
import type { TestContext } from 'node:test';
import { once } from 'node:events';
import fs, { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (this file is dist/test/helpers/process.js after the build). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
/** The built CLI. Tests run it with `node`, never through a global install. */
export const CLI_PATH = path.join(REPO_ROOT, 'dist', 'src', 'cli', 'main.js');
/** Python fixtures live in the source tree: tsc does not copy them to dist/. */
export const FIXTURES_DIR = path.join(REPO_ROOT, 'test', 'fixtures');
/** Debian's python3 has the `nbd` module; the default python3 on the dev image is a pyenv build without it. */
export const PYTHON3 = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';

export interface RunOptions {
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string | Buffer;
  /** Output beyond this is dropped (the tail is what matters for errors). */
  maxOutputBytes?: number;
}

export interface RunResult {
  /** Exit code; null when the process died of a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  durationMs: number;
}

const DEFAULT_RUN_TIMEOUT_MS = 60_000;
const DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024;

export function describeCommand(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map((part) => (/^[\w@%+=:,./-]+$/.test(part) ? part : JSON.stringify(part))).join(' ');
}

/**
 * Runs a command to completion. Resolves with the exit status whatever it is; rejects only
 * when the command cannot be started or overruns its deadline (then it is SIGKILLed and the
 * error carries the output so far).
 */
export async function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS;
  const maxOutputBytes = options.maxOutputBytes ?? DEFAULT_MAX_OUTPUT_BYTES;
  const started = Date.now();
  const child = spawn(cmd, args, {
    cwd: options.cwd ?? REPO_ROOT,
    env: options.env ?? process.env,
    stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
  });
  const stdout = new OutputBuffer(maxOutputBytes);
  const stderr = new OutputBuffer(maxOutputBytes);
  child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
  child.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk));
  if (options.input !== undefined && child.stdin) {
    child.stdin.on('error', () => {}); // the child may exit without reading its input
    child.stdin.end(options.input);
  }
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);
  try {
    const [code, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
    const result: RunResult = { code, signal, stdout: stdout.text(), stderr: stderr.text(), durationMs: Date.now() - started };
    if (timedOut) {
      throw new Error(
        `timed out after ${timeoutMs} ms: ${describeCommand(cmd, args)}\n--- stdout ---\n${tail(result.stdout)}\n--- stderr ---\n${tail(result.stderr)}`,
      );
    }
    return result;
  } catch (error) {
    if (!timedOut && (error as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new Error(`cannot run ${cmd}: not installed (.ci/run installs the test tools)`, { cause: error });
    }
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** Runs a command and throws, with its output, unless it exits 0. Returns the result. */
export async function runOk(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const result = await run(cmd, args, options);
  if (result.code !== 0) {
    throw new Error(
      `${describeCommand(cmd, args)} exited with ${result.code ?? result.signal}\n--- stdout ---\n${tail(result.stdout)}\n--- stderr ---\n${tail(result.stderr)}`,
    );
  }
  return result;
}

/** The last `maxChars` characters of some output, for error messages. */
export function tail(text: string, maxChars = 4000): string {
  return text.length <= maxChars ? text : `[... ${text.length - maxChars} chars cut ...]\n${text.slice(-maxChars)}`;
}

class OutputBuffer {
  private chunks: Buffer[] = [];
  private bytes = 0;
  private dropped = 0;
  private readonly maxBytes: number;
  constructor(maxBytes: number) {
    this.maxBytes = maxBytes;
  }
  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.bytes += chunk.length;
    // Keep the tail: drop whole chunks from the front while over the limit.
    while (this.bytes > this.maxBytes && this.chunks.length > 1) {
      const first = this.chunks.shift()!;
      this.bytes -= first.length;
      this.dropped += first.length;
    }
  }
  text(): string {
    const body = Buffer.concat(this.chunks).toString('utf8');
    return this.dropped > 0 ? `[... ${this.dropped} bytes dropped ...]\n${body}` : body;
  }
}

/**
 * Servers must not outlive a test process that dies of an uncaught error: whatever is still
 * running at exit is SIGKILLed (the 'exit' handler must be synchronous, and kill() is).
 */
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;
function trackUntilExit(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const live of liveChildren) live.kill('SIGKILL');
    });
  }
  liveChildren.add(child);
  child.on('close', () => liveChildren.delete(child));
  child.on('error', () => liveChildren.delete(child));
}

/**
 * A long-lived child whose stdout and stderr are collected as text, with a way to wait for
 * a line. Used for servers (mirrorsan, nbdkit) and for writers that report progress.
 */
export class ManagedProcess {
  readonly child: ChildProcess;
  readonly command: string;
  stdout = '';
  stderr = '';
  exitCode: number | null = null;
  exitSignal: NodeJS.Signals | null = null;
  readonly exited: Promise<void>;
  private readonly lineWaiters = new Set<() => void>();
  private spawnError: Error | undefined;

  constructor(cmd: string, args: readonly string[], options: SpawnOptions = {}) {
    this.command = describeCommand(cmd, args);
    this.child = spawn(cmd, args, { cwd: REPO_ROOT, ...options, stdio: ['ignore', 'pipe', 'pipe'] });
    trackUntilExit(this.child);
    this.child.stdout?.setEncoding('utf8');
    this.child.stderr?.setEncoding('utf8');
    this.child.stdout?.on('data', (text: string) => {
      this.stdout += text;
      this.notify();
    });
    this.child.stderr?.on('data', (text: string) => {
      this.stderr += text;
      this.notify();
    });
    this.exited = new Promise((resolve) => {
      this.child.on('error', (error) => {
        this.spawnError = error;
        this.notify();
        resolve();
      });
      this.child.on('close', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        this.notify();
        resolve();
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exitCode === null && this.exitSignal === null && this.spawnError === undefined;
  }

  private notify(): void {
    for (const waiter of this.lineWaiters) waiter();
  }

  /**
   * Resolves with the first complete stdout (or stderr) line, searching from `fromIndex`,
   * that satisfies `match`. Rejects, with the process's output, on exit or deadline.
   */
  async waitForLine(
    match: (line: string) => boolean,
    options: { stream?: 'stdout' | 'stderr'; timeoutMs?: number; fromIndex?: number; what?: string } = {},
  ): Promise<string> {
    const stream = options.stream ?? 'stdout';
    const timeoutMs = options.timeoutMs ?? 20_000;
    const what = options.what ?? 'the expected line';
    let searchedTo = options.fromIndex ?? 0;
    return await new Promise<string>((resolve, reject) => {
      const finish = (error: Error | undefined, line?: string): void => {
        clearTimeout(timer);
        this.lineWaiters.delete(check);
        if (error) reject(error);
        else resolve(line!);
      };
      const check = (): void => {
        const text = stream === 'stdout' ? this.stdout : this.stderr;
        // Only whole lines: a line is complete once its newline arrived.
        let newline = text.indexOf('\n', searchedTo);
        while (newline !== -1) {
          const line = text.slice(searchedTo, newline);
          searchedTo = newline + 1;
          if (match(line)) return finish(undefined, line);
          newline = text.indexOf('\n', searchedTo);
        }
        if (this.spawnError) return finish(new Error(`cannot start ${this.command}: ${this.spawnError.message}`));
        if (!this.running) {
          return finish(new Error(`${this.command} exited (${this.exitCode ?? this.exitSignal}) before printing ${what}\n${this.describeOutput()}`));
        }
      };
      const timer = setTimeout(
        () => finish(new Error(`timed out after ${timeoutMs} ms waiting for ${what} from ${this.command}\n${this.describeOutput()}`)),
        timeoutMs,
      );
      this.lineWaiters.add(check);
      check();
    });
  }

  describeOutput(): string {
    return `--- stdout ---\n${tail(this.stdout)}\n--- stderr ---\n${tail(this.stderr)}`;
  }

  /** Sends `signal`, waits up to `timeoutMs` for the exit, then SIGKILLs. Returns the exit status. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', timeoutMs = 15_000): Promise<{ code: number | null; signal: NodeJS.Signals | null; forced: boolean }> {
    let forced = false;
    if (this.running) {
      this.child.kill(signal);
      const timer = setTimeout(() => {
        forced = true;
        this.child.kill('SIGKILL');
      }, timeoutMs);
      await this.exited;
      clearTimeout(timer);
    }
    return { code: this.exitCode, signal: this.exitSignal, forced };
  }
}

/** Resolves after `ms` milliseconds. */
export async function sleep(ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `probe` until it returns true, or throws after `timeoutMs`. */
export async function waitUntil(probe: () => Promise<boolean> | boolean, options: { timeoutMs?: number; intervalMs?: number; what?: string } = {}): Promise<void> {
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  for (;;) {
    if (await probe()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${options.what ?? 'a condition'}`);
    await sleep(options.intervalMs ?? 100);
  }
}

/** True if a process with this pid exists (signal 0 probes without killing). */
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Wraps a test body so that a failure carries the tail of the server's log: an interop
 * failure is rarely understood from the client's side alone.
 */
export function withServerLog(serverLog: () => string, body: (t: TestContext) => Promise<void>): (t: TestContext) => Promise<void> {
  return async (t) => {
    try {
      await body(t);
    } catch (error) {
      // MIRRORSAN_TEST_LOG_DIR=DIR keeps the whole server log of a failed test there.
      const logDir = process.env.MIRRORSAN_TEST_LOG_DIR;
      if (logDir) fs.writeFileSync(path.join(logDir, `${t.name.replace(/[^A-Za-z0-9]+/g, '-').slice(0, 80)}.log`), serverLog());
      if (error instanceof Error) error.message += `\n--- server stderr (tail) ---\n${tail(serverLog(), 3000)}`;
      throw error;
    }
  };
}
