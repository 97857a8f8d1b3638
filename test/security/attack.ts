// The "local attacker" part of the reliability report (issue 11). Each attack test in
// test/security/local-attacker-*.test.ts wraps one attempt in attack(): the attempt runs, its body
// returns what happened in words ("refused: ...", "dropped after 2 s"), and the outcome is written
// as a figure for scripts/reliability.mjs (kind 'attack'). A body that throws is recorded as not
// held and the error re-thrown, so the test fails as before.
import { basename } from 'node:path';
import { report } from '../fuzz/harness.js';

/**
 * Run one attack attempt and record its outcome for the reliability report.
 * @example await attack('1,100 silent TCP connections', async () => { ...; return 'Unix clients still served'; });
 */
export async function attack(attempt: string, body: () => Promise<string> | string): Promise<void> {
  const file = basename(process.argv[1] ?? 'unknown').replace(/\.js$/, '.ts');
  try {
    const outcome = await body();
    report({ kind: 'attack', file, attempt, outcome, held: true });
  } catch (e) {
    report({ kind: 'attack', file, attempt, outcome: `NOT HELD: ${(e as Error).message.split('\n')[0]}`, held: false });
    throw e;
  }
}
