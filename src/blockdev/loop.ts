/**
 * Loop devices as sysfs shows them (/sys/block/loopN/loop/backing_file, what losetup prints): which
 * file a loop device is bound to, and which loop devices are bound to a file. Read-only; attaching and
 * detaching stay with losetup (nbd/attach.ts, daemon/fuse-export.ts).
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { devMajor, devMinor } from './file.js';

/** The block major of loop devices (Documentation/admin-guide/devices.txt). */
export const LOOP_MAJOR = 7;

export interface BoundLoop {
  /** `/dev/loopN` */
  dev: string;
  /** The backing file's path as the kernel keeps it (` (deleted)` appended once it is unlinked). */
  backing: string;
}

/** Every bound loop device with its backing file (none when sysfs cannot be read). */
export function boundLoops(sysfs = '/sys'): BoundLoop[] {
  let names: string[];
  try {
    names = readdirSync(`${sysfs}/block`).filter((n) => n.startsWith('loop'));
  } catch {
    return [];
  }
  const out: BoundLoop[] = [];
  for (const n of names) {
    try {
      out.push({ dev: `/dev/${n}`, backing: readFileSync(`${sysfs}/block/${n}/loop/backing_file`, 'utf8').trim() });
    } catch {
      // not bound
    }
  }
  return out;
}

/** The loop devices bound to `file` (also after it was unlinked). */
export function loopsOn(file: string, sysfs = '/sys'): string[] {
  return boundLoops(sysfs)
    .filter((l) => l.backing === file || l.backing === `${file} (deleted)`)
    .map((l) => l.dev);
}

/** Whether `/dev/loopN` is bound to a file. */
export function loopBound(dev: string, sysfs = '/sys'): boolean {
  return existsSync(`${sysfs}/block/${dev.slice('/dev/'.length)}/loop/backing_file`);
}

/** The file the loop device at `device` is backed by (as losetup shows it), or undefined for anything else. */
export function loopBackingFile(device: string, sysfs = '/sys'): string | undefined {
  try {
    const st = statSync(device);
    if (!st.isBlockDevice() || devMajor(st.rdev) !== LOOP_MAJOR) return undefined;
    const f = readFileSync(`${sysfs}/dev/block/${LOOP_MAJOR}:${devMinor(st.rdev)}/loop/backing_file`, 'utf8').trim();
    return f || undefined;
  } catch {
    return undefined;
  }
}
