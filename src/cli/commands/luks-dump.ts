/**
 * `cryptmap luksDump <device>` in cryptsetup 2.6's layout (cryptsetup lib/luks2/luks2_json_metadata.c
 * `LUKS2_hdr_dump`, lib/luks1/keymanage.c dump, src/cryptsetup.c `luksDump_with_volume_key`), plus
 * `--dump-json-metadata` (json-c pretty printing), `--dump-volume-key` [`--volume-key-file`] and
 * `--json` (cryptmap's machine-readable summary).
 */
import type { Luks1Volume, Luks2Volume } from '../../luks/index.js';
import { CryptmapError, EXIT_WRONG_PARAMS } from '../../util/errors.js';
import { checkNewFileDir, createExclusiveFile } from '../../util/trusted-path.js';
import type { CliIO, VerbMain } from '../types.js';
import {
  closeQuietly,
  headerPath,
  intOpt,
  keyFileSource,
  type LuksArgs,
  needDevice,
  parseLuksArgs,
} from './luks-common.js';
import { loadLuksForRead } from './luks-unlock.js';
import { confirm, getPassphrase } from './terminal-input.js';
import { passphrasePrompt } from '../device-name.js';

/** json-c JSON_C_TO_STRING_PRETTY: two-space indent, no space after ':', closing bracket at the key's indent. */
export function jsonPretty(v: unknown, level = 0): string {
  const pad = '  '.repeat(level);
  const inner = '  '.repeat(level + 1);
  if (Array.isArray(v)) {
    if (v.length === 0) return `[\n${pad}]`;
    return `[\n${v.map((x) => inner + jsonPretty(x, level + 1)).join(',\n')}\n${pad}]`;
  }
  if (typeof v === 'object' && v !== null) {
    const e = Object.entries(v);
    if (e.length === 0) return `{\n${pad}}`;
    return `{\n${e.map(([k, x]) => `${inner}${JSON.stringify(k)}:${jsonPretty(x, level + 1)}`).join(',\n')}\n${pad}}`;
  }
  return JSON.stringify(v);
}

/** Bytes as "xx " groups, 16 per line, continuation lines prefixed by `cont`. */
function hexLines(b: Buffer, cont: string, width = 16): string {
  const lines: string[] = [];
  for (let i = 0; i < b.length; i += width) {
    lines.push([...b.subarray(i, i + width)].map((x) => x.toString(16).padStart(2, '0') + ' ').join(''));
  }
  return lines.join(`\n${cont}`);
}
const b64 = (s: unknown) => Buffer.from(typeof s === 'string' ? s : '', 'base64');

