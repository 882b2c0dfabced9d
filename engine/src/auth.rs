//! Identity: who a connection is (from a connection token, or from the
//! embedder), what it may subscribe to and publish to, and the server's
//! API key. See docs/security.md.
//!
//! Tokens are JWTs verified with `jsonwebtoken` (its pure-Rust backend);
//! the configured keys decide which algorithms are accepted. A token is
//! never logged, and never part of an error message.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;

/// A channel pattern of a grant: a channel name, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    prefix: bool,
}

impl Pattern {
    fn new(p: &str) -> Pattern {
        match p.strip_suffix('*') {
            Some(prefix) => Pattern { text: prefix.to_string(), prefix: true },
            None => Pattern { text: p.to_string(), prefix: false },
        }
    }

    fn matches(&self, channel: &str) -> bool {
        if self.prefix {
            channel.starts_with(&self.text)
        } else {
            channel == self.text
        }
    }
}

/// Who a connection is and what it may do: a user id and the channel
/// patterns it may subscribe and publish to. Made from a verified
/// connection token, or by an embedder that authenticated the user itself
/// (put it in the request's extensions before Herald's service sees the
/// request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    user: Arc<str>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    /// The token's expiry, Unix seconds (none for an embedder's identity).
    expires_at: Option<u64>,
}

impl Identity {
    /// User `user`, granted nothing yet but its own user channel.
    pub fn new(user: impl Into<String>) -> Identity {
        Identity { user: Arc::from(user.into()), subscribe: Vec::new(), publish: Vec::new(), expires_at: None }
    }

    /// Adds channel patterns (`news`, `chat:*`, `*`) the user may subscribe to.
    pub fn subscribe<S: AsRef<str>>(mut self, patterns: impl IntoIterator<Item = S>) -> Identity {
        self.subscribe.extend(patterns.into_iter().map(|p| Pattern::new(p.as_ref())));
        self
    }

    /// Adds channel patterns the user may publish to.
    pub fn publish<S: AsRef<str>>(mut self, patterns: impl IntoIterator<Item = S>) -> Identity {
        self.publish.extend(patterns.into_iter().map(|p| Pattern::new(p.as_ref())));
        self
    }

    /// Ends the identity's validity at `exp` (Unix seconds): the
    /// connection is closed then (4001) unless refreshed.
    pub fn expiring_at(mut self, exp: u64) -> Identity {
        self.expires_at = Some(exp);
        self
    }

    /// The user id.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// When the token expires (Unix seconds), if it came from one.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// Whether the user may subscribe to (and read the history of)
    /// `channel`. A user channel `user:<id>` is its user's only.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        match channel.strip_prefix("user:") {
            Some(id) => id == &*self.user,
            None => self.subscribe.iter().any(|p| p.matches(channel)),
        }
    }

    /// Whether the user may publish to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish.iter().any(|p| p.matches(channel))
    }
}

/// What a token carries.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Why a token was refused (never quoting the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than `max_token_bytes`.
    #[error("the token is longer than {0} bytes")]
    TooLong(usize),
    /// Its `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// Its header names an algorithm no configured key verifies.
    #[error("the token's algorithm {0} is not accepted by this server's keys")]
    Algorithm(String),
    /// Its `sub` is not a user id.
    #[error("the token's sub is not a user id (1 to 128 characters of the channel alphabet, no ':')")]
    BadSubject,
    /// Not a JWT, or its claims are missing or of the wrong type.
    #[error("{0}")]
    Malformed(String),
    /// The signature does not verify with the configured key.
    #[error("bad signature")]
    BadSignature,
    /// Well signed, but `nbf`, `aud` or `iss` says no.
    #[error("{0}")]
    Rejected(String),
}

