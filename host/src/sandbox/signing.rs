//! Module signatures (ed25519). A signed module carries its signature in a
//! custom section named [`SECTION`] at its very end — the signature covers
//! every byte before that section, so signing changes nothing else and a
//! signed file is still a valid component — or beside it, in a detached
//! `FILE.wasm.sig` covering the whole file. Either holds one line of JSON:
//! `{"algorithm":"ed25519","key_id":"…","signature":"…"}`. What is signed
//! is `orchestrix-module-v1:` followed by the SHA-256 of the covered bytes.
//!
//! Keys are text files of one line: `orchestrix-ed25519-secret BASE64`
//! (the 32-byte seed; keep it secret) and `orchestrix-ed25519-public
//! BASE64`. A key's id is the first 8 bytes of the SHA-256 of its public
//! key, in hex. With `--trusted-keys DIR`, the host loads only modules whose
//! signature verifies against one of the `*.pub` files in `DIR`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The custom section holding an embedded signature.
pub const SECTION: &str = "orchestrix-signature";
const SECRET_TAG: &str = "orchestrix-ed25519-secret";
const PUBLIC_TAG: &str = "orchestrix-ed25519-public";
const DOMAIN: &[u8] = b"orchestrix-module-v1:";

/// A signature, as embedded or detached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub algorithm: String,
    pub key_id: String,
    pub signature: String,
}

/// A secret signing key.
pub struct SecretKey {
    pair: Ed25519KeyPair,
}

/// A new key pair: the secret key file's text and the public key file's.
pub fn generate() -> Result<(String, String), String> {
    let mut seed = [0u8; 32];
    SystemRandom::new().fill(&mut seed).map_err(|_| "the system's random source failed".to_owned())?;
    let key = SecretKey::from_seed(&seed)?;
    Ok((format!("{SECRET_TAG} {}\n", STANDARD.encode(seed)), key.public_text()))
}

impl SecretKey {
    fn from_seed(seed: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| "not an ed25519 seed".to_owned())?;
        Ok(Self { pair })
    }

    /// A secret key file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let seed = tagged(text, SECRET_TAG)?;
        Self::from_seed(&seed)
    }

    /// The public key file's text of this key.
    pub fn public_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", STANDARD.encode(self.pair.public_key().as_ref()))
    }

    fn sign_bytes(&self, covered: &[u8]) -> Signature {
        let signature = self.pair.sign(&message(covered));
        Signature {
            algorithm: "ed25519".into(),
            key_id: key_id(self.pair.public_key().as_ref()),
            signature: STANDARD.encode(signature.as_ref()),
        }
    }

    /// `wasm` with its signature embedded (replacing one it had).
    pub fn sign_embedded(&self, wasm: &[u8]) -> Result<Vec<u8>, String> {
        let covered = match split_signature(wasm)? {
            Some((covered, _)) => covered,
            None => wasm,
        };
        let signature = serde_json::to_vec(&self.sign_bytes(covered)).expect("a signature is JSON");
        let mut signed = covered.to_vec();
        append_custom_section(&mut signed, SECTION, &signature);
        Ok(signed)
    }

    /// The text of a detached signature (`FILE.wasm.sig`) of `wasm`.
    pub fn sign_detached(&self, wasm: &[u8]) -> String {
        serde_json::to_string(&self.sign_bytes(wasm)).expect("a signature is JSON") + "\n"
    }
}

fn message(covered: &[u8]) -> Vec<u8> {
    [DOMAIN, Sha256::digest(covered).as_slice()].concat()
}

fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

fn tagged(text: &str, tag: &str) -> Result<Vec<u8>, String> {
    let (found, value) = text.trim().split_once(' ').ok_or_else(|| format!("expected `{tag} BASE64`"))?;
    if found != tag {
        return Err(format!("expected `{tag} BASE64`, found `{found} …`"));
    }
    let bytes = STANDARD.decode(value.trim()).map_err(|e| format!("the key is not base64: {e}"))?;
    if bytes.len() != 32 {
        return Err(format!("an ed25519 key is 32 bytes, this one {}", bytes.len()));
    }
    Ok(bytes)
}

/// The public keys a host trusts.
#[derive(Debug, Default)]
pub struct TrustedKeys {
    /// (file name, key id, public key)
    keys: Vec<(String, String, Vec<u8>)>,
}