export function dumpLuks2(v: Luks2Volume): string {
  const j = v.json;
  const bin = v.binHeader;
  let o = 'LUKS header information\n';
  o += `Version:       \t2\n`;
  o += `Epoch:         \t${bin.seqid}\n`;
  o += `Metadata area: \t${v.metadataBytes} [bytes]\n`;
  o += `Keyslots area: \t${v.keyslotsBytes} [bytes]\n`;
  o += `UUID:          \t${bin.uuid || '(no UUID)'}\n`;
  o += `Label:         \t${bin.label || '(no label)'}\n`;
  o += `Subsystem:     \t${bin.subsystem || '(no subsystem)'}\n`;
  const flags = j.config.flags ?? [];
  const reqs = j.config.requirements?.mandatory ?? [];
  o += `Flags:       \t${flags.map((f) => `${f} `).join('')}${flags.length ? '' : '(no flags)'}\n${reqs.length ? '' : '\n'}`;
  if (reqs.length) o += `Requirements:\t${reqs.map((r) => `${r} `).join('')}\n\n`;
  o += 'Data segments:\n';
  for (let i = 0; i < 32; i++) {
    const s = j.segments[String(i)];
    if (!s) continue;
    o += `  ${i}: ${s.type}\n\toffset: ${s.offset} [bytes]\n`;
    o += s.size === 'dynamic' ? '\tlength: (whole device)\n' : `\tlength: ${s.size} [bytes]\n`;
    // cryptsetup 2.6 prints the cipher only when the segment has one (not for linear segments).
    if (s.encryption !== undefined) o += `\tcipher: ${s.encryption}\n`;
    if (s.sector_size !== undefined) o += `\tsector: ${s.sector_size} [bytes]\n`;
    if (s.integrity && typeof s.integrity.type === 'string') o += `\tintegrity: ${s.integrity.type}\n`;
    if (s.flags?.length) o += `\tflags : ${s.flags.join(', ')}\n`;
    o += '\n';
  }
  o += 'Keyslots:\n';
  const segDigest = Object.values(j.digests).find((d) => d.segments.includes('0'));
  for (let i = 0; i < 32; i++) {
    const k = j.keyslots[String(i)];
    if (!k) continue;
    const unbound = !segDigest?.keyslots.includes(String(i));
    o += `  ${i}: ${k.type}${unbound ? ' (unbound)' : ''}\n`;
    if (k.key_size !== undefined) o += `\tKey:        ${k.key_size * 8} bits\n`;
    const p = k.priority;
    o += `\tPriority:   ${p === undefined || p === 1 ? 'normal' : p === 0 ? 'ignored' : p === 2 ? 'preferred' : 'invalid'}\n`;
    if (k.type === 'luks2') {
      o += `\tCipher:     ${k.area.encryption}\n`;
      o += `\tCipher key: ${(k.area.key_size ?? 0) * 8} bits\n`;
      o += `\tPBKDF:      ${k.kdf.type}\n`;
      if (k.kdf.type === 'pbkdf2') o += `\tHash:       ${k.kdf.hash}\n\tIterations: ${k.kdf.iterations}\n`;
      else if (k.kdf.type.startsWith('argon2'))
        o += `\tTime cost:  ${k.kdf.time}\n\tMemory:     ${k.kdf.memory}\n\tThreads:    ${k.kdf.cpus}\n`;
      o += `\tSalt:       ${hexLines(b64(k.kdf.salt), '\t            ')}\n`;
      o += `\tAF stripes: ${k.af.stripes}\n\tAF hash:    ${k.af.hash}\n`;
    } else if (k.type === 'reencrypt') {
      o += `\t${'Mode:'.padEnd(12)}${String(k.mode)}\n\t${'Direction:'.padEnd(12)}${String(k.direction)}\n`;
      const a = k.area as Record<string, unknown>;
      o += `\t${'Resilience:'.padEnd(12)}${String(a.type)}\n`;
      if (a.type === 'checksum')
        o += `\t${'Hash:'.padEnd(12)}${String(a.hash)}\n\t${'Hash data:'.padEnd(12)}${Number(a.sector_size)} [bytes]\n`;
      else if (a.type === 'datashift') o += `\t${'Shift size:'.padEnd(12)}${String(a.shift_size)}[bytes]\n`;
    }
    o += `\tArea offset:${k.area.offset} [bytes]\n\tArea length:${k.area.size} [bytes]\n`;
    for (const [id, d] of Object.entries(j.digests)) if (d.keyslots.includes(String(i))) o += `\tDigest ID:  ${id}\n`;
  }
  o += 'Tokens:\n';
  for (let i = 0; i < 32; i++) {
    const t = j.tokens[String(i)];
    if (!t) continue;
    o += `  ${i}: ${t.type}\n`;
    if (t.type === 'luks2-keyring') o += `\tKey description: ${String(t.key_description)}\n`;
    for (const k of t.keyslots) o += `\tKeyslot:    ${k}\n`;
  }
  o += 'Digests:\n';
  for (let i = 0; i < 32; i++) {
    const d = j.digests[String(i)];
    if (!d) continue;
    o += `  ${i}: ${d.type}\n`;
    if (d.type === 'pbkdf2') {
      o += `\tHash:       ${d.hash}\n\tIterations: ${d.iterations}\n`;
      o += `\tSalt:       ${hexLines(b64(d.salt), '\t            ')}\n`;
      o += `\tDigest:     ${hexLines(b64(d.digest), '\t            ')}\n`;
    }
  }
  return o;
}

