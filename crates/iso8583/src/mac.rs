//! Message authentication codes for ISO 8583 field 64 (and field 128).
//!
//! Two DES-based algorithms are implemented here. They serve different hops.
//!
//! * **UnionPay POS MAC** ([`cup_pos_mac`]), the "ECB" MAC from the China
//!   UnionPay POS terminal specification. POS terminals use it to compute
//!   F64 over the bytes from the MTI to the end of field 63 (the MAC
//!   element block, MAB), so the switch uses it on the **terminal side**.
//!   It XORs all 8-byte blocks of the zero-padded MAB into one block and
//!   writes that block as 16 uppercase hex characters. It encrypts the first
//!   8 characters under the MAC key (DES, or triple DES for a 16- or 24-byte
//!   key), XORs the result with the last 8 characters and encrypts again.
//!   The MAC is the first 8 characters of the uppercase hex form of that
//!   final block.
//! * **ISO/IEC 9797-1 MAC algorithm 3**, also called the ANSI X9.19 retail
//!   MAC ([`retail_mac()`]). This is the usual MAC on the **network side**,
//!   between the switch and hosts or card networks. It is a single-DES
//!   CBC-MAC under `K` over the zero-padded data (padding method 1). The last
//!   output is then decrypted under `K'` and encrypted again under `K`.
//!
//! [`MacKey`] holds a terminal MAC key (MAK/TAK) of 8, 16 or 24 bytes.
//! [`verify`] compares a received MAC with a computed one without stopping
//! at the first byte that differs.
//!
//! The caller chooses the bytes to authenticate, and they must be exactly
//! what goes on the wire. For the UnionPay POS MAC that means the MTI through
//! the end of field 63, with the bitmap as sent.
//!
//! # Security note
//!
//! The UnionPay POS MAC is cryptographically weak. The cipher sees only the
//! XOR of all the blocks, so reordering blocks, adding zero bytes at the end,
//! or making any change that keeps the XOR the same leaves the MAC
//! unchanged. It is here only because UnionPay-spec terminals require it. Do
//! not use it on any new interface.

use core::fmt;

use cipher::{BlockCipherEncrypt, Key, KeyInit};
use des::{Des, TdesEde2, TdesEde3};
use retail_mac::{Mac, RetailMac};

/// Length of a DES block, and so of every MAC computed here, in bytes.
pub const MAC_LEN: usize = 8;

/// Error returned when building a [`MacKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MacKeyError {
    /// The key was not 8 (DES), 16 (two-key TDES) or 24 (three-key TDES)
    /// bytes long. The field holds the length that was supplied.
    #[error("MAC key must be 8, 16 or 24 bytes long, got {0} bytes")]
    InvalidLength(usize),
}

/// The cipher a [`MacKey`] uses, which follows from the key's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacKeyKind {
    /// 8-byte key: single DES.
    SingleDes,
    /// 16-byte key `K1 || K2`: two-key triple DES EDE (`K3 = K1`).
    TdesTwoKey,
    /// 24-byte key `K1 || K2 || K3`: three-key triple DES EDE.
    TdesThreeKey,
}

impl MacKeyKind {
    /// Short name used in [`MacKey`]'s `Debug` output: `des`, `tdes-2key`
    /// or `tdes-3key`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SingleDes => "des",
            Self::TdesTwoKey => "tdes-2key",
            Self::TdesThreeKey => "tdes-3key",
        }
    }

    /// Key length in bytes for this kind (8, 16 or 24).
    #[must_use]
    pub const fn key_len(self) -> usize {
        match self {
            Self::SingleDes => 8,
            Self::TdesTwoKey => 16,
            Self::TdesThreeKey => 24,
        }
    }
}

impl fmt::Display for MacKeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A terminal MAC key (MAK/TAK) for [`cup_pos_mac`].
///
/// The key is 8 bytes (single DES), 16 bytes (two-key triple DES EDE) or 24
/// bytes (three-key triple DES EDE). Only the expanded cipher state is
/// stored, not the raw key bytes. `Debug` never prints key material, only
/// the kind, e.g. `MacKey(tdes-2key, ****)`.
#[derive(Clone)]
pub struct MacKey {
    cipher: KeyCipher,
}

