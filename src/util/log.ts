// Structured logging: one line per event on stderr, `level component message key=value`.
// Every refused connection, cut log tail and recovery step is logged with why (the
// operator's first question after "did I lose data?" is "why did that happen?").

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const LEVEL_RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, string | number | boolean | bigint | undefined | null>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
  /** A logger whose lines carry `component` (e.g. "nbd", "wal", "node n1"). */
  child(component: string): Logger;
}

export interface LogSink {
  write(line: string): void;
}

function formatValue(value: LogFields[string]): string {
  const text = String(value);
  return /[\s"=]/.test(text) ? JSON.stringify(text) : text;
}

export function createLogger(options: { level?: LogLevel; component?: string; sink?: LogSink } = {}): Logger {
  const level = options.level ?? ((process.env.MIRRORSAN_LOG_LEVEL as LogLevel | undefined) ?? 'info');
  const minRank = LEVEL_RANK[level] ?? LEVEL_RANK.info;
  const sink = options.sink ?? { write: (line: string) => process.stderr.write(line) };
  const component = options.component ?? 'mirrorsan';
  const emit = (lineLevel: LogLevel, message: string, fields?: LogFields): void => {
    if (LEVEL_RANK[lineLevel] < minRank) return;
    let line = `${new Date().toISOString()} ${lineLevel.padEnd(5)} [${component}] ${message}`;
    if (fields) {
      for (const [key, value] of Object.entries(fields)) {
        if (value !== undefined) line += ` ${key}=${formatValue(value)}`;
      }
    }
    sink.write(line + '\n');
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (name) => createLogger({ level, component: `${component}/${name}`, sink }),
  };
}

/** A logger that keeps lines in memory: tests assert that a refusal was logged with its reason. */
export function createMemoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const logger = createLogger({ level: 'debug', sink: { write: (line) => lines.push(line.trimEnd()) } });
  return Object.assign(logger, { lines });
}
