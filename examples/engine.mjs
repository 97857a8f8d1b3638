// cryptmap/engine: encrypt one 512-byte sector with aes-xts-plain64 (dm-crypt's default cipher) and
// check it against IEEE Std 1619-2007 Annex B, XTS-AES-128 vector 4 (data unit 0, plaintext bytes
// 00 01 .. ff 00 01 .. ff). Then decrypt it back, on the thread pool this time.
//
//   node examples/engine.mjs
import { createSectorCipher } from 'cryptmap/engine';

// Two 128-bit AES keys, concatenated as dm-crypt and cryptsetup take them (256 bits for aes-xts-plain64).
const key = Buffer.from('2718281828459045235360287471352631415926535897932384626433832795', 'hex');
const FIRST = '27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c';
const LAST =
  'bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18deb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568';

const plaintext = Buffer.alloc(512);
for (let i = 0; i < plaintext.length; i++) plaintext[i] = i & 0xff;

const cipher = createSectorCipher({ spec: 'aes-xts-plain64', key });
try {
  const ct = Buffer.alloc(512);
  cipher.encrypt(plaintext, 0n, ct); // sector 0: the IV is the 64-bit little-endian sector number (plain64)
  const ok = ct.subarray(0, 32).toString('hex') === FIRST && ct.subarray(448).toString('hex') === LAST;
  console.log(`backend: ${cipher.backend}, key: ${cipher.keyBytes} bytes, sector: ${cipher.sectorBytes} bytes`);
  console.log(`ciphertext: ${ct.subarray(0, 16).toString('hex')}...`);
  console.log(`IEEE 1619 vector 4: ${ok ? 'match' : 'MISMATCH'}`);
  await cipher.decryptAsync(ct, 0n); // in place
  console.log(`decrypted: ${ct.equals(plaintext) ? 'plaintext back' : 'WRONG'}`);
  if (!ok || !ct.equals(plaintext)) process.exitCode = 1;
} finally {
  cipher.dispose(); // wipes the key schedule
}
