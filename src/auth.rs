//! Who is calling, and what they may do: instance credentials (static tokens and JWTs, each bound
//! to the instance ids it may claim and the topic patterns it may read and ack) and API tokens
//! (`read`, `admin`).
//!
//! Static tokens are kept only as SHA-256 digests and compared in constant time. A presented
//! token, a JWT or a digest is never logged: only a credential's configured name is.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiScope, AuthConfig, ConfigError, InstanceToken, JwtConfig, Secret};
use crate::protocol::topic_matches;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a credential is required (Authorization: Bearer <token>)")]
    Missing,
    #[error("the credential is not valid")]
    Unknown,
    #[error("the token is not valid: {0}")]
    Jwt(String),
    #[error("this credential's scope is `{have}`; `{need}` is required")]
    Scope {
        have: &'static str,
        need: &'static str,
    },
}

impl AuthError {
    /// `true` when the caller is known but not allowed (403), `false` when unknown (401).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::Scope { .. })
    }
}

/// A pattern over instance ids: `*` stands for any run of characters, anything else is literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern(String);

impl IdPattern {
    pub fn new(pattern: impl Into<String>) -> IdPattern {
        IdPattern(pattern.into())
    }

    pub fn matches(&self, id: &str) -> bool {
        let mut parts = self.0.split('*');
        let Some(first) = parts.next() else {
            return id.is_empty();
        };
        let Some(mut rest) = id.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            // No `*` at all: the whole id must be the literal.
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What one instance connection may do, decided once at the upgrade.
#[derive(Debug, Clone)]
pub struct InstanceGrant {
    /// The credential's name (`token:NAME`, `jwt:SUB`, `client_token`, `anonymous`): shown in logs,
    /// and two connections for one instance id must present the same one.
    pub credential: String,
    pub instances: IdPattern,
    pub topics: Vec<String>,
    /// When the credential stops being valid (a JWT's `exp`, seconds since the epoch): the
    /// connection it opened is closed then.
    pub expires_at: Option<u64>,
}

impl InstanceGrant {
    pub fn anonymous() -> InstanceGrant {
        InstanceGrant {
            credential: "anonymous".into(),
            instances: IdPattern::new("*"),
            topics: vec!["*".into()],
            expires_at: None,
        }
    }

    pub fn may_claim(&self, instance: &str) -> bool {
        self.instances.matches(instance)
    }

    /// Whether every topic `pattern` can match is readable: `pattern` lies inside one allowed
    /// pattern (`shared/*` inside `*`, `shared/x/*` and `shared/x` inside `shared/*`).
    pub fn may_subscribe(&self, pattern: &str) -> bool {
        self.topics
            .iter()
            .any(|allowed| match pattern.strip_suffix("/*") {
                // A subtree is covered by the same subtree, or by a wildcard above its root.
                Some(root) => {
                    allowed == "*"
                        || allowed == pattern
                        || (allowed.ends_with("/*") && topic_matches(allowed, root))
                }
                None if pattern == "*" => allowed == "*",
                None => topic_matches(allowed, pattern),
            })
    }

    pub fn may_read(&self, topic: &str) -> bool {
        self.topics
            .iter()
            .any(|allowed| topic_matches(allowed, topic))
    }
}

struct StaticToken {
    digest: [u8; 32],
    grant: InstanceGrant,
}

struct ApiCredential {
    digest: [u8; 32],
    name: String,
    scope: ApiScope,
}

struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    topics_claim: String,
}

/// Checks presented credentials against the configured ones.
pub struct Authenticator {
    instance_tokens: Vec<StaticToken>,
    jwt: Option<JwtVerifier>,
    api_tokens: Vec<ApiCredential>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Authenticator {
    /// Builds the checker from validated configuration (digests and JWT keys already resolved).
    /// `client_token` is the older shared token for `/ws`, granting every id and topic.
    pub fn new(auth: &AuthConfig, client_token: Option<&Secret>) -> Result<Self, ConfigError> {
        let mut instance_tokens: Vec<StaticToken> = auth
            .instance_tokens
            .iter()
            .filter_map(|t| {
                Some(StaticToken {
                    digest: t.digest?,
                    grant: InstanceGrant {
                        credential: format!("token:{}", t.name),
                        instances: IdPattern::new(t.instances.clone()),
                        topics: t.topics.clone(),
                        expires_at: None,
                    },
                })
            })
            .collect();
        if let Some(token) = client_token {
            instance_tokens.push(StaticToken {
                digest: sha256(token.expose()),
                grant: InstanceGrant {
                    credential: "client_token".into(),
                    ..InstanceGrant::anonymous()
                },
            });
        }
        let api_tokens = auth
            .api_tokens
            .iter()
            .filter_map(|t| {
                Some(ApiCredential {
                    digest: t.digest?,
                    name: t.name.clone(),
                    scope: t.scope,
                })
            })
            .collect();
        let jwt = auth.jwt.as_ref().map(jwt_verifier).transpose()?;
        Ok(Authenticator {
            instance_tokens,
            jwt,
            api_tokens,
        })
    }

    /// Whether `/ws` needs a credential at all.
    pub fn instances_need_credentials(&self) -> bool {
        !self.instance_tokens.is_empty() || self.jwt.is_some()
    }

    /// Whether the API needs a credential at all.
    pub fn api_needs_credentials(&self) -> bool {
        !self.api_tokens.is_empty()
    }

    /// The grant of an instance connection presenting `token` (`None`: nothing presented).
    pub fn instance(&self, token: Option<&str>) -> Result<InstanceGrant, AuthError> {
        if !self.instances_need_credentials() {
            return Ok(InstanceGrant::anonymous());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let digest = sha256(token.as_bytes());
        // Every configured token is compared, so the time taken does not say which one matched.
        let mut found = None;
        for t in &self.instance_tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t.grant.clone());
            }
        }
        if let Some(grant) = found {
            return Ok(grant);
        }
        match &self.jwt {
            Some(jwt) if token.split('.').count() == 3 => jwt.verify(token),
            _ => Err(AuthError::Unknown),
        }
    }

