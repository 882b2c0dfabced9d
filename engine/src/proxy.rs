//! The application's hooks (`[proxy]`): Herald asks the application over
//! HTTP before a connection, a subscribe or a client publish takes effect.
//!
//! One keep-alive client pool (hyper) serves the whole node. Every call has
//! a deadline (`timeout_ms`) and counts against `max_in_flight`; past that
//! bound no call is made and the client gets `unavailable`. Nothing here is
//! on the delivery path: a message is asked about before it is published,
//! never while it is fanned out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::Identity;
use crate::config::ProxyConfig;
use crate::metrics::{Counter, Histogram};
use crate::proto::json::Payload;

/// The three hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Connect = 0,
    Subscribe = 1,
    Publish = 2,
}

impl Hook {
    pub(crate) const ALL: [Hook; 3] = [Hook::Connect, Hook::Subscribe, Hook::Publish];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
        }
    }
}

/// Outcomes of a call, as counted.
const RESULTS: [&str; 5] = ["ok", "refused", "error", "timeout", "overloaded"];

/// Why a hook did not allow what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HookError {
    /// The application said no (a 4xx), with its message.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
    /// The application could not be asked, or answered something else.
    #[error("the application did not answer: {0}")]
    Unavailable(String),
    /// No answer within `timeout_ms`.
    #[error("the application did not answer within {0} ms")]
    Timeout(u128),
    /// `max_in_flight` calls are waiting already.
    #[error("too many calls to the application are waiting (max_in_flight {0})")]
    Overloaded(usize),
}

impl HookError {
    pub(crate) fn code(&self) -> crate::proto::ErrorCode {
        match self {
            HookError::Refused { .. } => crate::proto::ErrorCode::Forbidden,
            _ => crate::proto::ErrorCode::Unavailable,
        }
    }
}

/// What a connection brings to the connect hook.
#[derive(Debug)]
pub(crate) struct ConnectInfo {
    pub transport: &'static str,
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The request's headers named in [`CONNECT_HEADERS`].
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub token: Option<String>,
}

impl ConnectInfo {
    /// The headers of `headers` that the connect hook gets.
    pub(crate) fn headers_of(headers: &http::HeaderMap) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for name in CONNECT_HEADERS {
            if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                out.insert(name.into(), v.into());
            }
        }
        out
    }
}

/// Request headers passed on to the connect hook.
const CONNECT_HEADERS: [&str; 6] = ["authorization", "cookie", "origin", "user-agent", "x-forwarded-for", "x-real-ip"];

/// An answer's body is read up to this much beyond `max_message_bytes`.
const ANSWER_SLACK_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
struct ConnectAnswer {
    user: String,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    expires_at: Option<u64>,
}

#[derive(Deserialize)]
struct PublishAnswer<'a> {
    #[serde(borrow, default, deserialize_with = "crate::proto::command::present")]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Refusal {
    message: Option<String>,
}

