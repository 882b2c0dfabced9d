//! Identity and permissions: connection tokens (JWT) at connect and by the
//! `auth` command, grants, user channels, expiry and refresh, the API key,
//! and an embedder's own identity. Tokens are signed here with
//! `jsonwebtoken`, as an application's backend would.

use std::time::Duration;

use herald::{AuthConfig, Config, Herald, Identity};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token for `claims` (`exp` an hour away unless given).
fn token(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn user_42() -> String {
    token(json!({"sub": "42", "subscribe": ["news", "chat:*"], "publish": ["chat:*"]}))
}

/// A token with the audience and issuer of `bad_tokens_are_refused_before_anything_opens`.
fn aud_iss(mut claims: Value) -> String {
    claims["aud"] = json!("my-app");
    claims["iss"] = json!("https://auth.example");
    token(claims)
}

fn secured(tweak: impl FnOnce(&mut Config)) -> Herald {
    start(2, |c| {
        c.auth_hmac_secret(SECRET).api_key("the-api-key-of-this-test");
        tweak(c);
    })
}

fn code(v: &Value) -> Option<&str> {
    v["code"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_do_what_its_token_grants_and_nothing_else() {
    let h = secured(|_| {});
    let a = addr(&h);
    // Anonymous: connected, but may subscribe to nothing.
    let mut c = ws(a, "/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "news", "id": 1})).await;
    assert_eq!((code(&r), r["id"].as_u64()), (Some("forbidden"), Some(1)), "{r}");
    let r = command(&mut c, json!({"op": "auth", "token": user_42(), "id": 2})).await;
    assert_eq!((r["op"].as_str(), r["user"].as_str(), r["id"].as_u64()), (Some("authed"), Some("42"), Some(2)), "{r}");
    assert!(r["expires_at"].as_u64().unwrap() > now());
    for (cmd, allowed) in [
        (json!({"op": "subscribe", "channel": "news"}), true),
        (json!({"op": "subscribe", "channel": "chat:room-1"}), true),
        (json!({"op": "subscribe", "channel": "user:42"}), true),
        (json!({"op": "subscribe", "channel": "sport"}), false),
        (json!({"op": "subscribe", "channel": "user:7"}), false),
        (json!({"op": "history", "channel": "sport"}), false),
        (json!({"op": "history", "channel": "news"}), true),
        (json!({"op": "publish", "channel": "news", "data": 1}), false),
    ] {
        let r = command(&mut c, cmd.clone()).await;
        if allowed {
            assert_ne!(r["op"], "error", "{cmd} -> {r}");
        } else {
            assert_eq!(code(&r), Some("forbidden"), "{cmd} -> {r}");
        }
    }
    // The connection stays usable after the refusals: a publish it may make
    // reaches its own subscription (reply and message in either order).
    send(&mut c, json!({"op": "publish", "channel": "chat:room-1", "data": 1})).await;
    let mut got = vec![next_json(&mut c).await, next_json(&mut c).await];
    got.sort_by_key(|v| v["op"].is_string());
    assert_eq!(
        (got[0]["channel"].as_str(), got[0]["data"].as_u64(), got[1]["op"].as_str()),
        (Some("chat:room-1"), Some(1), Some("published")),
        "{got:?}"
    );
    assert_eq!(metric(&h.metrics_text(), "herald_auth_total{result=\"ok\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_before_anything_opens() {
    let h = secured(|c| {
        let auth = c.auth.as_mut().unwrap();
        auth.max_token_bytes = 1024;
        auth.audience = Some("my-app".into());
        auth.issuer = Some("https://auth.example".into());
    });
    let a = addr(&h);
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "42", "exp": now() + 60, "aud": "my-app", "iss": "https://auth.example"}),
        &EncodingKey::from_secret(b"another secret, 32 bytes long.."),
    )
    .unwrap();
    let expired = aud_iss(json!({"sub": "42", "exp": now() - 3600}));
    let no_sub = aud_iss(json!({"exp": now() + 60}));
    let bad_sub = aud_iss(json!({"sub": "a:b"}));
    let future = aud_iss(json!({"sub": "42", "nbf": now() + 3600}));
    let no_aud = token(json!({"sub": "42", "iss": "https://auth.example"}));
    let other_aud = token(json!({"sub": "42", "aud": "someone-else", "iss": "https://auth.example"}));
    let other_iss = token(json!({"sub": "42", "aud": "my-app", "iss": "https://evil.example"}));
    let wrong_type = aud_iss(json!({"sub": "42", "subscribe": "news"}));
    // An unsigned token ("alg": "none").
    let b64 = |s: &str| base64_url(s.as_bytes());
    let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&format!(r#"{{"sub":"42","exp":{}}}"#, now() + 60)));
    let long = aud_iss(json!({"sub": "42", "subscribe": vec!["x".repeat(50); 40]}));
    for (name, t, why) in [
        ("wrong key", &wrong_key, "bad signature"),
        ("expired", &expired, "expired"),
        ("no sub", &no_sub, "token refused"),
        ("no audience", &no_aud, "token refused"),
        ("another audience", &other_aud, "InvalidAudience"),
        ("another issuer", &other_iss, "InvalidIssuer"),
        ("grants of the wrong type", &wrong_type, "token refused"),
        ("bad sub", &bad_sub, "not a user id"),
        ("not yet valid", &future, "ImmatureSignature"),
        ("alg none", &none, "not a JWT"),
        ("too long", &long, "longer than 1024 bytes"),
        ("not a token", &"garbage".to_string(), "not a JWT"),
    ] {
        for path in [format!("/sse?channel=news&token={t}"), format!("/ws?token={t}")] {
            let mut headers = vec![];
            if path.starts_with("/ws") {
                headers.extend(WS_UPGRADE);
            }
            let (status, _, body) = http(a, "GET", &path, &headers, b"").await;
            assert_eq!(status, 401, "{name} on {path}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(code(&v), Some("unauthorized"), "{name}: {body}");
            assert!(v["message"].as_str().unwrap().contains(why), "{name}: {body}");
            assert!(!body.contains(t.as_str()) || t == "garbage", "the token is never echoed: {body}");
        }
    }
    let m = h.metrics_text();
    for (result, n) in [("expired", 2), ("bad_signature", 2), ("rejected", 6), ("wrong_algorithm", 0)] {
        assert_eq!(metric(&m, &format!("herald_auth_total{{result=\"{result}\"}}")), n, "{result}");
    }
    assert!(metric(&m, "herald_auth_total{result=\"malformed\"}") >= 12);
    // Good tokens, in the header and in the query; a channel outside the
    // grants in the query is 403.
    let good = aud_iss(json!({"sub": "42", "subscribe": ["news", "chat:*"]}));
    let bearer = format!("Bearer {good}");
    let mut sse = Sse::open_with(a, "/sse?channel=news", &[("authorization", &bearer)]).await;
    assert_eq!(sse.next_event().await.unwrap().0, "subscribed");
    let mut sse = Sse::open(a, &format!("channel=news&token={good}")).await;
    let (event, _, _) = sse.next_event().await.unwrap();
    assert_eq!(event, "subscribed");
    let (status, _, body) = http(a, "GET", &format!("/sse?channel=sport&token={good}"), &[], b"").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, v["message"].as_str()), (403, Some("not allowed to subscribe to \"sport\"")), "{body}");
    let (status, _, _) = http(a, "GET", "/sse?channel=news", &[], b"").await;
    assert_eq!(status, 403, "anonymous: nothing");
    // With the query's token, a WebSocket subscribes to what it grants.
    let mut c = ws(a, &format!("/ws?channel=chat:a&token={good}")).await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "sport"})).await;
    assert_eq!(code(&r), Some("forbidden"));
    let m = h.metrics_text();
    assert_eq!(metric(&m, "herald_forbidden_total{action=\"subscribe\"}"), 3, "two queries and a command");
    assert!(metric(&m, "herald_auth_total{result=\"missing\"}") >= 1);
}