impl TokenError {
    /// Labels of `herald_auth_total{result}`, by index.
    pub(crate) const RESULTS: [&'static str; 7] = ["ok", "missing", "malformed", "bad_signature", "wrong_algorithm", "expired", "rejected"];

    /// Indices in [`TokenError::RESULTS`] of the results that are not a
    /// refused token's own.
    pub(crate) const OK: usize = 0;
    pub(crate) const MISSING: usize = 1;
    pub(crate) const EXPIRED: usize = 5;
    pub(crate) const REJECTED: usize = 6;

    /// This refusal's index in [`TokenError::RESULTS`].
    pub(crate) fn result(&self) -> usize {
        match self {
            TokenError::TooLong(_) | TokenError::BadSubject | TokenError::Malformed(_) => 2,
            TokenError::BadSignature => 3,
            TokenError::Algorithm(_) => 4,
            TokenError::Expired => TokenError::EXPIRED,
            TokenError::Rejected(_) => TokenError::REJECTED,
        }
    }
}

/// The server's token verifier.
pub(crate) struct Auth {
    hmac: Option<DecodingKey>,
    public: Option<(DecodingKey, Vec<Algorithm>)>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_s: u64,
    max_token_bytes: usize,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("hmac", &self.hmac.is_some()).field("public", &self.public.as_ref().map(|p| &p.1)).finish()
    }
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `public_key_file` cannot be read.
    #[error("cannot read public_key_file {path:?}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a PEM public key of a kind Herald verifies with.
    #[error("public_key_file {0:?} is not a PEM RSA, EC (P-256, P-384) or Ed25519 public key")]
    NotAKey(String),
}

impl Auth {
    pub(crate) fn from_config(c: &AuthConfig) -> Result<Auth, KeyError> {
        let hmac = c.hmac_secret.as_ref().map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        let public = match &c.public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
                use Algorithm::*;
                let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    (k, vec![RS256, RS384, RS512, PS256, PS384, PS512])
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    (k, vec![ES256, ES384])
                } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                    (k, vec![EdDSA])
                } else {
                    return Err(KeyError::NotAKey(path.clone()));
                };
                Some(key)
            }
        };
        Ok(Auth {
            hmac,
            public,
            audience: c.audience.clone(),
            issuer: c.issuer.clone(),
            leeway_s: c.leeway_s,
            max_token_bytes: c.max_token_bytes,
        })
    }

    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub(crate) fn leeway_s(&self) -> u64 {
        self.leeway_s
    }

    /// Verifies a connection token and returns the identity it carries.
    pub(crate) fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLong(self.max_token_bytes));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(format!("not a JWT: {e}")))?;
        let alg = header.alg;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let key = match (&self.hmac, &self.public) {
            (Some(k), _) if hmac => k,
            (_, Some((k, algs))) if algs.contains(&alg) => k,
            _ => return Err(TokenError::Algorithm(format!("{alg:?}"))),
        };
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_s;
        v.validate_nbf = true;
        // A configured audience or issuer must be in the token, not only
        // match when present.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(a) => {
                v.set_audience(&[a]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::InvalidSignature => TokenError::BadSignature,
                K::ImmatureSignature | K::InvalidAudience | K::InvalidIssuer => TokenError::Rejected(e.to_string()),
                _ => TokenError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        if !valid_user(&c.sub) {
            return Err(TokenError::BadSubject);
        }
        let mut identity = Identity::new(c.sub).subscribe(&c.subscribe).publish(&c.publish);
        identity.expires_at = Some(c.exp);
        Ok(identity)
    }
}

/// Whether `user` may be a user id: 1 to 128 bytes of the channel
/// alphabet without `:`, so that `user:<id>` is a channel name.
pub(crate) fn valid_user(user: &str) -> bool {
    (1..=128).contains(&user.len()) && !user.contains(':') && crate::proto::channel::validate(user).is_ok()
}

/// Now, in Unix seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Compares two secrets in time that does not depend on where they differ.
pub(crate) fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// A secret in the configuration: never printed by `Debug`, and written
/// as `"<redacted>"` when the configuration is printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret from its text.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, to compare or to key with.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_grant_names_and_prefixes_and_user_channels_are_their_users() {
        let id = Identity::new("42").subscribe(["news", "chat:*"]).publish(["chat:room-1"]);
        assert!(id.may_subscribe("news") && !id.may_subscribe("news2"));
        assert!(id.may_subscribe("chat:x") && !id.may_subscribe("chatx"));
        assert!(id.may_subscribe("user:42") && !id.may_subscribe("user:43"));
        assert!(!Identity::new("7").subscribe(["*"]).may_subscribe("user:42"), "a grant of * does not reach another user's channel");
        assert!(id.may_publish("chat:room-1") && !id.may_publish("chat:room-2") && !id.may_publish("user:42"));
    }

    #[test]
    fn secrets_compare_whole_and_never_print() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd") && !secrets_equal(b"abc", b"abcd"));
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
    }
}
