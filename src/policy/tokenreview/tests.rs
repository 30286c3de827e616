//! TokenReview against a mock API server (`tower_test`), as kube-rs
//! recommends: allowed, denied, expired, wrong audience, API down.

use super::*;
use http::{Request, Response};
use kube::client::Body;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn jwt(exp_in: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.sig",
        b64(json!({"alg":"RS256"})),
        b64(json!({"exp": now + exp_in}))
    )
}

/// A reviewer whose API server answers every TokenReview with `answer`
/// (or fails the request when `None`, like an unreachable server).
fn reviewer(answer: Option<serde_json::Value>) -> (TokenReviewer, Arc<AtomicUsize>) {
    reviewer_limited(answer, 1000, 1000)
}

/// [`reviewer`] calling the API server at most `rate`/s, `burst` at once.
fn reviewer_limited(
    answer: Option<serde_json::Value>,
    rate: u32,
    burst: u32,
) -> (TokenReviewer, Arc<AtomicUsize>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            seen.fetch_add(1, Ordering::SeqCst);
            assert_eq!(req.method(), http::Method::POST);
            assert_eq!(
                req.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = req.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent["spec"]["audiences"], json!(["mcp-broker"]));
            match &answer {
                Some(a) => {
                    let mut a = a.clone();
                    a["spec"] = sent["spec"].clone();
                    send.send_response(
                        Response::builder()
                            .body(Body::from(a.to_string().into_bytes()))
                            .unwrap(),
                    );
                }
                None => send.send_error(std::io::Error::other("connection refused")),
            }
        }
    });
    let client = kube::Client::new(svc, "default");
    (
        TokenReviewer::new(
            client,
            DEFAULT_AUDIENCE.into(),
            DEFAULT_CACHE_TTL,
            rate,
            burst,
        ),
        calls,
    )
}

fn review(authenticated: bool, user: &str, audiences: &[&str]) -> serde_json::Value {
    json!({"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","metadata":{},
        "status":{"authenticated":authenticated,"user":{"username":user},"audiences":audiences}})
}

#[tokio::test]
async fn allowed_tokens_yield_identity_and_are_cached() {
    let (r, calls) = reviewer(Some(review(
        true,
        "system:serviceaccount:team-a:agent",
        &["mcp-broker"],
    )));
    let t = jwt(3600);
    let id = r.verify(&t).await.unwrap();
    assert_eq!(
        id,
        KubeIdentity {
            namespace: "team-a".into(),
            service_account: "agent".into()
        }
    );
    assert_eq!(r.verify(&t).await.unwrap(), id);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "second verdict from the cache"
    );
}

#[tokio::test]
async fn denied_tokens_and_non_service_accounts_are_refused() {
    let (r, calls) = reviewer(Some(review(false, "", &[])));
    assert!(matches!(
        r.verify(&jwt(3600)).await,
        Err(VerifyError::Denied(_))
    ));
    assert!(matches!(
        r.verify(&jwt(3600)).await,
        Err(VerifyError::Denied(_))
    ));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a denial is answered from the cache for a while: retrying a bad token costs no review"
    );
    let (r, _) = reviewer(Some(review(true, "jane@example.com", &["mcp-broker"])));
    assert!(matches!(
        r.verify(&jwt(3600)).await,
        Err(VerifyError::Denied(_))
    ));
    let (r, _) = reviewer(Some(review(
        true,
        "system:serviceaccount:a:b",
        &["kubernetes"],
    )));
    assert!(
        matches!(r.verify(&jwt(3600)).await, Err(VerifyError::Denied(m)) if m.contains("audience"))
    );
    // A verdict that does not confirm the audience at all is refused too.
    let mut silent = review(true, "system:serviceaccount:a:b", &[]);
    silent["status"]
        .as_object_mut()
        .unwrap()
        .remove("audiences");
    let (r, _) = reviewer(Some(silent));
    assert!(
        matches!(r.verify(&jwt(3600)).await, Err(VerifyError::Denied(m)) if m.contains("audience"))
    );
}

#[tokio::test]
async fn an_unavailable_api_is_not_cached() {
    let (r, calls) = reviewer(None);
    let t = jwt(3600);
    for _ in 0..2 {
        assert!(matches!(
            r.verify(&t).await,
            Err(VerifyError::Unavailable(_))
        ));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "an outage says nothing about the token"
    );
}

#[tokio::test]
async fn reviews_beyond_the_rate_are_refused_and_cached_verdicts_still_served() {
    let ok = review(true, "system:serviceaccount:team-a:agent", &["mcp-broker"]);
    let (r, calls) = reviewer_limited(Some(ok), 1, 2);
    assert!(r.verify("t1").await.is_ok());
    assert!(r.verify("t2").await.is_ok());
    // A flood of fresh tokens: refused without calls once the burst is spent.
    for i in 0..20 {
        let e = r.verify(&format!("fresh-{i}")).await.unwrap_err();
        assert_eq!(e, VerifyError::RateLimited(1));
        assert!(e.to_string().contains("token_review_rate"), "{e}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Known tokens are answered from the cache meanwhile.
    assert!(r.verify("t1").await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn expired_tokens_are_refused_without_a_call() {
    let (r, calls) = reviewer(Some(review(
        true,
        "system:serviceaccount:a:b",
        &["mcp-broker"],
    )));
    assert_eq!(r.verify(&jwt(-10)).await, Err(VerifyError::Expired));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn api_down_fails_closed() {
    let (r, _) = reviewer(None);
    assert!(matches!(
        r.verify(&jwt(3600)).await,
        Err(VerifyError::Unavailable(_))
    ));
}

#[test]
fn usernames_and_expiry_parse() {
    assert_eq!(
        parse_service_account("system:serviceaccount:ns:sa"),
        Some(KubeIdentity {
            namespace: "ns".into(),
            service_account: "sa".into()
        })
    );
    assert_eq!(parse_service_account("system:serviceaccount:ns"), None);
    assert_eq!(parse_service_account("system:node:x"), None);
    assert!(jwt_expiry(&jwt(100)).is_some());
    assert_eq!(jwt_expiry("not-a-jwt"), None);
}
