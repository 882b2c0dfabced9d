//! Embedding: Herald's endpoints mounted in an axum router beside the
//! embedder's own routes.

use herald::Payload;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_under_an_axum_router() {
    let (herald, app, listener, a) = embedded_in_axum().await;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (status, _, body) = http(a, "GET", "/hello", &[], b"").await;
    assert_eq!((status, body.as_str()), (200, "hello from the embedder"));

    let mut w = ws(a, "/rt/ws?channel=e").await;
    let mut s = Sse::open_at(a, "/rt/sse?channel=e").await;
    let sub = command(&mut w, json!({"op": "subscribe", "channel": "f", "id": 1})).await;
    assert_eq!(sub["op"], "subscribed");
    herald.publish("e", Payload::text("one")).await.unwrap();
    let (status, _) = publish(a, "e", "two", false).await;
    assert_eq!(status, 404, "the embedder's paths are its own: /publish lives under /rt");
    let (status, _, _) = http(a, "POST", "/rt/publish/e", &[], b"two").await;
    assert_eq!(status, 200);
    for want in ["one", "two"] {
        assert_eq!(next_json(&mut w).await["data"], want);
        let data: serde_json::Value = serde_json::from_str(&s.next_data().await.unwrap()).unwrap();
        assert_eq!(data["data"], want);
    }
    let (status, _, body) = http(a, "GET", "/rt/metrics", &[], b"").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "herald_frames_delivered_total{transport=\"ws\"}"), 2);
    herald.shutdown(std::time::Duration::from_secs(2)).await;
    assert_eq!(close_of(&mut w).await.0, 1001);
}