/// The node's hook client.
pub(crate) struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    urls: [Option<Uri>; 3],
    timeout: Duration,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    max_answer: usize,
    calls: [[Counter; RESULTS.len()]; 3],
    latency: [Histogram; 3],
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("urls", &self.urls).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Takes a slot of `max_in_flight`; gives it back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Proxy {
    /// The hooks of `[proxy]` (URLs checked by [`crate::Config::validated`]).
    pub(crate) fn from_config(c: &ProxyConfig, max_message_bytes: usize) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(c.timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(c.max_in_flight)
            .build(connector);
        let uri = |u: &Option<String>| u.as_deref().and_then(|u| u.parse::<Uri>().ok());
        Proxy {
            client,
            urls: [uri(&c.connect_url), uri(&c.subscribe_url), uri(&c.publish_url)],
            timeout: Duration::from_millis(c.timeout_ms),
            max_in_flight: c.max_in_flight,
            in_flight: AtomicUsize::new(0),
            max_answer: max_message_bytes + ANSWER_SLACK_BYTES,
            calls: Default::default(),
            latency: Default::default(),
        }
    }

    /// Whether `hook` is configured.
    pub(crate) fn has(&self, hook: Hook) -> bool {
        self.urls[hook as usize].is_some()
    }

    /// Posts `body` to `hook`'s URL; the status and body of a 2xx or 4xx
    /// answer.
    async fn call(&self, hook: Hook, body: String) -> Result<(StatusCode, Bytes), HookError> {
        let Some(url) = self.urls[hook as usize].clone() else {
            return Err(HookError::Unavailable(format!("no {} hook is configured", hook.label())));
        };
        let taken = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_in_flight).then_some(n + 1));
        if taken.is_err() {
            return Err(HookError::Overloaded(self.max_in_flight));
        }
        let _slot = Slot(&self.in_flight);
        let started = Instant::now();
        let req = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HookError::Unavailable(e.to_string()))?;
        let max = self.max_answer;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| HookError::Unavailable(format!("{e}")))?;
            let status = res.status();
            let body = http_body_util::Limited::new(res.into_body(), max)
                .collect()
                .await
                .map_err(|e| HookError::Unavailable(format!("cannot read the answer: {e}")))?
                .to_bytes();
            Ok::<_, HookError>((status, body))
        };
        let r = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(HookError::Timeout(self.timeout.as_millis())),
            Ok(Ok((status, _))) if !(status.is_success() || status.is_client_error()) => {
                Err(HookError::Unavailable(format!("it answered {status}")))
            }
            Ok(r) => r,
        };
        self.latency[hook as usize].record(started.elapsed());
        r
    }

    /// Counts a hook's outcome.
    fn count<T>(&self, hook: Hook, r: &Result<T, HookError>) {
        let i = match r {
            Ok(_) => 0,
            Err(HookError::Refused { .. }) => 1,
            Err(HookError::Unavailable(_)) => 2,
            Err(HookError::Timeout(_)) => 3,
            Err(HookError::Overloaded(_)) => 4,
        };
        self.calls[hook as usize][i].inc();
    }

    /// The refusal a 4xx answer carries.
    fn refused(status: StatusCode, body: &[u8]) -> HookError {
        let message = serde_json::from_slice::<Refusal>(body)
            .ok()
            .and_then(|r| r.message)
            .map(|m| crate::proto::truncate_str(&m, 512).to_owned())
            .unwrap_or_else(|| "refused by the application".into());
        HookError::Refused { status, message }
    }

    /// Asks the connect hook who this connection is.
    pub(crate) async fn connect(&self, info: ConnectInfo) -> Result<Identity, HookError> {
        let r = self.ask_connect(info).await;
        self.count(Hook::Connect, &r);
        r
    }

    async fn ask_connect(&self, info: ConnectInfo) -> Result<Identity, HookError> {
        let body = serde_json::json!({
            "transport": info.transport,
            "remote_addr": info.remote_addr.map(|a| a.to_string()),
            "headers": info.headers,
            "token": info.token,
        });
        let (status, answer) = self.call(Hook::Connect, body.to_string()).await?;
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(Proxy::refused(status, &answer)),
            s if !s.is_success() => return Err(HookError::Unavailable(format!("the connect hook answered {s}"))),
            _ => {}
        }
        let a: ConnectAnswer = serde_json::from_slice(&answer).map_err(|e| self.bad_answer(Hook::Connect, e))?;
        if !crate::auth::valid_user(&a.user) {
            return Err(self.bad_answer(Hook::Connect, "\"user\" must be 1 to 128 bytes of A-Z a-z 0-9 _ - . @ /"));
        }
        let id = Identity::new(a.user).subscribe(&a.subscribe).publish(&a.publish);
        Ok(match a.expires_at {
            Some(exp) => id.expiring_at(exp),
            None => id,
        })
    }

    /// Asks the subscribe hook whether `user` may subscribe to `channel`.
    pub(crate) async fn subscribe(&self, user: Option<&str>, channel: &str) -> Result<(), HookError> {
        let r = self.ask_subscribe(user, channel).await;
        self.count(Hook::Subscribe, &r);
        r
    }

    async fn ask_subscribe(&self, user: Option<&str>, channel: &str) -> Result<(), HookError> {
        let body = serde_json::json!({ "user": user, "channel": channel });
        let (status, answer) = self.call(Hook::Subscribe, body.to_string()).await?;
        match status {
            StatusCode::FORBIDDEN => Err(Proxy::refused(status, &answer)),
            s if s.is_success() => Ok(()),
            s => Err(HookError::Unavailable(format!("the subscribe hook answered {s}"))),
        }
    }

    /// Asks the publish hook about `data` (JSON text) from `user` to
    /// `channel` (with the publish's idempotency key, so the application
    /// can store a retried change once): the data to publish instead, if
    /// the answer has one.
    pub(crate) async fn publish(
        &self,
        user: Option<&str>,
        channel: &str,
        data: &str,
        key: Option<&str>,
    ) -> Result<Option<Payload>, HookError> {
        let r = self.ask_publish(user, channel, data, key).await;
        self.count(Hook::Publish, &r);
        r
    }

    async fn ask_publish(&self, user: Option<&str>, channel: &str, data: &str, key: Option<&str>) -> Result<Option<Payload>, HookError> {
        let head = serde_json::json!({ "user": user, "channel": channel, "idempotency_key": key }).to_string();
        // `{"user":…,"channel":…}` with `"data":<data>` before the brace.
        let mut body = String::with_capacity(head.len() + data.len() + 9);
        body.push_str(&head[..head.len() - 1]);
        body.push_str(",\"data\":");
        body.push_str(data);
        body.push('}');
        let (status, answer) = self.call(Hook::Publish, body).await?;
        if !status.is_success() {
            return Err(Proxy::refused(status, &answer));
        }
        if answer.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let a: PublishAnswer<'_> = serde_json::from_slice(&answer).map_err(|e| self.bad_answer(Hook::Publish, e))?;
        match a.data {
            None => Ok(None),
            Some(raw) => {
                Payload::json(Bytes::copy_from_slice(raw.get().as_bytes())).map(Some).map_err(|e| self.bad_answer(Hook::Publish, e))
            }
        }
    }

    /// An answer that is not what the hook should say.
    fn bad_answer(&self, hook: Hook, e: impl std::fmt::Display) -> HookError {
        HookError::Unavailable(format!("the {} hook's answer is not valid: {e}", hook.label()))
    }

    /// Calls waiting for an answer now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The hooks' lines of the Prometheus exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP herald_proxy_calls_total Calls to the application's hooks, by hook and result.\n# TYPE herald_proxy_calls_total counter"
        );
        for hook in Hook::ALL {
            for (i, result) in RESULTS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "herald_proxy_calls_total{{hook=\"{}\",result=\"{result}\"}} {}",
                    hook.label(),
                    self.calls[hook as usize][i].get()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP herald_proxy_in_flight Hook calls waiting for an answer.\n# TYPE herald_proxy_in_flight gauge\nherald_proxy_in_flight {}",
            self.in_flight()
        );
        let _ = writeln!(
            out,
            "# HELP herald_proxy_duration_seconds Time of a hook call, by hook.\n# TYPE herald_proxy_duration_seconds histogram"
        );
        for hook in Hook::ALL {
            self.latency[hook as usize].render(out, "herald_proxy_duration_seconds", &format!("hook=\"{}\",", hook.label()));
        }
    }
}