#[derive(Clone)]
enum KeyCipher {
    Des(Des),
    Ede2(TdesEde2),
    Ede3(TdesEde3),
}

impl MacKey {
    /// Builds a key from its clear bytes.
    ///
    /// # Errors
    ///
    /// Returns [`MacKeyError::InvalidLength`] unless `key` is 8, 16 or 24
    /// bytes long. This function never panics.
    pub fn new(key: &[u8]) -> Result<Self, MacKeyError> {
        let cipher = if let Ok(k) = <&[u8; 8]>::try_from(key) {
            KeyCipher::Des(Des::new(&Key::<Des>::from(*k)))
        } else if let Ok(k) = <&[u8; 16]>::try_from(key) {
            KeyCipher::Ede2(TdesEde2::new(&Key::<TdesEde2>::from(*k)))
        } else if let Ok(k) = <&[u8; 24]>::try_from(key) {
            KeyCipher::Ede3(TdesEde3::new(&Key::<TdesEde3>::from(*k)))
        } else {
            return Err(MacKeyError::InvalidLength(key.len()));
        };
        Ok(Self { cipher })
    }

    /// Which cipher this key uses.
    #[must_use]
    pub fn kind(&self) -> MacKeyKind {
        match self.cipher {
            KeyCipher::Des(_) => MacKeyKind::SingleDes,
            KeyCipher::Ede2(_) => MacKeyKind::TdesTwoKey,
            KeyCipher::Ede3(_) => MacKeyKind::TdesThreeKey,
        }
    }

    /// Encrypts one 8-byte block in place (ECB, no chaining).
    fn encrypt_block(&self, block: &mut [u8; MAC_LEN]) {
        match &self.cipher {
            KeyCipher::Des(c) => c.encrypt_block(block.into()),
            KeyCipher::Ede2(c) => c.encrypt_block(block.into()),
            KeyCipher::Ede3(c) => c.encrypt_block(block.into()),
        }
    }
}

impl TryFrom<&[u8]> for MacKey {
    type Error = MacKeyError;

    /// Same as [`MacKey::new`].
    fn try_from(key: &[u8]) -> Result<Self, Self::Error> {
        Self::new(key)
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacKey({}, ****)", self.kind())
    }
}

/// Computes the UnionPay POS ("ECB") MAC of `data` under `key`.
///
/// `data` is the MAC element block: the message bytes from the MTI to the
/// end of field 63, exactly as sent. The steps are:
///
/// 1. Zero-pad `data` to a multiple of 8 bytes. Nothing is added if it is
///    already a multiple. Empty input counts as one all-zero block, which
///    gives the same result as any run of zero bytes, because XOR with zero
///    changes nothing.
/// 2. XOR all 8-byte blocks into one 8-byte result block.
/// 3. Write the result block as 16 uppercase hex ASCII characters.
/// 4. Encrypt the first 8 characters under `key` (DES or TDES EDE,
///    depending on [`MacKey::kind`]).
/// 5. XOR that ciphertext with the last 8 characters and encrypt again.
/// 6. Write the output as 16 uppercase hex characters. The first 8 ASCII
///    characters are the MAC, which is what goes in F64.
///
/// The MAC is therefore always 8 ASCII characters from `0-9A-F`.
#[must_use]
pub fn cup_pos_mac(key: &MacKey, data: &[u8]) -> [u8; MAC_LEN] {
    let result_block = xor_fold(data);
    let (mut block, second_half) = upper_hex(&result_block);
    key.encrypt_block(&mut block);
    xor_into(&mut block, &second_half);
    key.encrypt_block(&mut block);
    let (mac, _) = upper_hex(&block);
    mac
}

