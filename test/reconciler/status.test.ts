import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatStatus, statusRows } from '../../src/reconciler/status.js';
import type { AgentState } from '../../src/reconciler/state.js';

test('status rows and table come from the record', () => {
  const st: AgentState = {
    version: 1,
    volumes: {
      'scratch/web/c': {
        id: 'scratch/web/c',
        kind: 'scratch',
        class: 'ephemeral',
        path: '/v/scratch/web/c.img',
        filesystem: 'ext4',
        mountpoint: '/srv/web',
        mapping: 'scratch:web:c',
        bootId: 'b',
        phase: 'ready',
        created: true,
        formatted: true,
        mkfsDone: true,
        reached: 'mount',
        attach: { nbdUri: 'nbd+unix:///scratch:web:c?socket=/run/n.sock', device: '/dev/loop3' },
        updatedAt: '',
      },
      'scratch/db/d': {
        id: 'scratch/db/d',
        kind: 'scratch',
        class: 'persistent',
        path: '/v/scratch/db/d.img',
        filesystem: 'ext4',
        mapping: 'scratch:db:d',
        bootId: 'b',
        phase: 'refused',
        refused: 'not a LUKS volume',
        created: false,
        formatted: true,
        mkfsDone: false,
        updatedAt: '',
      },
    },
  };
  const rows = statusRows(st);
  assert.deepEqual(
    rows.map((r) => [r.id, r.state, r.nbdUri]),
    [
      ['scratch/db/d', 'refused', null],
      ['scratch/web/c', 'ready', 'nbd+unix:///scratch:web:c?socket=/run/n.sock'],
    ],
  );
  assert.equal(
    formatStatus(rows),
    [
      'VOLUME         CLASS       STATE    MOUNTPOINT  DEVICE      NBD',
      'scratch/db/d   persistent  refused  -           -           -',
      'scratch/web/c  ephemeral   ready    /srv/web    /dev/loop3  nbd+unix:///scratch:web:c?socket=/run/n.sock',
      'scratch/db/d: not a LUKS volume',
      '',
    ].join('\n'),
  );
  assert.equal(formatStatus([]), 'no volumes\n');
});