export function dumpLuks1(v: Luks1Volume, device: string): string {
  const h = v.header;
  let o = `LUKS header information for ${device}\n\n`;
  o += `Version:       \t1\nCipher name:   \t${h.cipherName}\nCipher mode:   \t${h.cipherMode}\nHash spec:     \t${h.hashSpec}\n`;
  o += `Payload offset:\t${h.payloadOffset}\nMK bits:       \t${h.keyBytes * 8}\n`;
  o += `MK digest:     \t${hexLines(h.mkDigest, '', 20)}\n`;
  o += `MK salt:       \t${hexLines(h.mkDigestSalt, '               \t')}\n`;
  o += `MK iterations: \t${h.mkDigestIterations}\nUUID:          \t${h.uuid}\n\n`;
  h.keyblock.forEach((k, i) => {
    if (k.active === 0x00ac71f3) {
      o += `Key Slot ${i}: ENABLED\n\tIterations:         \t${k.iterations}\n`;
      o += `\tSalt:               \t${hexLines(k.salt, '\t                      \t')}\n`;
      o += `\tKey material offset:\t${k.keyMaterialOffset}\n\tAF stripes:            \t${k.stripes}\n`;
    } else o += `Key Slot ${i}: DISABLED\n`;
  });
  return o;
}

/** cryptmap's machine-readable summary (--json). */
export function dumpJson(v: Luks1Volume | Luks2Volume): unknown {
  const seg = v.dataSegment;
  const base = {
    type: v.type,
    uuid: v.uuid,
    label: v.label,
    subsystem: v.subsystem,
    dataSegment: { ...seg, ivTweak: seg.ivTweak.toString() },
    keyslots: v.keyslots(),
    headerBytes: v.headerBytes,
  };
  if (v.type === 'luks2')
    return {
      ...base,
      seqid: v.seqid.toString(),
      metadataBytes: v.metadataBytes,
      keyslotsBytes: v.keyslotsBytes,
      metadata: v.json,
    };
  const h = v.header;
  return { ...base, hash: h.hashSpec, payloadOffsetSectors: h.payloadOffset };
}

/**
 * luksDump --unbound -S N [--volume-key-file F] (cryptsetup luksDump_with_unbound_key): the key of an
 * unbound keyslot, after its passphrase, printed in hex or written to a new file (owner read-only).
 */
/**
 * --volume-key-file: as cryptsetup, a new file only (O_CREAT|O_EXCL, never through a symlink: an
 * existing file, perhaps world-readable, is refused rather than overwritten), owner read-only; unlike
 * cryptsetup, never in a directory another user can rewrite (checkNewFileDir, exit 2).
 */
function writeVolumeKeyFile(file: string, key: Uint8Array): void {
  checkNewFileDir(file);
  try {
    createExclusiveFile(file, key, 0o400);
  } catch (e) {
    throw new CryptmapError('EVKFILE', `Cannot open keyfile ${file} for write.`, { exitCode: 1, cause: e });
  }
}

