/**
 * `cryptmap agent status` rendering: one row per volume the agent's state record knows, from the
 * record alone (the status command reads the state file; it does not need the agent's memory).
 * Keys are never part of the record, so never part of the status.
 */
import type { AgentState, VolumeRecord } from './state.js';

export interface StatusRow {
  id: string;
  kind: VolumeRecord['kind'];
  class: VolumeRecord['class'];
  state: VolumeRecord['phase'];
  reached: string;
  mountpoint: string | null;
  nbdUri: string | null;
  device: string | null;
  path: string;
  note: string | null;
  /** Shared storage: the single-writer lease's holder, as last seen. */
  lease: { holder: string; self: boolean; since?: string } | null;
  /** Shared storage: why the volume waits for its lease (its `state` is the phase it had reached). */
  leaseWait: string | null;
}

export function statusRows(state: AgentState): StatusRow[] {
  return Object.values(state.volumes)
    .sort((a, b) => a.id.localeCompare(b.id))
    .map((r) => ({
      id: r.id,
      kind: r.kind,
      class: r.class,
      state: r.phase,
      reached: r.reached ?? '-',
      mountpoint: r.mountpoint ?? null,
      nbdUri: r.attach?.nbdUri ?? null,
      device: r.attach?.device ?? null,
      path: r.path,
      note: r.refused ?? r.failed ?? r.attach?.note ?? null,
      lease: r.lease ?? null,
      leaseWait: r.leaseWait ?? null,
    }));
}

/** A plain-text table (columns padded), then refusal notes. */
export function formatStatus(rows: StatusRow[]): string {
  if (rows.length === 0) return 'no volumes\n';
  const head = ['VOLUME', 'CLASS', 'STATE', 'MOUNTPOINT', 'DEVICE', 'NBD'];
  const state = (r: StatusRow) =>
    r.leaseWait !== null && r.state !== 'waiting-for-lease' ? `${r.state}, waiting-for-lease` : r.state;
  const body = rows.map((r) => [r.id, r.class, state(r), r.mountpoint ?? '-', r.device ?? '-', r.nbdUri ?? '-']);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cols: string[]) =>
    cols
      .map((c, i) => (i === cols.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  let out = [line(head), ...body.map(line)].join('\n') + '\n';
  for (const r of rows) {
    if (r.lease)
      out += `${r.id}: lease held by ${r.lease.holder}${r.lease.self ? ' (this node)' : ''}${r.lease.since ? ` since ${r.lease.since}` : ''}\n`;
    if (r.leaseWait) out += `${r.id}: ${r.leaseWait}\n`;
    if (r.note) out += `${r.id}: ${r.note}\n`;
  }
  return out;
}
