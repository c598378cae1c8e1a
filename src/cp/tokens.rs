//! Credentials the control plane issues: user, host and capsule-traffic JWTs (HS256, told apart
//! by a `typ` claim) and random one-time tokens stored only as SHA-256 hashes. Tokens are signed with the
//! current JWT secret and accepted under it or any previous one (`cp.jwt_previous_secrets`), so
//! a rotation does not sign everyone out or take the fleet down.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::cp::channels::seal::SealKeys;
use crate::id::{HostId, SandboxId, TeamId, UserId};

pub const MIN_SECRET_BYTES: usize = 32;
pub const USER_TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
pub const HOST_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
pub const REFRESH_TOKEN_TTL: Duration = Duration::from_secs(60 * 24 * 3600);
pub const REGISTRATION_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the JWT secret (cp.jwt_secret / JWT_SECRET) must be at least {MIN_SECRET_BYTES} bytes; it is {0}")]
    SecretTooShort(usize),
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// The only value a user token's `typ` can hold, so a host token never decodes as a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserTokenType {
    #[serde(rename = "user")]
    User,
}

/// The only value a host token's `typ` can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostTokenType {
    #[serde(rename = "host")]
    Host,
}

/// The only value a traffic token's `typ` can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficTokenType {
    #[serde(rename = "traffic")]
    Traffic,
}