async function dumpUnbound(
  io: CliIO,
  vol: Awaited<ReturnType<typeof loadLuksForRead>>['vol'],
  device: string,
  v: LuksArgs,
): Promise<number> {
  const slot = intOpt(v['key-slot'], '--key-slot', 0, 31)!;
  if (!vol.keyslots().some((k) => k.id === slot && k.unbound))
    throw new CryptmapError('EKEYSLOT', `Keyslot ${slot} does not contain unbound key.`, { exitCode: 1 });
  // cryptsetup gives this dialog no abort message: exit 2 only.
  await confirm(
    io,
    'The header dump with unbound key is sensitive information.\nThis dump should be stored encrypted in a safe place.',
    v['batch-mode'],
    { fail: '', exitCode: 2 },
  );
  const pass = await getPassphrase(io, passphrasePrompt(device), keyFileSource(v));
  let uk: Buffer;
  try {
    const r = await vol.unlock(pass, { keySlot: slot, anySegment: true });
    uk = Buffer.from(r.volumeKey.expose());
    r.volumeKey.dispose();
    if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
  } finally {
    pass.fill(0);
  }
  try {
    const file = v['volume-key-file'];
    if (file) {
      writeVolumeKeyFile(file, uk);
    }
    let o = `LUKS header information for ${device}\nUUID:    \t${vol.uuid}\nKeyslot: \t${slot}\nKey bits:\t${uk.length * 8}\n`;
    o += file ? `Key stored to file ${file}.\n` : `Unbound Key:\t${hexLines(uk, '\t\t')}\n`;
    io.stdout.write(o);
    return 0;
  } finally {
    uk.fill(0);
  }
}

const main: VerbMain = async (argv: string[], io: CliIO) => {
  const { values: v, positionals } = parseLuksArgs(argv);
  if (v.unbound && v['key-slot'] === undefined)
    throw new CryptmapError('EARGS', 'Keyslot specification is required.', { exitCode: EXIT_WRONG_PARAMS });
  const device = needDevice(positionals, 'cryptmap luksDump [OPTION...] <device>');
  const hdr = headerPath(v, device);
  // Loaded as cryptsetup's crypt_load does: a damaged LUKS2 copy is rewritten unless --readonly.
  const { dev, vol } = await loadLuksForRead(hdr, v);
  try {
    if (v['dump-json-metadata']) {
      if (vol.type !== 'luks2')
        throw new CryptmapError('EARGS', 'Dump operation is not supported for this device type.', {
          exitCode: EXIT_WRONG_PARAMS,
        });
      io.stdout.write(jsonPretty(vol.json));
      return 0;
    }
    if (v['dump-volume-key']) {
      await confirm(
        io,
        'The header dump with volume key is sensitive information\nthat allows access to encrypted partition without a passphrase.\nThis dump should be stored encrypted in a safe place.',
        v['batch-mode'],
        { fail: '', exitCode: 2 },
      );
      const pass = await getPassphrase(io, passphrasePrompt(device), keyFileSource(v));
      let vk: Buffer;
      try {
        // Any keyslot, as cryptsetup (crypt_volume_key_get with CRYPT_ANY_SLOT): --key-slot is ignored.
        const r = await vol.unlock(pass);
        vk = Buffer.from(r.volumeKey.expose());
        r.volumeKey.dispose();
        if (v.verbose) io.stdout.write(`Key slot ${r.keyslot} unlocked.\n`);
      } finally {
        pass.fill(0);
      }
      try {
        const vkFile = v['volume-key-file'];
        if (vkFile) {
          writeVolumeKeyFile(vkFile, vk);
        }
        const seg = vol.dataSegment;
        const [name, ...mode] = seg.cipher.split('-');
        let o = `LUKS header information for ${device}\nCipher name:   \t${name}\nCipher mode:   \t${mode.join('-')}\n`;
        o += `Payload offset:\t${seg.offsetBytes / 512}\nUUID:          \t${vol.uuid}\nMK bits:       \t${vk.length * 8}\n`;
        if (vkFile) o += `Key stored to file ${vkFile}.\n`;
        else o += `MK dump:\t${hexLines(vk, '\t\t')}\n`;
        io.stdout.write(o);
      } finally {
        vk.fill(0);
      }
      return 0;
    }
    if (v.unbound) return await dumpUnbound(io, vol, device, v);
    if (v.json) {
      io.stdout.write(JSON.stringify(dumpJson(vol), null, 2) + '\n');
      return 0;
    }
    io.stdout.write(vol.type === 'luks2' ? dumpLuks2(vol) : dumpLuks1(vol, device));
    return 0;
  } finally {
    await closeQuietly(dev);
  }
};

export default main;