impl TrustedKeys {
    /// Every `*.pub` file of `dir` (at least one).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let mut keys = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "pub") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let public = tagged(&text, PUBLIC_TAG).map_err(|e| format!("{}: {e}", path.display()))?;
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            keys.push((name, key_id(&public), public));
        }
        if keys.is_empty() {
            return Err(format!("{} holds no public key (*.pub)", dir.display()));
        }
        keys.sort();
        Ok(Self { keys })
    }

    /// The names of the keys.
    pub fn names(&self) -> Vec<&str> {
        self.keys.iter().map(|(name, ..)| name.as_str()).collect()
    }

    /// The name of the trusted key that signed `wasm` (its embedded
    /// signature, else `detached`), or why none did.
    pub fn verify(&self, wasm: &[u8], detached: Option<&[u8]>) -> Result<String, String> {
        let (covered, signature) = match (split_signature(wasm)?, detached) {
            (Some((covered, embedded)), _) => (covered, embedded.to_vec()),
            (None, Some(detached)) => (wasm, detached.to_vec()),
            (None, None) => {
                return Err("unsigned: the host loads only signed modules (--trusted-keys); sign it with \
                            `orchestrix sign FILE.wasm --key KEY`"
                    .into());
            }
        };
        let signature: Signature =
            serde_json::from_slice(&signature).map_err(|e| format!("the signature is unreadable: {e}"))?;
        if signature.algorithm != "ed25519" {
            return Err(format!("signature algorithm `{}` is not ed25519", signature.algorithm));
        }
        let Some((name, _, public)) = self.keys.iter().find(|(_, id, _)| *id == signature.key_id) else {
            return Err(format!(
                "signed by an unknown key {} (trusted: {})",
                signature.key_id,
                self.names().join(", ")
            ));
        };
        let bytes = STANDARD.decode(&signature.signature).map_err(|e| format!("the signature is not base64: {e}"))?;
        signature::UnparsedPublicKey::new(&signature::ED25519, public).verify(&message(covered), &bytes).map_err(
            |_| format!("the signature by key `{name}` does not match the module: it was changed after signing"),
        )?;
        Ok(name.clone())
    }
}

/// What an embedded signature covers (the bytes before its section), and
/// the signature section's payload.
type Embedded<'a> = (&'a [u8], &'a [u8]);

/// A wasm binary split at its trailing signature section, when its last
/// section is one.
fn split_signature(wasm: &[u8]) -> Result<Option<Embedded<'_>>, String> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err("not a WebAssembly binary".into());
    }
    let mut offset = 8;
    let mut last: Option<(usize, usize, usize)> = None; // (start, payload start, end)
    while offset < wasm.len() {
        let start = offset;
        let id = wasm[offset];
        offset += 1;
        let size = read_leb(wasm, &mut offset)? as usize;
        let end = offset.checked_add(size).filter(|end| *end <= wasm.len()).ok_or("a section runs past the end")?;
        last = (id == 0).then_some((start, offset, end));
        offset = end;
    }
    let Some((start, payload, end)) = last else { return Ok(None) };
    let mut at = payload;
    let name_len = read_leb(wasm, &mut at)? as usize;
    let name = wasm.get(at..at + name_len).ok_or("a custom section's name runs past its end")?;
    if name != SECTION.as_bytes() {
        return Ok(None);
    }
    Ok(Some((&wasm[..start], &wasm[at + name_len..end])))
}

fn read_leb(bytes: &[u8], offset: &mut usize) -> Result<u32, String> {
    let mut value: u32 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(*offset).ok_or("a section size runs past the end")?;
        *offset += 1;
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a section size is not a valid LEB128".into())
}

fn write_leb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn append_custom_section(wasm: &mut Vec<u8>, name: &str, payload: &[u8]) {
    let mut body = Vec::with_capacity(name.len() + payload.len() + 5);
    write_leb(&mut body, name.len());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    wasm.push(0);
    write_leb(wasm, body.len());
    wasm.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component header and one custom section.
    fn tiny() -> Vec<u8> {
        let mut wasm = b"\0asm\x0d\0\x01\0".to_vec();
        append_custom_section(&mut wasm, "name", b"x");
        wasm
    }

    fn trusted(public: &str) -> TrustedKeys {
        let dir = std::env::temp_dir().join(format!("orchestrix-keys-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("team.pub"), public).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a key").unwrap();
        let keys = TrustedKeys::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        keys
    }

    #[test]
    fn embedded_and_detached_signatures_verify_and_tampering_is_caught() {
        let (secret, public) = generate().unwrap();
        let key = SecretKey::parse(&secret).unwrap();
        let keys = trusted(&public);
        let wasm = tiny();
        let signed = key.sign_embedded(&wasm).unwrap();
        assert_eq!(&signed[..wasm.len()], &wasm[..], "signing only appends");
        assert_eq!(keys.verify(&signed, None).unwrap(), "team");
        assert_eq!(key.sign_embedded(&signed).unwrap(), signed, "re-signing replaces the signature");
        let detached = key.sign_detached(&wasm);
        assert_eq!(keys.verify(&wasm, Some(detached.as_bytes())).unwrap(), "team");

        let mut tampered = signed.clone();
        tampered[wasm.len() - 1] ^= 1; // the name section's payload
        assert!(keys.verify(&tampered, None).unwrap_err().contains("changed after signing"));
        assert!(keys.verify(&wasm, None).unwrap_err().contains("unsigned"));
        let (_, stranger) = generate().unwrap();
        assert!(trusted(&stranger).verify(&signed, None).unwrap_err().contains("unknown key"));
    }

    #[test]
    fn keys_parse_only_from_their_own_files() {
        let (secret, public) = generate().unwrap();
        assert!(SecretKey::parse(&public).is_err());
        assert!(SecretKey::parse("orchestrix-ed25519-secret AAAA").is_err());
        assert_eq!(SecretKey::parse(&secret).unwrap().public_text(), public);
    }
}
