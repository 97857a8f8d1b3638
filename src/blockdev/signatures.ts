/**
 * The on-disk signatures blkid finds on a device, as cryptsetup 2.6 lists them before it formats
 * (src/utils_blockdev.c tools_detect_signatures: "WARNING: Device X already contains a 'ext4'
 * superblock signature."): filesystem and other superblocks (blkid's TYPE) first, then a partition
 * table (PTTYPE). `blkid -p` answers "ambivalent" (exit 8) when two superblocks are found, where
 * cryptsetup's probe loop lists both: then `wipefs --no-act` names them (each type once, in offset
 * order). A device blkid cannot read, or a missing blkid, gives no signatures: this is a warning only.
 *
 * cryptsetup then wipes what it found (tools_wipe_all_signatures, libblkid's probe-and-wipe loop over
 * superblocks and partition tables, the backup GPT at the device's end included) before it writes
 * the new header: `wipeSignatures` does that with wipefs(8), the same libblkid loop.
 */
import { runTool } from '../util/tools.js';

export interface DeviceSignature {
  /** blkid's name of the format: 'ext4', 'crypto_LUKS', 'swap', 'dos', 'gpt', ... */
  type: string;
  kind: 'superblock' | 'partition';
}

/** blkid's partition table types (libblkid's partitions chain). */
const PARTITION_TABLES = new Set([
  'dos',
  'gpt',
  'PMBR',
  'mac',
  'bsd',
  'sun',
  'sgi',
  'atari',
  'aix',
  'solaris',
  'unixware',
  'minix',
  'ultrix',
]);

function exitCode(e: unknown): unknown {
  return (e as { cause?: { code?: unknown } }).cause?.code;
}

/** What blkid finds on `path`, superblocks first (empty when nothing, or when it cannot tell). */
export async function deviceSignatures(path: string): Promise<DeviceSignature[]> {
  try {
    const out = await runTool('blkid', ['-p', '-o', 'export', '--', path], { timeoutMs: 30_000 });
    const field = (name: string) => out.match(new RegExp(`^${name}=(.*)$`, 'm'))?.[1];
    const found: DeviceSignature[] = [];
    const type = field('TYPE');
    if (type) found.push({ type, kind: 'superblock' });
    const pt = field('PTTYPE');
    if (pt) found.push({ type: pt, kind: 'partition' });
    return found;
  } catch (e) {
    if (exitCode(e) !== 8) return []; // 2: nothing found; anything else: no answer
  }
  try {
    const out = await runTool('wipefs', ['--no-act', '--noheadings', '--output', 'TYPE', '--', path], {
      timeoutMs: 30_000,
    });
    const types = [...new Set(out.split('\n').map((l) => l.trim()))].filter((t) => t !== '' && t !== 'PMBR');
    const sb = types.filter((t) => !PARTITION_TABLES.has(t)).map((type) => ({ type, kind: 'superblock' as const }));
    const pt = types.filter((t) => PARTITION_TABLES.has(t)).map((type) => ({ type, kind: 'partition' as const }));
    return [...sb, ...pt];
  } catch {
    return [];
  }
}

/** cryptsetup's words for each signature (printed to standard output, and only without --batch-mode). */
export function signatureWarnings(device: string, found: readonly DeviceSignature[]): string {
  return found.map((s) => `WARNING: Device ${device} already contains a '${s.type}' ${s.kind} signature.\n`).join('');
}

/**
 * Erase every signature libblkid finds on `path` (`wipefs --all --force`: --force because a regular
 * file or partition holding a partition table is "nested" to wipefs; whether the device may be
 * written at all is the caller's check). Returns what was erased, in wipefs's order (cryptsetup's:
 * the probe order), a type once per copy (a GPT's primary and backup headers are two).
 */
export async function wipeSignatures(path: string): Promise<DeviceSignature[]> {
  const out = await runTool('wipefs', ['--all', '--force', '--', path], { timeoutMs: 60_000 });
  // "<path>: 8 bytes were erased at offset 0x00000200 (gpt): 45 46 49 20 50 41 52 54"
  return [...out.matchAll(/ bytes were erased at offset 0x[0-9a-f]+ \(([^)]+)\):/g)].map((m) => ({
    type: m[1]!,
    kind: PARTITION_TABLES.has(m[1]!) ? ('partition' as const) : ('superblock' as const),
  }));
}

/** cryptsetup -v's line for each signature it wipes (log_verbose, standard output). */
export function wipeNotes(device: string, wiped: readonly DeviceSignature[]): string {
  return wiped.map((s) => `Existing '${s.type}' ${s.kind} signature on device ${device} will be wiped.\n`).join('');
}
