//! Channel settings at rest: sealed with AES-256-GCM under a key derived from the JWT secret,
//! which every replica already shares, so there is no other secret to distribute. Settings
//! sealed under a secret that has since been rotated into `cp.jwt_previous_secrets` still open.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

const NONCE_BYTES: usize = 12;
/// Separates this key from every other use of the JWT secret.
const DERIVATION_LABEL: &[u8] = b"wrenn channel settings v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the channel's settings do not open with the current or any previous JWT secret; set them again with PUT /v1/channels/{{id}}/config")]
    Unreadable,
}

/// The current key first, then those of previous secrets.
#[derive(Clone)]
pub struct SealKeys(Vec<Aes256Gcm>);

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKeys(<redacted>)")
    }
}

fn derive(secret: &[u8]) -> Aes256Gcm {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(DERIVATION_LABEL);
    let key = mac.finalize().into_bytes();
    Aes256Gcm::new_from_slice(&key).expect("HMAC-SHA256 makes 32-byte keys")
}

impl SealKeys {
    pub fn derive<'a>(current: &'a [u8], previous: impl IntoIterator<Item = &'a [u8]>) -> Self {
        Self(
            std::iter::once(current)
                .chain(previous)
                .map(derive)
                .collect(),
        )
    }

    /// Also opens what `previous` (a secret rotated out) sealed.
    pub fn also_open_with(&mut self, previous: &[u8]) {
        self.0.push(derive(previous));
    }

    /// Seals `plain` for channel `channel` (bound as associated data, so one channel's sealed
    /// settings cannot be moved onto another's row).
    pub fn seal(&self, channel: Uuid, plain: &[u8]) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self.0[0]
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: channel.as_bytes(),
                },
            )
            .expect("AES-GCM seals any message shorter than 64 GiB");
        [&nonce[..], &sealed].concat()
    }

    pub fn open(&self, channel: Uuid, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_BYTES {
            return Err(SealError::Unreadable);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let nonce = Nonce::from(<[u8; NONCE_BYTES]>::try_from(nonce).expect("split at its length"));
        self.0
            .iter()
            .find_map(|key| {
                key.decrypt(
                    &nonce,
                    Payload {
                        msg: body,
                        aad: channel.as_bytes(),
                    },
                )
                .ok()
            })
            .ok_or(SealError::Unreadable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_settings_open_only_for_their_channel_and_survive_a_rotation() {
        let old = SealKeys::derive(&[1; 32], []);
        let channel = Uuid::new_v4();
        let sealed = old.seal(channel, b"{\"url\":\"x\"}");
        assert!(!sealed.windows(3).any(|w| w == b"url"), "stored in clear");
        assert_eq!(old.open(channel, &sealed).unwrap(), b"{\"url\":\"x\"}");
        assert_eq!(
            old.open(Uuid::new_v4(), &sealed),
            Err(SealError::Unreadable)
        );

        let rotated = SealKeys::derive(&[2; 32], [&[1u8; 32][..]]);
        assert_eq!(rotated.open(channel, &sealed).unwrap(), b"{\"url\":\"x\"}");
        let stranger = SealKeys::derive(&[3; 32], []);
        assert_eq!(stranger.open(channel, &sealed), Err(SealError::Unreadable));
        assert_eq!(stranger.open(channel, b"short"), Err(SealError::Unreadable));

        let mut tampered = rotated.seal(channel, b"abc");
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(rotated.open(channel, &tampered), Err(SealError::Unreadable));
    }
}
