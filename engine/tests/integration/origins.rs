//! `allowed_origins`: pages of other origins are refused before anything
//! happens; allowed ones get CORS headers, so a page on another origin can
//! use `EventSource` and read history.

use herald::Config;
use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_origin_gets_cors_headers() {
    let h = start(2, |_| {});
    let a = addr(&h);
    let origin = [("origin", "http://pages.example:3000")];
    let (status, head, _) = http(a, "GET", "/history/news", &origin, b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: http://pages.example:3000"), "{head}");
    assert!(head.contains("vary: origin"), "{head}");
    let (status, head, _) = http(a, "POST", "/publish/news", &origin, b"x").await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: http://pages.example:3000"), "{head}");
    // The preflight of a page that sends the API key or a JSON body.
    let pre = [
        ("origin", "http://pages.example:3000"),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization"),
    ];
    let (status, head, _) = http(a, "OPTIONS", "/history/news", &pre, b"").await;
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-headers: authorization, content-type, idempotency-key, last-event-id"), "{head}");
    assert!(head.contains("access-control-allow-methods: get, post, options"), "{head}");
    // Not a browser page (no Origin): no CORS headers, nothing refused.
    let (status, head, _) = http(a, "GET", "/history/news", &[], b"").await;
    assert_eq!(status, 200);
    assert!(!head.contains("access-control"), "{head}");
    // /healthz and /metrics are not for pages.
    let (_, head, _) = http(a, "GET", "/healthz", &origin, b"").await;
    assert!(!head.contains("access-control"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_is_refused_and_changes_nothing() {
    let h = start(2, |c| {
        c.allowed_origins(["https://app.example"]);
    });
    let a = addr(&h);
    let mut sub = ws(a, "/ws?channel=news").await;
    let evil = [("origin", "https://evil.example")];
    for (method, path) in [("GET", "/ws?channel=news"), ("GET", "/sse?channel=news"), ("POST", "/publish/news"), ("GET", "/history/news")] {
        let mut headers = evil.to_vec();
        if path.starts_with("/ws") {
            headers.extend(WS_UPGRADE);
        }
        let (status, head, body) = http(a, method, path, &headers, b"evil").await;
        assert_eq!(status, 403, "{method} {path}: {head}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "forbidden", "{body}");
        assert!(v["message"].as_str().unwrap().contains("\"https://evil.example\" is not allowed"), "{body}");
        assert!(!head.contains("access-control"), "{head}");
    }
    let (status, _, _) = http(a, "OPTIONS", "/history/news", &evil, b"").await;
    assert_eq!(status, 403, "no preflight for another origin");
    // The allowed origin (any case), and a client without Origin, are served.
    let (status, head, _) = http(a, "POST", "/publish/news", &[("origin", "https://APP.example")], b"ok").await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: https://app.example"), "{head}");
    assert_eq!(publish(a, "news", "plain", false).await.0, 200);
    // The refused publish published nothing: the subscriber sees only the two.
    for want in ["ok", "plain"] {
        assert_eq!(next_json(&mut sub).await["data"], want);
    }
    assert_eq!(metric(&h.metrics_text(), "herald_errors_total{code=\"forbidden\"}"), 5);
}

#[test]
fn allowed_origins_must_be_origins() {
    for bad in [vec![], vec!["https://app.example/"], vec!["app.example"], vec!["ftp://x"], vec!["https://*.example"], vec!["https://"]] {
        let mut c = Config::default();
        c.allowed_origins(bad.clone());
        let e = c.validated().unwrap_err().to_string();
        assert!(e.contains("allowed_origins"), "{bad:?}: {e}");
    }
    let mut c = Config::default();
    c.allowed_origins(["*", "http://localhost:3000", "https://app.example"]);
    assert!(c.validated().is_ok());
}