/// Computes the ISO/IEC 9797-1 MAC algorithm 3 (ANSI X9.19 retail MAC) of
/// `data`, with padding method 1 (zeros).
///
/// `key` is `K || K'`, 8 bytes each. The data is zero-padded to a multiple of
/// 8 bytes and CBC-MACed with single DES under `K`, using a zero IV. The last
/// block is then decrypted under `K'` and encrypted under `K`.
///
/// Empty input is padded to one all-zero block, since padding method 1 pads
/// to a positive multiple of the block length. BouncyCastle's
/// `ISO9797Alg3Mac` does the same. The result for empty input therefore
/// equals the result for `[0u8; 8]`. The input is never padded with an extra
/// block when its length is already a non-zero multiple of 8.
///
/// This uses the RustCrypto `retail-mac` crate, which pads with zeros. That
/// crate skips the zero block for empty input, so empty input is handled
/// here.
#[must_use]
pub fn retail_mac(key: &[u8; 16], data: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = <RetailMac<Des> as KeyInit>::new(&(*key).into());
    if data.is_empty() {
        Mac::update(&mut mac, &[0u8; MAC_LEN]);
    } else {
        Mac::update(&mut mac, data);
    }
    mac.finalize().into_bytes().into()
}

/// Checks a received MAC (e.g. F64 as it came off the wire) against the one
/// computed locally.
///
/// Returns `true` only if `received` is exactly [`MAC_LEN`] bytes and equal
/// to `computed`. The length is not secret, so a wrong length returns
/// early. For the right length every byte is compared and the differences
/// are ORed together, with no early exit, so the time taken does not show
/// where the first difference is.
#[must_use]
pub fn verify(computed: &[u8; MAC_LEN], received: &[u8]) -> bool {
    if received.len() != MAC_LEN {
        return false;
    }
    let diff = computed
        .iter()
        .zip(received)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    core::hint::black_box(diff) == 0
}

/// XORs all 8-byte blocks of `data` together. A short last block is
/// treated as zero-padded, and empty input gives the zero block.
fn xor_fold(data: &[u8]) -> [u8; MAC_LEN] {
    let mut acc = [0u8; MAC_LEN];
    for chunk in data.chunks(MAC_LEN) {
        for (a, b) in acc.iter_mut().zip(chunk) {
            *a ^= b;
        }
    }
    acc
}