/// "Send this to user 42": every connection of that user gets it, and
/// nobody else can listen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_channel_reaches_every_device_of_its_user_only() {
    let h = secured(|_| {});
    let a = addr(&h);
    let mut phone = ws(a, &format!("/ws?channel=user:42&token={}", user_42())).await;
    let mut laptop = ws(a, "/ws").await;
    command(&mut laptop, json!({"op": "auth", "token": user_42()})).await;
    let r = command(&mut laptop, json!({"op": "subscribe", "channel": "user:42"})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let other = token(json!({"sub": "7", "subscribe": ["*"]}));
    let (status, _, _) = http(a, "GET", &format!("/sse?channel=user:42&token={other}"), &[], b"").await;
    assert_eq!(status, 403, "a grant of * does not reach another user's channel");
    let key = [("authorization", "Bearer the-api-key-of-this-test")];
    let (status, _, body) = http(a, "POST", "/publish/user:42", &key, b"sync").await;
    assert_eq!(status, 200, "{body}");
    for device in [&mut phone, &mut laptop] {
        let m = next_json(device).await;
        assert_eq!((m["channel"].as_str(), m["data"].as_str()), (Some("user:42"), Some("sync")), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_publish_and_history_and_metrics_stay_open() {
    let h = secured(|_| {});
    let a = addr(&h);
    for (method, path) in [("POST", "/publish/news"), ("GET", "/history/news")] {
        for headers in
            [vec![], vec![("authorization", "Bearer wrong-key-of-the-same-size")], vec![("authorization", "Basic dGhlLWFwaS1rZXk=")]]
        {
            let (status, head, body) = http(a, method, path, &headers, b"x").await;
            assert_eq!((status, code(&serde_json::from_str(&body).unwrap())), (401, Some("unauthorized")), "{method} {path} {headers:?}");
            assert!(head.contains("www-authenticate: bearer"), "{head}");
        }
        let (status, _, body) = http(a, method, path, &[("authorization", "Bearer the-api-key-of-this-test")], b"x").await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
    for path in ["/metrics", "/healthz"] {
        assert_eq!(http(a, "GET", path, &[], b"").await.0, 200, "{path}");
    }
    // Without an API key the endpoints stay open (v1).
    let open = start(1, |_| {});
    assert_eq!(publish(addr(&open), "news", "x", false).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_the_connection_and_a_refresh_keeps_it() {
    let h = secured(|c| {
        c.auth.as_mut().unwrap().leeway_s = 0;
    });
    let a = addr(&h);
    let soon = token(json!({"sub": "42", "exp": now() + 1, "subscribe": ["news"]}));
    // Not refreshed: closed with 4001; an SSE stream ends.
    let mut c = ws(a, &format!("/ws?channel=news&token={soon}")).await;
    let mut sse = Sse::open(a, &format!("channel=news&token={soon}")).await;
    assert_eq!(close_of(&mut c).await, (4001, "token expired".to_string()));
    while sse.next_event().await.is_some() {}
    // Refreshed in time: still open after the first token's expiry.
    let soon = token(json!({"sub": "42", "exp": now() + 1, "subscribe": ["news"]}));
    let mut c = ws(a, &format!("/ws?channel=news&token={soon}")).await;
    let r = command(&mut c, json!({"op": "auth", "token": token(json!({"sub": "42", "subscribe": ["news", "more"]})), "id": 1})).await;
    assert_eq!(r["op"], "authed");
    assert_eq!(metric(&h.metrics_text(), "herald_auth_refreshes_total"), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "more", "id": 2})).await;
    assert_eq!(r["op"], "subscribed", "the new token's grants apply: {r}");
    // A refresh with another user's token: closed with 4003.
    send(&mut c, json!({"op": "auth", "token": token(json!({"sub": "7"}))})).await;
    assert_eq!(close_of(&mut c).await, (4003, "user changed".to_string()));
    wait_metric(&h, "herald_disconnects_total{reason=\"token_expired\"}", |v| v == 2).await;
    wait_metric(&h, "herald_disconnects_total{reason=\"user_changed\"}", |v| v == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_verify_ed25519_and_es256_tokens_and_refuse_others() {
    for (key, public, alg) in
        [("jwt-ed25519.key", "jwt-ed25519.pub", Algorithm::EdDSA), ("jwt-es256.key", "jwt-es256.pub", Algorithm::ES256)]
    {
        let auth = AuthConfig { public_key_file: Some(format!("{FIXTURES}/{public}")), ..AuthConfig::default() };
        let h = start(1, |c| {
            c.auth(auth);
        });
        let pem = std::fs::read(format!("{FIXTURES}/{key}")).unwrap();
        let enc = if alg == Algorithm::EdDSA { EncodingKey::from_ed_pem(&pem) } else { EncodingKey::from_ec_pem(&pem) }.unwrap();
        let t = encode(&Header::new(alg), &json!({"sub": "42", "exp": now() + 60, "subscribe": ["news"]}), &enc).unwrap();
        let mut sse = Sse::open(addr(&h), &format!("channel=news&token={t}")).await;
        assert_eq!(sse.next_event().await.unwrap().0, "subscribed", "{alg:?}");
        // An HMAC token where only a public key is configured.
        let (status, _, body) = http(addr(&h), "GET", &format!("/sse?channel=news&token={}", user_42()), &[], b"").await;
        assert_eq!(status, 401, "{alg:?}: {body}");
        assert!(body.contains("not accepted by this server's keys"), "{body}");
    }
    // Algorithm confusion: an HS256 token whose secret is the server's RSA
    // public key (a classic attack on servers that take the header's word).
    let rsa = format!("{FIXTURES}/jwt-rsa.pub");
    let h = start(1, |c| {
        c.auth(AuthConfig { public_key_file: Some(rsa.clone()), ..AuthConfig::default() });
    });
    let pem = std::fs::read(&rsa).unwrap();
    let claims = json!({"sub": "42", "exp": now() + 60, "subscribe": ["*"]});
    let forged = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&pem)).unwrap();
    let (status, _, body) = http(addr(&h), "GET", &format!("/sse?channel=news&token={forged}"), &[], b"").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("HS256 is not accepted"), "{body}");
    assert_eq!(metric(&h.metrics_text(), "herald_auth_total{result=\"wrong_algorithm\"}"), 1);
    let bad = AuthConfig { public_key_file: Some(format!("{FIXTURES}/README")), ..AuthConfig::default() };
    let mut c = Config::default();
    c.auth(bad);
    let e = Herald::start_embedded(c).unwrap_err().to_string();
    assert!(e.contains("is not a PEM RSA, EC (P-256, P-384) or Ed25519 public key"), "{e}");
}

/// An embedder that authenticates its users itself hands Herald their
/// identity in the request's extensions: no token needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedder_passes_its_own_identity() {
    let mut config = Config::default();
    config.shards(1).auth_hmac_secret(SECRET);
    let herald = Herald::start_embedded(config).unwrap();
    let identity = Identity::new("42").subscribe(["news"]).publish(["news"]);
    let app = axum::Router::new().nest_service("/rt", herald.service()).layer(axum::Extension(identity));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut c = ws(a, "/rt/ws").await;
    let r = command(&mut c, json!({"op": "subscribe", "channel": "news", "id": 1})).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let r = command(&mut c, json!({"op": "subscribe", "channel": "sport", "id": 2})).await;
    assert_eq!(code(&r), Some("forbidden"), "{r}");
    let r = command(&mut c, json!({"op": "publish", "channel": "news", "data": "hi", "id": 3})).await;
    assert_eq!(r["op"], "published", "{r}");
}

fn base64_url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
