// Interop with cryptsetup 2.6 (package cryptsetup-bin) and qemu-img (package qemu-utils):
// a LUKS2 volume made by `cryptsetup reencrypt --encrypt` over a known plaintext file reads back
// through a crypt target over a file device, given the volume key from `luksDump --dump-volume-key`
// and the data offset; data written through the target decrypts with qemu's LUKS driver after
// `cryptsetup convert --type luks1`. Recipe: /work/shared/INTEROP.md.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { makeTempDir } from '../helpers/tmp.js';
import { join } from 'node:path';
import { test } from 'node:test';
import { DeviceRegistry } from '../../src/dm/registry.js';
import { pattern } from './helpers.js';
import { FAST_PBKDF } from '../helpers/luks.js';

function run(cmd: string, args: string[], pkg: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ENOENT')
    assert.fail(`${cmd} not found: install the Debian package ${pkg}`);
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

interface Volume {
  dir: string;
  img: string;
  keyFile: string;
  plain: Buffer;
  volumeKeyHex: string;
  offsetSectors: number;
  sectorBytes: number;
}

function makeVolume(sectorSize: number): Volume {
  const { dir } = makeTempDir('cryptmap-dm-');
  const img = join(dir, 'enc.img');
  const keyFile = join(dir, 'key');
  const plain = pattern(2 << 20, 77 + sectorSize);
  writeFileSync(img, plain, { mode: 0o600 });
  truncateSync(img, plain.length + (32 << 20));
  writeFileSync(keyFile, 'pass', { mode: 0o600 });
  const common = ['--batch-mode', '--key-file', keyFile];
  run(
    'cryptsetup',
    [
      'reencrypt',
      '--encrypt',
      '--type',
      'luks2',
      '--reduce-device-size',
      '32M',
      '--sector-size',
      String(sectorSize),
      ...FAST_PBKDF,
      ...common,
      img,
    ],
    'cryptsetup-bin',
  );
  const dump = run('cryptsetup', ['luksDump', '--dump-volume-key', ...common, img], 'cryptsetup-bin');
  const mk = /MK dump:\s*((?:[0-9a-f]{2}\s*)+)/.exec(dump);
  assert.ok(mk, `no MK dump in luksDump output:\n${dump}`);
  const info = run('cryptsetup', ['luksDump', img], 'cryptsetup-bin');
  const seg =
    /Data segments:[\s\S]*?offset:\s*([0-9]+) \[bytes\][\s\S]*?cipher:\s*(\S+)[\s\S]*?sector:\s*([0-9]+) \[bytes\]/.exec(
      info,
    );
  assert.ok(seg, `no data segment in luksDump output:\n${info}`);
  assert.equal(seg[2], 'aes-xts-plain64');
  return {
    dir,
    img,
    keyFile,
    plain,
    volumeKeyHex: mk[1]!.replace(/\s+/g, ''),
    offsetSectors: Number(seg[1]) / 512,
    sectorBytes: Number(seg[3]),
  };
}

function tableFor(v: Volume): string {
  const opt = v.sectorBytes === 512 ? '' : ` 1 sector_size:${v.sectorBytes}`;
  return `0 ${v.plain.length / 512} crypt aes-xts-plain64 ${v.volumeKeyHex} 0 ${v.img} ${v.offsetSectors}${opt}`;
}

test('a cryptsetup-made LUKS2 volume reads back as its plaintext through the crypt target', async () => {
  for (const sectorSize of [512, 4096]) {
    const v = makeVolume(sectorSize);
    try {
      assert.equal(v.sectorBytes, sectorSize);
      const registry = new DeviceRegistry();
      await registry.create('luks', { table: tableFor(v) });
      const dev = registry.open('luks');
      const got = Buffer.alloc(v.plain.length);
      await dev.read(0, got);
      assert.ok(got.equals(v.plain), `plaintext with ${sectorSize}-byte sectors`);
      const mid = Buffer.alloc(8192);
      await dev.read(1 << 20, mid);
      assert.ok(mid.equals(v.plain.subarray(1 << 20, (1 << 20) + 8192)));
      await dev.close();
      await registry.closeAll();
    } finally {
      rmSync(v.dir, { recursive: true, force: true });
    }
  }
});

test('data written through the crypt target decrypts with qemu-img after conversion to LUKS1', async () => {
  const v = makeVolume(512);
  try {
    const registry = new DeviceRegistry();
    await registry.create('luks', { table: tableFor(v) });
    const dev = registry.open('luks');
    const fresh = pattern(v.plain.length, 4242);
    await dev.write(0, fresh.subarray(0, 1 << 20));
    await dev.write(1 << 20, fresh.subarray(1 << 20), { fua: true });
    await dev.close();
    await registry.closeAll();
    run('cryptsetup', ['convert', '--type', 'luks1', '--batch-mode', v.img], 'cryptsetup-bin');
    const out = join(v.dir, 'out.raw');
    run(
      'qemu-img',
      [
        'convert',
        '--object',
        `secret,id=s0,file=${v.keyFile}`,
        '--image-opts',
        `driver=luks,key-secret=s0,file.filename=${v.img}`,
        '-O',
        'raw',
        out,
      ],
      'qemu-utils',
    );
    const raw = readFileSync(out);
    assert.ok(raw.subarray(0, fresh.length).equals(fresh), 'qemu decrypts what the crypt target wrote');
  } finally {
    rmSync(v.dir, { recursive: true, force: true });
  }
});