/// `dst ^= src`, byte by byte.
fn xor_into(dst: &mut [u8; MAC_LEN], src: &[u8; MAC_LEN]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Writes `block` as 16 uppercase hex ASCII characters and returns them as
/// two halves: the characters for bytes 0..4 and for bytes 4..8.
fn upper_hex(block: &[u8; MAC_LEN]) -> ([u8; MAC_LEN], [u8; MAC_LEN]) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [[0u8; MAC_LEN]; 2];
    for (i, byte) in block.iter().enumerate() {
        let half = &mut out[i / 4];
        let pos = (i % 4) * 2;
        half[pos] = DIGITS[usize::from(byte >> 4)];
        half[pos + 1] = DIGITS[usize::from(byte & 0x0f)];
    }
    let [first, second] = out;
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cipher::BlockCipherDecrypt;
    use proptest::prelude::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector is valid hex")
    }

    fn key(s: &str) -> MacKey {
        MacKey::new(&h(s)).expect("test key has a valid length")
    }

    fn key16(s: &str) -> [u8; 16] {
        <[u8; 16]>::try_from(h(s).as_slice()).expect("16-byte key")
    }

    // ---------------------------------------------------------------------
    // UnionPay POS MAC
    // ---------------------------------------------------------------------

    /// PUBLISHED, single DES, input a whole number of blocks (16 bytes).
    /// Source: GitHub solo123/pgate, test/integration/pos_mac_test.rb
    /// ("POS MAC加密算法", plus the worked example in its `=begin` block). The
    /// implementation under test there is app/models/biz/pos_encrypt.rb
    /// (`pos_mac`, uppercase hex) at commit
    /// 95bd917a95c6dd1c759ae8fc46d59855e1101279:
    ///   MAB 1234567890ABCDEFABCDEF1234567890, MAK 2222222222222222
    ///   M1^M2 = B9F9B96AA4FDB57F -> ASCII 42394639423936414134464442353746
    ///   E(first 8) = 9FDE90A34CF73B2E, ^ last 8 = DEEAD6E70EC20C68
    ///   E(temp) = E267B6E21913D339 -> MAC "E267B6E2"
    #[test]
    fn cup_published_single_des_whole_blocks() {
        let k = key("2222222222222222");
        let data = h("1234567890ABCDEFABCDEF1234567890");

        // Intermediate steps, as published.
        let result_block = xor_fold(&data);
        assert_eq!(result_block.to_vec(), h("B9F9B96AA4FDB57F"));
        let (mut block, second) = upper_hex(&result_block);
        assert_eq!(&block, b"B9F9B96A");
        assert_eq!(&second, b"A4FDB57F");
        k.encrypt_block(&mut block);
        assert_eq!(block.to_vec(), h("9FDE90A34CF73B2E"));
        xor_into(&mut block, &second);
        assert_eq!(block.to_vec(), h("DEEAD6E70EC20C68"));
        k.encrypt_block(&mut block);
        assert_eq!(block.to_vec(), h("E267B6E21913D339"));

        // End to end.
        assert_eq!(&cup_pos_mac(&k, &data), b"E267B6E2");
        assert_eq!(k.kind(), MacKeyKind::SingleDes);
    }

    /// The same published vector with the 8-byte key doubled into a 16-byte
    /// key K||K. Two-key TDES then reduces to single DES. pgate's `e_mak`
    /// computes exactly this: des-ede with K1||K2||K1 built from the 8-byte
    /// key.
    #[test]
    fn cup_published_vector_with_degenerate_two_key_tdes() {
        let k = key("22222222222222222222222222222222");
        assert_eq!(k.kind(), MacKeyKind::TdesTwoKey);
        let data = h("1234567890ABCDEFABCDEF1234567890");
        assert_eq!(&cup_pos_mac(&k, &data), b"E267B6E2");
    }

    /// PUBLISHED (first 4 MAC characters only), two-key TDES, 32 bytes
    /// (a whole number of blocks).
    /// Source: GitHub solo123/pgate, test/integration/pos_mac_test.rb, test
    /// "POS MAC算法", and test/integration/kaifu_mac_test.rb at commit
    /// 95bd917a95c6dd1c759ae8fc46d59855e1101279 ("凯富MAC算法"):
    ///   mab "20160913201609132016091320160913",
    ///   key AB73C9416D41E936E82AAC11053BCEDD -> '33303237'.
    /// `kaifu_mac` returns the hex of the first 4 ASCII characters of
    /// `pos_mac`, so the published part of the MAC is "3027".
    /// SELF-DERIVED: the remaining 4 characters ("1C74"). Full MAC
    /// "30271C74", computed with an independent Python/pycryptodome
    /// implementation. Step 1 was also checked with `openssl enc
    /// -des-ede-ecb`:
    ///   XOR = 0000000000000000, E("00000000") = B83578E3CCDE455F,
    ///   temp = 880548D3FCEE756F, E(temp) = 30271C74557172B8.
    #[test]
    fn cup_published_prefix_tdes_two_key_whole_blocks() {
        let k = key("AB73C9416D41E936E82AAC11053BCEDD");
        let mac = cup_pos_mac(&k, b"20160913201609132016091320160913");
        assert_eq!(&mac[..4], b"3027"); // published
        assert_eq!(&mac, b"30271C74"); // self-derived tail
    }

    /// PUBLISHED (first 4 MAC characters only), two-key TDES, 176 bytes.
    /// Source: GitHub solo123/pgate, test/integration/kaifu_mac_test.rb at
    /// commit 95bd917a95c6dd1c759ae8fc46d59855e1101279 ("凯富MAC算法-带中文"):
    /// key D83209FCB0017CC2C67FD0C6373D6475 -> '35373542', i.e. "575B".
    /// `kaifu_mac` (app/models/biz/kaifu_api.rb, same commit) GBK-encodes
    /// the string first. The bytes below are Python's GBK encoding of the
    /// string in that test.
    /// SELF-DERIVED: the tail "2529" (full MAC "575B2529", pycryptodome).
    #[test]
    fn cup_published_prefix_tdes_two_key_gbk_message() {
        let k = key("D83209FCB0017CC2C67FD0C6373D6475");
        let data = h(concat!(
            "C6D5B6FBB2E2CAD4202D20B2E2CAD4C9CCC6B7687474703A2F2F612E706F6F75",
            "6C636C6F75642E636E2F746573745F70616765732F7061793632323538383635",
            "35363435353731333333343530333033313937303035303330303136C1BAD2E6",
            "BBAA687474703A2F2F3131322E37342E3138342E3233363A383031302F726563",
            "765F6E6F746966797075657268616E6461315031303030303635323031363039",
            "32323131353931363130303042303031",
        ));
        assert_eq!(data.len(), 176);
        let mac = cup_pos_mac(&k, &data);
        assert_eq!(&mac[..4], b"575B"); // published
        assert_eq!(&mac, b"575B2529"); // self-derived tail
    }

    /// SELF-DERIVED, single DES, input not a whole number of blocks (3
    /// bytes). The key and input come from the `main` of
    /// victorwrage/Swishcard
    /// app/src/main/java/com/qhw/swishcardapp/utils/MacEcbUtils.java
    /// (银联标准Mac). That file prints the MAC but does not publish it.
    /// Worked out step by step with `openssl enc -des-ecb -nopad` as the
    /// DES primitive, and matched by an independent pycryptodome
    /// implementation:
    ///   pad 010203 -> 0102030000000000 (one block, so XOR = itself)
    ///   ASCII "0102030000000000" = 3031303230333030 | 3030303030303030
    ///   E(3031303230333030) = DAAE05FD3F95D94B
    ///   ^ 3030303030303030   = EA9E35CD0FA5E97B
    ///   E(EA9E35CD0FA5E97B) = F11F2C27A9B2246F -> MAC "F11F2C27"
    #[test]
    fn cup_self_derived_single_des_partial_block() {
        let k = key("5CBE7E38A146FD5C");
        assert_eq!(&cup_pos_mac(&k, &h("010203")), b"F11F2C27");
    }

    /// SELF-DERIVED, two-key TDES, 22 bytes (not a whole number of blocks).
    /// pycryptodome reference: XOR = 40652574696A4554,
    /// E(first 8) = EF10BDC68FD4F8C2, temp = D9298B87BBE1CDF6,
    /// E(temp) = 0A874F3462B444CB -> "0A874F34".
    #[test]
    fn cup_self_derived_tdes_two_key_partial_block() {
        let k = key("0123456789ABCDEFFEDCBA9876543210");
        assert_eq!(&cup_pos_mac(&k, b"Now is the time for it"), b"0A874F34");
    }

    /// SELF-DERIVED, three-key TDES, 22 bytes (partial last block) and 24
    /// bytes (whole blocks). pycryptodome reference, and the 22-byte case
    /// was also worked step by step with `openssl enc -des-ede3-ecb`:
    ///   XOR = 40652574696A4554, E("40652574") = 9D384A2DA779C039,
    ///   ^ "696A4554" = AB017C6C934CF50D, E(.) = 50E1323604ED8F07.
    ///   24 bytes: XOR = 4065257461722974, temp = AB097D1F9540F70D,
    ///   E(temp) = DAA610FD340D4C1F.
    #[test]
    fn cup_self_derived_tdes_three_key() {
        let k = key("0123456789ABCDEFFEDCBA987654321089ABCDEF01234567");
        assert_eq!(k.kind(), MacKeyKind::TdesThreeKey);
        assert_eq!(&cup_pos_mac(&k, b"Now is the time for it"), b"50E13236");
        assert_eq!(&cup_pos_mac(&k, b"Now is the time for all "), b"DAA610FD");
    }

    /// Empty input is one zero block: same MAC as eight zero bytes.
    /// SELF-DERIVED value (pycryptodome): E("00000000") = F3939F9C3037E8A5,
    /// temp = C3A3AFAC0007D895, E(temp) = DFB656BDB8FD841E.
    #[test]
    fn cup_empty_input_is_one_zero_block() {
        let k = key("0123456789ABCDEF");
        assert_eq!(cup_pos_mac(&k, b""), cup_pos_mac(&k, &[0u8; 8]));
        assert_eq!(&cup_pos_mac(&k, b""), b"DFB656BD");
    }

    #[test]
    fn upper_hex_is_uppercase() {
        let (a, b) = upper_hex(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(&a, b"01234567");
        assert_eq!(&b, b"89ABCDEF");
    }

    // ---------------------------------------------------------------------
    // ISO 9797-1 MAC algorithm 3 / X9.19 retail MAC
    // ---------------------------------------------------------------------

    /// PUBLISHED: ISO/IEC 9797-1:2011 Annex B.4, as quoted in the RustCrypto
    /// retail-mac README (GitHub RustCrypto/MACs, retail-mac/README.md):
    /// K||K' = 0123456789ABCDEF FEDCBA9876543210.
    /// "Now is the time for all " (24 bytes, whole blocks) -> A1C72E74EA3FA9B6
    /// "Now is the time for it"   (22 bytes, zero padded)  -> 2E2B1428CC78254F
    /// An independent pycryptodome CBC-MAC gives the same values.
    #[test]
    fn retail_published_iso9797_annex_b() {
        let k = key16("0123456789ABCDEFFEDCBA9876543210");
        assert_eq!(
            retail_mac(&k, b"Now is the time for all ").to_vec(),
            h("A1C72E74EA3FA9B6")
        );
        assert_eq!(
            retail_mac(&k, b"Now is the time for it").to_vec(),
            h("2E2B1428CC78254F")
        );
    }

    /// PUBLISHED: BouncyCastle, GitHub bcgit/bc-java,
    /// prov/src/test/java/org/bouncycastle/jce/provider/test/MacTest.java
    /// (`keyBytesISO9797` / `outputISO9797`, MAC "ISO9797ALG3"). The same
    /// vector is in BouncyCastle's crypto/test/ISO9797Alg3MacTest.java.
    #[test]
    fn retail_published_bouncycastle() {
        let k = key16("7CA110454A1A6E570131D9619DC1376E");
        assert_eq!(
            retail_mac(&k, b"Hello World !!!!").to_vec(),
            h("F09B856213BAB83B")
        );
    }

    /// Empty input is one zero block, as in BouncyCastle's
    /// `ISO9797Alg3Mac.doFinal`, which zero-fills the empty buffer and
    /// encrypts it. SELF-DERIVED value: pycryptodome DES-CBC over
    /// 0000000000000000, then D(K'), E(K).
    #[test]
    fn retail_empty_input_is_one_zero_block() {
        let k = key16("0123456789ABCDEFFEDCBA9876543210");
        assert_eq!(retail_mac(&k, b""), retail_mac(&k, &[0u8; 8]));
        assert_eq!(retail_mac(&k, b"").to_vec(), h("08D7B4FB629D0885"));
    }

    /// Reference retail MAC written straight on top of `des`, used to check
    /// the `retail-mac` crate for every length.
    fn retail_reference(key: &[u8; 16], data: &[u8]) -> [u8; 8] {
        let mut k1 = [0u8; 8];
        let mut k2 = [0u8; 8];
        k1.copy_from_slice(&key[..8]);
        k2.copy_from_slice(&key[8..]);
        let c1 = Des::new(&k1.into());
        let c2 = Des::new(&k2.into());
        let mut padded = data.to_vec();
        while padded.is_empty() || padded.len() % 8 != 0 {
            padded.push(0);
        }
        let mut state = [0u8; 8];
        for chunk in padded.chunks(8) {
            for (s, d) in state.iter_mut().zip(chunk) {
                *s ^= d;
            }
            c1.encrypt_block((&mut state).into());
        }
        c2.decrypt_block((&mut state).into());
        c1.encrypt_block((&mut state).into());
        state
    }

    proptest! {
        #[test]
        fn retail_matches_des_reference(
            key in proptest::array::uniform16(any::<u8>()),
            data in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            prop_assert_eq!(retail_mac(&key, &data), retail_reference(&key, &data));
        }

        /// Zero padding is implicit: adding zero bytes up to (or past) a
        /// block boundary does not change the UnionPay MAC.
        #[test]
        fn cup_zero_padding_is_implicit(
            key_bytes in proptest::collection::vec(any::<u8>(), 8..=8),
            data in proptest::collection::vec(any::<u8>(), 0..80),
            extra in 0usize..16,
        ) {
            let k = MacKey::new(&key_bytes).expect("8-byte key");
            let mut padded = data.clone();
            padded.resize(data.len() + extra, 0);
            prop_assert_eq!(cup_pos_mac(&k, &data), cup_pos_mac(&k, &padded));
        }

        #[test]
        fn cup_mac_is_uppercase_hex(
            key_bytes in proptest::collection::vec(any::<u8>(), 16..=16),
            data in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let k = MacKey::new(&key_bytes).expect("16-byte key");
            let mac = cup_pos_mac(&k, &data);
            prop_assert!(mac.iter().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')));
        }
    }

    // ---------------------------------------------------------------------
    // MacKey and verify
    // ---------------------------------------------------------------------

    #[test]
    fn key_rejects_bad_lengths() {
        for len in [0usize, 1, 7, 9, 15, 17, 23, 25, 32, 48] {
            let bytes = vec![0x11u8; len];
            assert_eq!(
                MacKey::new(&bytes).err(),
                Some(MacKeyError::InvalidLength(len)),
                "length {len}"
            );
            assert!(MacKey::try_from(bytes.as_slice()).is_err());
        }
        assert_eq!(
            MacKeyError::InvalidLength(7).to_string(),
            "MAC key must be 8, 16 or 24 bytes long, got 7 bytes"
        );
    }

    #[test]
    fn key_kinds() {
        for (len, kind) in [
            (8, MacKeyKind::SingleDes),
            (16, MacKeyKind::TdesTwoKey),
            (24, MacKeyKind::TdesThreeKey),
        ] {
            let k = MacKey::new(&vec![0x5au8; len]).expect("valid length");
            assert_eq!(k.kind(), kind);
            assert_eq!(kind.key_len(), len);
        }
    }

    #[test]
    fn key_debug_hides_key_bytes() {
        let k = key("0123456789ABCDEFFEDCBA9876543210");
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "MacKey(tdes-2key, ****)");
        assert!(!dbg.to_ascii_uppercase().contains("0123"));
        assert_eq!(
            format!("{:?}", key("0123456789ABCDEF")),
            "MacKey(des, ****)"
        );
        assert_eq!(
            format!(
                "{:?}",
                key("0123456789ABCDEFFEDCBA987654321089ABCDEF01234567")
            ),
            "MacKey(tdes-3key, ****)"
        );
    }

    #[test]
    fn verify_compares_whole_mac() {
        let k = key("2222222222222222");
        let mac = cup_pos_mac(&k, &h("1234567890ABCDEFABCDEF1234567890"));
        assert!(verify(&mac, b"E267B6E2"));
        assert!(!verify(&mac, b"E267B6E3"));
        assert!(!verify(&mac, b"F267B6E2"));
        assert!(!verify(&mac, b"E267B6E"));
        assert!(!verify(&mac, b"E267B6E2 "));
        assert!(!verify(&mac, b""));
    }
}