    /// Checks an API caller presenting `token` for `need`; returns the credential's name.
    pub fn api(&self, token: Option<&str>, need: ApiScope) -> Result<String, AuthError> {
        if !self.api_needs_credentials() {
            return Ok("anonymous".into());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let digest = sha256(token.as_bytes());
        let mut found = None;
        for t in &self.api_tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t);
            }
        }
        let t = found.ok_or(AuthError::Unknown)?;
        if t.scope < need {
            return Err(AuthError::Scope {
                have: t.scope.as_str(),
                need: need.as_str(),
            });
        }
        Ok(t.name.clone())
    }
}

fn jwt_verifier(config: &JwtConfig) -> Result<JwtVerifier, ConfigError> {
    let key_err = |k: &str, e: jsonwebtoken::errors::Error| ConfigError::Key {
        key: format!("auth.jwt.{k}"),
        message: format!("not a usable key: {e}"),
    };
    let material = config.key.as_ref().ok_or_else(|| ConfigError::Key {
        key: "auth.jwt".into(),
        message: "give one of hs256_secret_env, hs256_secret_file, rs256_public_key_file, eddsa_public_key_file".into(),
    })?;
    let (key, algorithm) = if config.rs256_public_key_file.is_some() {
        (
            DecodingKey::from_rsa_pem(material.expose())
                .map_err(|e| key_err("rs256_public_key_file", e))?,
            Algorithm::RS256,
        )
    } else if config.eddsa_public_key_file.is_some() {
        (
            DecodingKey::from_ed_pem(material.expose())
                .map_err(|e| key_err("eddsa_public_key_file", e))?,
            Algorithm::EdDSA,
        )
    } else {
        (
            DecodingKey::from_secret(material.expose())
                .map_err(|e| key_err("hs256_secret_env", e))?,
            Algorithm::HS256,
        )
    };
    // One algorithm, fixed here: a token cannot choose how it is checked.
    let mut validation = Validation::new(algorithm);
    validation.leeway = config.leeway_secs;
    validation.validate_nbf = true;
    // A configured issuer or audience must also be present: a token without the claim is refused.
    let mut required = vec!["exp", "sub"];
    match &config.audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    if let Some(iss) = &config.issuer {
        validation.set_issuer(&[iss]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    Ok(JwtVerifier {
        key,
        validation,
        topics_claim: config.topics_claim.clone(),
    })
}

impl JwtVerifier {
    fn verify(&self, token: &str) -> Result<InstanceGrant, AuthError> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| AuthError::Jwt(e.to_string()))?;
        let claims = data.claims;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Jwt("`sub` must be a non-empty string".into()))?;
        let topics = match claims.get(&self.topics_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>(),
            _ => None,
        }
        .filter(|t| {
            !t.is_empty()
                && t.iter()
                    .all(|p| crate::protocol::validate_pattern(p).is_ok())
        })
        .ok_or_else(|| {
            AuthError::Jwt(format!(
                "claim `{}` must be a non-empty list of topic patterns",
                self.topics_claim
            ))
        })?;
        Ok(InstanceGrant {
            credential: format!("jwt:{sub}"),
            instances: IdPattern::new(sub),
            topics,
            // Leeway included: the connection lives exactly as long as the token is accepted.
            expires_at: claims
                .get("exp")
                .and_then(serde_json::Value::as_u64)
                .map(|exp| exp.saturating_add(self.validation.leeway)),
        })
    }
}

