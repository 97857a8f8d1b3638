/**
 * Signatures of other on-disk formats, for the safety check before a damaged LUKS2 primary header is
 * recovered automatically (cryptsetup probes with blkid there and refuses with "Device contains
 * ambiguous signatures, cannot auto-recover LUKS2"; lib/luks2/luks2_disk_metadata.c). A LUKS2
 * secondary copy can outlive a reformat (mkfs does not always wipe 16 KiB onwards), so the area the
 * primary would overwrite is checked for the magic numbers of common formats first. Only `repair`,
 * which asks for confirmation, overwrites such an area.
 */

interface Signature {
  name: string;
  offsetBytes: number;
  magic: Buffer;
}

const ascii = (s: string) => Buffer.from(s, 'latin1');

/** Magic numbers and their byte offsets (each format's superblock layout). */
const SIGNATURES: readonly Signature[] = [
  { name: 'luks1', offsetBytes: 0, magic: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0x00, 0x01]) },
  { name: 'ext2/3/4', offsetBytes: 0x438, magic: Buffer.from([0x53, 0xef]) },
  { name: 'xfs', offsetBytes: 0, magic: ascii('XFSB') },
  { name: 'btrfs', offsetBytes: 0x10040, magic: ascii('_BHRfS_M') },
  { name: 'swap', offsetBytes: 4086, magic: ascii('SWAPSPACE2') },
  { name: 'swap', offsetBytes: 4086, magic: ascii('SWAP-SPACE') },
  { name: 'swap', offsetBytes: 65526, magic: ascii('SWAPSPACE2') },
  { name: 'dos boot sector / MBR', offsetBytes: 510, magic: Buffer.from([0x55, 0xaa]) },
  { name: 'gpt', offsetBytes: 512, magic: ascii('EFI PART') },
  { name: 'lvm2', offsetBytes: 0, magic: ascii('LABELONE') },
  { name: 'lvm2', offsetBytes: 512, magic: ascii('LABELONE') },
  { name: 'lvm2', offsetBytes: 1024, magic: ascii('LABELONE') },
  { name: 'lvm2', offsetBytes: 1536, magic: ascii('LABELONE') },
  { name: 'iso9660', offsetBytes: 32769, magic: ascii('CD001') },
  { name: 'squashfs', offsetBytes: 0, magic: ascii('hsqs') },
  { name: 'f2fs', offsetBytes: 1024, magic: Buffer.from([0x10, 0x20, 0xf5, 0xf2]) },
  { name: 'bitlocker', offsetBytes: 3, magic: ascii('-FVE-FS-') },
  { name: 'dm-integrity', offsetBytes: 0, magic: ascii('integrt\0') },
  {
    name: 'bcache',
    offsetBytes: 4120,
    magic: Buffer.from([
      0xc6, 0x85, 0x73, 0xf6, 0x4e, 0x1a, 0x45, 0xca, 0x82, 0x65, 0xf5, 0x7f, 0x48, 0xba, 0x6d, 0x81,
    ]),
  },
];

/** Name of the first known foreign format whose magic lies inside `area` (which starts at byte 0), or null. */
export function foreignSignature(area: Uint8Array): string | null {
  const b = Buffer.from(area.buffer, area.byteOffset, area.byteLength);
  for (const s of SIGNATURES) {
    const end = s.offsetBytes + s.magic.length;
    if (end <= b.length && b.subarray(s.offsetBytes, end).equals(s.magic)) return s.name;
  }
  return null;
}
