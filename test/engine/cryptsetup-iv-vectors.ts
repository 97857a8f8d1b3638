/**
 * cryptsetup IV-generator vectors, ported as data from cryptsetup tests/crypto-vectors.c
 * (cipher_iv_test_vectors, mbroz/cryptsetup 38f95b7001c7): aes-cbc with the given IV mode over 8192 zero
 * bytes starting at 512-byte sector ivOffset; sha256 of the ciphertext per sector size, with and without
 * iv_large_sectors. (cryptsetup calls it iv_offset; it is the first sector of the request.)
 */
export interface IvVector {
  cipher: string;
  mode: string;
  key: string;
  iv: string;
  ivOffset: bigint;
  length: number;
  inSha256: string;
  out: { sectorBytes: 512 | 1024 | 2048 | 4096; large: boolean; sha256: string }[];
}

export const IV_VECTORS: IvVector[] = [
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'null',
    ivOffset: 4294967288n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: 'fd05d04d51b9d487a4579a620739c94a00903eafe8b2ac12caeb58f948f6ef08' },
      { sectorBytes: 1024, large: false, sha256: '55875cde866a8bab08be5b381753dfe57eb95f59af07a4ca6a24d112a91525f4' },
      { sectorBytes: 1024, large: true, sha256: '55875cde866a8bab08be5b381753dfe57eb95f59af07a4ca6a24d112a91525f4' },
      { sectorBytes: 2048, large: false, sha256: '555b8e74909d0d4b748c167e29cfa9a3f3428b62da2d8cdac932c878e27ed270' },
      { sectorBytes: 2048, large: true, sha256: '555b8e74909d0d4b748c167e29cfa9a3f3428b62da2d8cdac932c878e27ed270' },
      { sectorBytes: 4096, large: false, sha256: 'c645bae0403a96095e460d199d584b9378c53fa42e9eb019044b7326f4a6b5c3' },
      { sectorBytes: 4096, large: true, sha256: 'c645bae0403a96095e460d199d584b9378c53fa42e9eb019044b7326f4a6b5c3' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'plain',
    ivOffset: 4294967288n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: '43fd6e2580b213f5ca717918e41291e06e372432fd404b42cbc1721ac75a19c8' },
      { sectorBytes: 1024, large: false, sha256: '18798dadf27b380327a5761907cd1262033657858850d06cf6dff1cfb8cf0177' },
      { sectorBytes: 1024, large: true, sha256: 'd021cfb27a01a894b28749c49f9cb23a7cc40d5008ea4dfb87e4498c1ad6ec16' },
      { sectorBytes: 2048, large: false, sha256: 'a48972b9cf780c2ac8204fd513cb753090d24afdd3b2e8f0d2b79d07bda97097' },
      { sectorBytes: 2048, large: true, sha256: '2acf0757c8ea64c7d0d528e6d19ab57de4b963a2665a3d14bd27c709c03cd900' },
      { sectorBytes: 4096, large: false, sha256: '121b00546e2d08c1158b1557c511308b633364a0d145d6cbdd49910429e69308' },
      { sectorBytes: 4096, large: true, sha256: '44aaf1230c34322afae3f7957a7ca88b3478bd125cae4a65238a6f3a9605faae' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'plain64',
    ivOffset: 4294967288n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: 'b3657e6cbae039cd1e1daf65aeb7da2025176a387579684c9a75c7fb2ba217d2' },
      { sectorBytes: 1024, large: false, sha256: '0aa3237280d376338b2bae010399a5cacd95274027ec1490fd58b0089b9927e2' },
      { sectorBytes: 1024, large: true, sha256: 'd021cfb27a01a894b28749c49f9cb23a7cc40d5008ea4dfb87e4498c1ad6ec16' },
      { sectorBytes: 2048, large: false, sha256: '6787ebede116850a3fb25cbc27619952fe64b9ab24dd2c1a2cffcd7e2e74b5d4' },
      { sectorBytes: 2048, large: true, sha256: '2acf0757c8ea64c7d0d528e6d19ab57de4b963a2665a3d14bd27c709c03cd900' },
      { sectorBytes: 4096, large: false, sha256: 'b2f10e66d4584e93e798ae9c3ea7adf2931aaa3cc49012050058258f1f5dc667' },
      { sectorBytes: 4096, large: true, sha256: '44aaf1230c34322afae3f7957a7ca88b3478bd125cae4a65238a6f3a9605faae' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'plain64be',
    ivOffset: 4294967288n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: '28bf09e168cc051b20af8d0136218a8d7a9498a899e9f466d8b799ca04588390' },
      { sectorBytes: 1024, large: false, sha256: '9b74f7d55a6bb23ad209dd805928708f3a61f214c30da8d7d9cb5726738893d2' },
      { sectorBytes: 1024, large: true, sha256: '36b568082955b9e901c1a8cf3e5b0028b6d135c5f70cf659b58fb9a200432948' },
      { sectorBytes: 2048, large: false, sha256: '944fc8b4feaddc56f062008d520b2d58c005d61d4735c66a42ec98ee21747be5' },
      { sectorBytes: 2048, large: true, sha256: '146baa2ff4a8243f4e92971aca1cbb46a708bbc595ac7381253433419571d9e7' },
      { sectorBytes: 4096, large: false, sha256: 'a8175d84c816067fa268dd1e7d6334937b452df4100b90fa148b7386bc094ae3' },
      { sectorBytes: 4096, large: true, sha256: 'e2c330d8a1b3a8ebdedcfe9be00b624e382fa1450e8f6cf04e88581713b51098' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'essiv:sha256',
    ivOffset: 0n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: 'a53e74c41a5cf36b6349d5d9bb7a895ad53e766f4c2d0bd38b5e0e91a38c2ade' },
      { sectorBytes: 1024, large: false, sha256: '416bc6752e9976a183ead597640e248c91170338e7d86664aad727502ad30be6' },
      { sectorBytes: 1024, large: true, sha256: '023cbee61e9af314ab16ff6fb6a23e03a1bde9e4fa445b22c653e860581599ea' },
      { sectorBytes: 2048, large: false, sha256: '84dc45d36103a851855beff8926b12062cfe753ecf28d18b4dcb889e31b00b92' },
      { sectorBytes: 2048, large: true, sha256: '4b9de43ce24e7a13720248f87a7e15e83ac3920be830acb79ae0cff9b1f5615b' },
      { sectorBytes: 4096, large: false, sha256: 'bb1ba3a941bf17d87619088e3f50edfd571dd2c28a3201b9d98acc0da0658b6d' },
      { sectorBytes: 4096, large: true, sha256: 'a6dc7dc8c49b788172e9dd356c07eb7bd6569ee4dff5dd2e2c198f6358dba7d0' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'benbi',
    ivOffset: 0n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: '3ce394e36d685bdb5a8d71bfd3a668b91f330f97e2d6e8e2e1fc7e8028f173bd' },
      { sectorBytes: 1024, large: false, sha256: '0f27a7ae319e71021216445fbbc6cb78d48449e0888504bf6dea607698340a7e' },
      { sectorBytes: 1024, large: true, sha256: '3ef3088d3b204b5154de7f775bcf028b0eb0742e8e29fa5e86b4ab65185948b1' },
      { sectorBytes: 2048, large: false, sha256: 'b09ae5315f2e9d1304082a02713ddb5db2c9685bdcd138c296b33b72da9dcbe6' },
      { sectorBytes: 2048, large: true, sha256: '6f34f0c1ea72e4dc919178b37cb09d4194f6b8ad05c40e49053190f056fe213f' },
      { sectorBytes: 4096, large: false, sha256: 'aa747dd673a777e17fb976f75ccfc0b7fa7bed15c2327c27bb35fcfe12ee142d' },
      { sectorBytes: 4096, large: true, sha256: '711b3d26f44482721b7a650b378c945b1cd3302ff6cea42425eb9bb983e571bb' },
    ],
  },
  {
    cipher: 'aes',
    mode: 'cbc',
    key: '2b7e151628aed2a6abf7158809cf4f3c',
    iv: 'eboiv',
    ivOffset: 0n,
    length: 8192,
    inSha256: '9f1dcbc35c350d6027f98be0f5c8b43b42ca52b7604459c0c42be3aa88913d47',
    out: [
      { sectorBytes: 512, large: false, sha256: '044e929f7966fe931ba5b802fe7ef9267b6439e7b3cac46eca27a02fe2ea9116' },
      { sectorBytes: 1024, large: false, sha256: 'b04aa4b5d6457a86e9433dd601f7688ee6818d5055188e4bb6a789dfe24b94e2' },
      { sectorBytes: 1024, large: true, sha256: '95084d4e89ab914eae565decf27813b182f7c8b503d6fab0e3f9c101c00c35a4' },
      { sectorBytes: 2048, large: false, sha256: 'd4001f2618d16dd5c4bf4a1330aed74b331ed5e8432d9584673904515f1f49e4' },
      { sectorBytes: 2048, large: true, sha256: '898da2ec457ff0acfc70b636f089ca866bbf09d254a07cbc17d34eb8108a3f5d' },
      { sectorBytes: 4096, large: false, sha256: 'd1d74f709aa0222760db405a84ce892c4f9855d22dd1ea9e47ae8a83b590bb49' },
      { sectorBytes: 4096, large: true, sha256: 'dbe7d225b04f5d3620c4c2b4e87eaee99510455dddc4cd33adbd3949f285824c' },
    ],
  },
];