/// A capsule's traffic token: whoever holds it may reach that capsule's ports through the port
/// proxy (a browser, which cannot send `X-API-Key`), and nothing else.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficClaims {
    pub sub: SandboxId,
    pub typ: TrafficTokenType,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserClaims {
    pub sub: UserId,
    pub team_id: TeamId,
    pub email: String,
    pub name: String,
    pub is_admin: bool,
    pub typ: UserTokenType,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostClaims {
    pub sub: HostId,
    /// The refresh-token family the JWT was issued from: it is refused once that family is
    /// revoked, so reuse detection ends every credential of the family at once.
    #[serde(rename = "fam")]
    pub family: Uuid,
    pub typ: HostTokenType,
    pub iat: u64,
    pub exp: u64,
}

/// Signing material derived from `cp.jwt_secret`, and the verification keys of the secrets it
/// replaced.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    /// The current secret's first, then the previous ones.
    decoding: Vec<DecodingKey>,
    validation: Validation,
    /// Seals notification channels' settings; see [`SealKeys`].
    seal: SealKeys,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(<redacted>)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::SecretTooShort(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: vec![DecodingKey::from_secret(secret)],
            validation,
            seal: SealKeys::derive(secret, []),
        })
    }

    /// Also accepts tokens signed with `previous` secrets, during a rotation.
    pub fn with_previous<'a>(
        mut self,
        previous: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, TokenError> {
        for secret in previous {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(TokenError::SecretTooShort(secret.len()));
            }
            self.decoding.push(DecodingKey::from_secret(secret));
            self.seal.also_open_with(secret);
        }
        Ok(self)
    }

    pub fn seal_keys(&self) -> &SealKeys {
        &self.seal
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let mut refused = None;
        for key in &self.decoding {
            match jsonwebtoken::decode(token, key, &self.validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(refused
            .expect("there is always the current secret's key")
            .into())
    }

    fn sign<T: Serialize>(&self, claims: &T) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    pub fn issue_user(
        &self,
        user: UserId,
        team: TeamId,
        email: &str,
        name: &str,
        is_admin: bool,
    ) -> String {
        let iat = now_secs();
        self.sign(&UserClaims {
            sub: user,
            team_id: team,
            email: email.to_owned(),
            name: name.to_owned(),
            is_admin,
            typ: UserTokenType::User,
            iat,
            exp: iat + USER_TOKEN_TTL.as_secs(),
        })
    }

    pub fn verify_user(&self, token: &str) -> Result<UserClaims, TokenError> {
        self.decode(token)
    }

    pub fn issue_host(&self, host: HostId, family: Uuid) -> String {
        let iat = now_secs();
        self.sign(&HostClaims {
            sub: host,
            family,
            typ: HostTokenType::Host,
            iat,
            exp: iat + HOST_TOKEN_TTL.as_secs(),
        })
    }

    pub fn verify_host(&self, token: &str) -> Result<HostClaims, TokenError> {
        self.decode(token)
    }

    /// A traffic token for capsule `capsule`, valid for `ttl`; answers it and its expiry (Unix
    /// seconds).
    pub fn issue_traffic(&self, capsule: SandboxId, ttl: Duration) -> (String, u64) {
        let iat = now_secs();
        let exp = iat + ttl.as_secs();
        let token = self.sign(&TrafficClaims {
            sub: capsule,
            typ: TrafficTokenType::Traffic,
            iat,
            exp,
        });
        (token, exp)
    }

    pub fn verify_traffic(&self, token: &str) -> Result<TrafficClaims, TokenError> {
        self.decode(token)
    }

    /// Whether `token` carries a signature of the current or a previous secret, whatever its
    /// claims and however long ago it expired: such a token is Wrenn's, never a guest's.
    pub fn signed_here(&self, token: &str) -> bool {
        let mut any = Validation::new(Algorithm::HS256);
        any.validate_exp = false;
        any.required_spec_claims.clear();
        self.decoding
            .iter()
            .any(|key| jsonwebtoken::decode::<serde_json::Value>(token, key, &any).is_ok())
    }
}

/// `bytes` random bytes, hex-encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

pub fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_host_tokens_cannot_be_confused() {
        let keys = TokenKeys::new(&[7u8; 32]).unwrap();
        let host = keys.issue_host(HostId::new_random(), Uuid::new_v4());
        let user = keys.issue_user(UserId::new_random(), TeamId::PLATFORM, "a@b.c", "A", false);
        assert!(keys.verify_user(&host).is_err());
        assert!(keys.verify_host(&user).is_err());
        assert!(keys.verify_user(&user).is_ok());
        assert!(keys.verify_host(&host).is_ok());
        let capsule = SandboxId::new_random();
        let (traffic, _) = keys.issue_traffic(capsule, Duration::from_secs(60));
        assert!(keys.verify_user(&traffic).is_err());
        assert!(keys.verify_host(&traffic).is_err());
        assert!(keys.verify_traffic(&user).is_err());
        assert!(keys.verify_traffic(&host).is_err());
        assert_eq!(keys.verify_traffic(&traffic).unwrap().sub, capsule);
        let stranger = TokenKeys::new(&[9u8; 32]).unwrap();
        for token in [&host, &user, &traffic] {
            assert!(keys.signed_here(token));
            assert!(!stranger.signed_here(token));
        }
        assert!(!keys.signed_here("not.a.jwt"));
        let other = TokenKeys::new(&[8u8; 32]).unwrap();
        assert!(
            other.verify_user(&user).is_err(),
            "forged signature accepted"
        );
        assert!(matches!(
            TokenKeys::new(b"short"),
            Err(TokenError::SecretTooShort(5))
        ));
    }

    #[test]
    fn previous_secrets_verify_while_new_tokens_use_the_current_one() {
        let old = TokenKeys::new(&[1u8; 32]).unwrap();
        let user = old.issue_user(UserId::new_random(), TeamId::PLATFORM, "a@b.c", "A", false);
        let host = old.issue_host(HostId::new_random(), Uuid::new_v4());
        let rotated = TokenKeys::new(&[2u8; 32])
            .unwrap()
            .with_previous([&[1u8; 32][..]])
            .unwrap();
        assert!(rotated.verify_user(&user).is_ok());
        assert!(rotated.verify_host(&host).is_ok());
        let fresh = rotated.issue_user(UserId::new_random(), TeamId::PLATFORM, "a@b.c", "A", false);
        assert!(
            old.verify_user(&fresh).is_err(),
            "signed with the old secret"
        );
        let done = TokenKeys::new(&[2u8; 32]).unwrap();
        assert!(done.verify_user(&user).is_err());
        assert!(done.verify_user(&fresh).is_ok());
        assert!(matches!(
            TokenKeys::new(&[2u8; 32])
                .unwrap()
                .with_previous([&b"short"[..]]),
            Err(TokenError::SecretTooShort(5))
        ));
    }
}