/// Resolves one static credential given as a digest, an environment variable or a file into its
/// SHA-256 digest. `key` names the config entry in errors.
pub fn resolve_digest(
    key: &str,
    sha256_hex: Option<&str>,
    env: Option<&str>,
    file: Option<&Path>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<[u8; 32], ConfigError> {
    let err = |k: &str, m: String| ConfigError::Key {
        key: format!("{key}.{k}"),
        message: m,
    };
    match (sha256_hex, env, file) {
        (Some(hex_digest), None, None) => {
            let bytes = hex::decode(hex_digest.trim())
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| {
                    err(
                        "token_sha256",
                        "must be 64 hex digits (sha256sum of the token)".into(),
                    )
                })?;
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&bytes);
            Ok(digest)
        }
        (None, Some(var), None) => {
            let value = lookup(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                err(
                    "token_env",
                    format!("environment variable {var} is not set or empty"),
                )
            })?;
            Ok(sha256(value.as_bytes()))
        }
        (None, None, Some(path)) => {
            let token = crate::config::read_secret_file(path).map_err(|m| err("token_file", m))?;
            Ok(sha256(token.expose()))
        }
        _ => Err(ConfigError::Key {
            key: key.to_string(),
            message: "give exactly one of token_sha256, token_env, token_file".into(),
        }),
    }
}

/// Checks an instance token entry's patterns.
pub fn check_instance_token(key: &str, token: &InstanceToken) -> Result<(), ConfigError> {
    if token.instances.is_empty() {
        return Err(ConfigError::Key {
            key: format!("{key}.instances"),
            message: "must not be empty (use \"*\" for any instance)".into(),
        });
    }
    if token.topics.is_empty() {
        return Err(ConfigError::Key {
            key: format!("{key}.topics"),
            message: "must list at least one topic pattern".into(),
        });
    }
    for (j, p) in token.topics.iter().enumerate() {
        crate::protocol::validate_pattern(p).map_err(|m| ConfigError::Key {
            key: format!("{key}.topics[{j}]"),
            message: m,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_patterns_match_like_globs() {
        let p = IdPattern::new("payments-*");
        assert!(p.matches("payments-1"));
        assert!(p.matches("payments-"));
        assert!(!p.matches("payment-1"));
        assert!(!p.matches("xpayments-1"));
        assert!(IdPattern::new("*").matches("anything"));
        assert!(IdPattern::new("web-01").matches("web-01"));
        assert!(!IdPattern::new("web-01").matches("web-012"));
        assert!(IdPattern::new("a*b*c").matches("a-x-b-y-c"));
        assert!(!IdPattern::new("a*b*c").matches("a-x-c"));
        assert!(IdPattern::new("*-eu").matches("api-eu"));
        assert!(!IdPattern::new("*-eu").matches("api-us"));
        assert!(!IdPattern::new("ab*ba").matches("aba"));
    }

    #[test]
    fn a_subscription_must_lie_inside_an_allowed_pattern() {
        let g = InstanceGrant {
            credential: "t".into(),
            instances: IdPattern::new("*"),
            topics: vec!["payments".into(), "shared/*".into()],
            expires_at: None,
        };
        assert!(g.may_subscribe("payments"));
        assert!(g.may_subscribe("shared/*"));
        assert!(g.may_subscribe("shared/db"));
        assert!(g.may_subscribe("shared/db/*"));
        assert!(!g.may_subscribe("*"));
        assert!(!g.may_subscribe("shared"));
        assert!(!g.may_subscribe("payments/*"));
        assert!(!g.may_subscribe("billing"));
        assert!(g.may_read("shared/db"));
        assert!(!g.may_read("billing"));
        assert!(InstanceGrant::anonymous().may_subscribe("*"));
    }

    fn auth_with(tokens: Vec<InstanceToken>) -> Authenticator {
        let config = AuthConfig {
            instance_tokens: tokens,
            ..Default::default()
        };
        Authenticator::new(&config, None).expect("authenticator")
    }

    #[test]
    fn static_tokens_are_matched_by_digest() {
        let token = InstanceToken {
            name: "payments".into(),
            token_sha256: None,
            token_env: None,
            token_file: None,
            instances: "payments-*".into(),
            topics: vec!["payments".into()],
            digest: Some(sha256(b"s3cret-token-value")),
        };
        let auth = auth_with(vec![token]);
        let grant = auth.instance(Some("s3cret-token-value")).expect("grant");
        assert_eq!(grant.credential, "token:payments");
        assert!(grant.may_claim("payments-7") && !grant.may_claim("billing-1"));
        assert_eq!(auth.instance(Some("wrong")).err(), Some(AuthError::Unknown));
        assert_eq!(auth.instance(None).err(), Some(AuthError::Missing));
        assert!(
            auth_with(vec![]).instance(None).is_ok(),
            "no credentials configured: open"
        );
    }

    #[test]
    fn digests_come_from_hex_env_or_file() {
        let hexed = hex::encode(sha256(b"abc"));
        let none = |_: &str| None;
        assert_eq!(
            resolve_digest("k", Some(&hexed), None, None, &none).expect("hex"),
            sha256(b"abc")
        );
        let env = |_: &str| Some("abc".to_string());
        assert_eq!(
            resolve_digest("k", None, Some("V"), None, &env).expect("env"),
            sha256(b"abc")
        );
        assert!(resolve_digest("k", Some("zz"), None, None, &none).is_err());
        assert!(resolve_digest("k", None, None, None, &none).is_err());
        assert!(resolve_digest("k", Some(&hexed), Some("V"), None, &env).is_err());
    }
}
