//! Verifying Kubernetes ServiceAccount tokens with the TokenReview API.
//!
//! The thin proxy presents its pod's projected token (audience
//! `mcp-broker`); the broker asks the API server who it is. Verdicts are
//! cached by the token's SHA-256 until the earlier of the token's own expiry
//! and the cache TTL, so the API server sees one call per token per TTL, not
//! one per request. Invariants: failure is closed (API unreachable, slow,
//! or an unexpected answer → the caller has no Kubernetes identity);
//! expired tokens are refused without a call; denials are cached for
//! [`DENIED_TTL`]; the cache is bounded; calls to the API server are
//! rate-limited ([`bucket`]): beyond the rate a token the cache does not
//! know gets no identity, with an error saying so (not cached).

mod bucket;

use super::KubeIdentity;
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::config::{
    DEFAULT_TOKEN_AUDIENCE as DEFAULT_AUDIENCE, DEFAULT_TOKEN_CACHE_TTL as DEFAULT_CACHE_TTL,
};
/// Longest wait for the API server.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Cached verdicts at most.
const MAX_CACHED: usize = 10_000;
/// How long a denied token is answered from the cache: a caller retrying a
/// bad token costs the API server one review per this, not one per request.
const DENIED_TTL: Duration = Duration::from_secs(30);

/// Why a token gives no identity.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("the token was rejected: {0}")]
    Denied(String),
    #[error("the token has expired")]
    Expired,
    #[error("cannot verify the token (TokenReview failed: {0}); failing closed")]
    Unavailable(String),
    #[error("cannot verify the token now: more than {0} TokenReview calls per second (token_review_rate); retry later")]
    RateLimited(u32),
}

/// A TokenReview client with a verdict cache.
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    bucket: bucket::Bucket,
    rate: u32,
}

/// A verdict (an identity or a denial) and until when it is reused.
type Cached = (Result<KubeIdentity, VerifyError>, Instant);

impl TokenReviewer {
    /// A reviewer using `client` for tokens minted for `audience`, calling
    /// the API server at most `rate` times a second (`burst` at once).
    pub fn new(
        client: kube::Client,
        audience: String,
        ttl: Duration,
        rate: u32,
        burst: u32,
    ) -> Self {
        Self {
            client,
            audience,
            ttl,
            cache: Mutex::new(HashMap::new()),
            bucket: bucket::Bucket::new(rate, burst),
            rate,
        }
    }

    /// Who `token` belongs to.
    pub async fn verify(&self, token: &str) -> Result<KubeIdentity, VerifyError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((verdict, until)) = self.cache.lock().expect("lock").get(&key) {
            if *until > now {
                return verdict.clone();
            }
        }
        let exp = jwt_expiry(token);
        let left = match exp {
            Some(exp) => {
                let now_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                if exp <= now_unix {
                    return Err(VerifyError::Expired);
                }
                (exp - now_unix).min(self.ttl)
            }
            None => self.ttl,
        };
        if !self.bucket.take(Instant::now()) {
            return Err(VerifyError::RateLimited(self.rate));
        }
        let verdict = self.review(token).await;
        let keep = match &verdict {
            Ok(_) => left,
            // Denials are cached briefly; an unavailable API server is not
            // an answer about the token.
            Err(VerifyError::Denied(_)) => left.min(DENIED_TTL),
            Err(_) => return verdict,
        };
        let mut cache = self.cache.lock().expect("lock");
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (verdict.clone(), now + keep));
        verdict
    }

    async fn review(&self, token: &str) -> Result<KubeIdentity, VerifyError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    VerifyError::Unavailable(format!("no answer within {REVIEW_TIMEOUT:?}"))
                })?
                .map_err(|e| VerifyError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(VerifyError::Denied(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        // The audience must be confirmed: a verdict without `audiences`
        // (an authenticator that ignored the requested audience) could be
        // a token minted for another service.
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|auds| auds.contains(&self.audience));
        if !audience_ok {
            return Err(VerifyError::Denied(format!(
                "the token review did not confirm audience {:?}",
                self.audience
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        parse_service_account(&user)
            .ok_or_else(|| VerifyError::Denied(format!("{user:?} is not a service account")))
    }
}

impl super::TokenVerifier for TokenReviewer {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<KubeIdentity, String>> + Send + 'a>,
    > {
        Box::pin(async move {
            TokenReviewer::verify(self, token)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// `system:serviceaccount:NS:NAME` → identity.
pub fn parse_service_account(username: &str) -> Option<KubeIdentity> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then(|| KubeIdentity {
        namespace: ns.to_string(),
        service_account: name.to_string(),
    })
}

/// The `exp` claim of a JWT, unverified (the API server verifies; this only
/// bounds how long a verdict is cached and skips calls for dead tokens).
pub fn jwt_expiry(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64().map(Duration::from_secs)
}

#[cfg(test)]
mod tests;
