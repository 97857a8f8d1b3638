import type { TerminalInput } from './commands/terminal-input.js';

/** The shape of one CLI verb: a thin function from argv to an exit code. Logic lives in modules. */
export interface CliIO {
  stdin: NodeJS.ReadableStream & { isTTY?: boolean; fd?: number };
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  env: NodeJS.ProcessEnv;
  /** Passphrase input from `stdin` with what was read ahead (commands/terminal-input.ts `terminalInput`, made on first use). */
  input?: TerminalInput;
}

export type VerbMain = (argv: string[], io: CliIO) => Promise<number>;
