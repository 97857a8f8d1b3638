/**
 * The agent's state directory as other processes see it (daemon/agent-host.ts owns the layout):
 * where the pid file, the runtime dir and the volume files are, and whether an agent runs on it.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

export const AGENT_PID_FILE = 'agent.pid';
export const AGENT_RUN_DIR = 'run';
export const AGENT_VOLUME_DIR = 'volumes';

/** The pid in `<state>/agent.pid` when that process is alive. */
export function runningAgentPid(stateDir: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(stateDir, AGENT_PID_FILE), 'utf8').trim());
    if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}
