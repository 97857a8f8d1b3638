/**
 * The native backend without OpenSSL's AES-NI routines or VAES (CRYPTMAP_NO_AESNI=1, as on a CPU without
 * AES-NI or a Node build that does not export them): the EVP paths must give the same bytes as the
 * js backend. Runs in a child process because the probe happens once, when the addon loads.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, it } from 'node:test';

const engineUrl = new URL('../../src/engine/index.js', import.meta.url).href;
const nativeUrl = new URL('../../src/util/native.js', import.meta.url).href;

const SCRIPT = `
import { createSectorCipher } from ${JSON.stringify(engineUrl)};
import { loadNative } from ${JSON.stringify(nativeUrl)};
const a = loadNative();
if (!a) throw new Error('native addon did not load');
if (a.aesniXts || a.aesniCbc || a.xtsImpl !== 'evp' || a.xtsImpls.length !== 1) throw new Error('AES-NI or VAES paths still enabled');
const out = [];
for (const [spec, keyBytes] of [['aes-xts-plain64', 64], ['aes-xts-plain64', 32], ['aes-cbc-essiv:sha256', 32], ['aes-cbc-plain64', 16], ['aes-ecb', 24]]) {
  for (const sectorBytes of [512, 4096]) {
    const key = Buffer.alloc(keyBytes);
    for (let i = 0; i < keyBytes; i++) key[i] = (i * 31 + 7) & 255;
    const data = Buffer.alloc(sectorBytes * 9);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13 + (i >> 8)) & 255;
    const n = createSectorCipher({ spec, key, sectorBytes, backend: 'native' });
    const j = createSectorCipher({ spec, key, sectorBytes, backend: 'js' });
    const x = Buffer.alloc(data.length);
    const y = Buffer.alloc(data.length);
    n.encrypt(data, 4096n, x);
    j.encrypt(data, 4096n, y);
    const back = Buffer.from(x);
    n.decrypt(back, 4096n);
    out.push(spec + '/' + keyBytes + '/' + sectorBytes + ':' + (x.equals(y) && back.equals(data)));
  }
}
console.log(out.join('\\n'));
`;

describe('native backend without AES-NI routines', () => {
  it('EVP paths agree with the js backend', () => {
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', SCRIPT], {
      encoding: 'utf8',
      env: { ...process.env, CRYPTMAP_NO_AESNI: '1' },
    });
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines.length, 10);
    for (const l of lines) assert.match(l, /:true$/, l);
  });
});
