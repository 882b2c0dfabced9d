//! Configuration: a plain struct with builder setters, readable from TOML.
//!
//! Every limit has a default, a TOML key (the field name), and a flag and
//! `HERALD_*` variable of the `herald` binary; docs/operations.md
//! ("Configuration and limits") is the reference table of all of them, and
//! a test keeps it in step with these fields.
//!
//! Memory per connection is bounded by `outbound_queue_bytes` (frames
//! waiting to be written) plus, while a client sends a frame or a
//! fragmented message, `max_message_bytes` plus [`COMMAND_OVERHEAD_BYTES`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Room in an inbound frame for a command around its payload (`op`,
/// a channel name of up to 255 bytes, `id`).
pub const COMMAND_OVERHEAD_BYTES: usize = 1024;

/// What happens when a subscriber's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Close the connection: WebSocket close 1008 "slow consumer", SSE
    /// stream ended. The default.
    Disconnect,
    /// Drop the frame and count it; once the subscriber catches up it gets
    /// a `lagged` notice naming the offsets it missed.
    Drop,
}

/// A slow-consumer policy name that is neither `disconnect` nor `drop`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown slow-consumer policy {0:?} (expected disconnect or drop)")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for SlowConsumerPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        match s {
            "disconnect" => Ok(SlowConsumerPolicy::Disconnect),
            "drop" => Ok(SlowConsumerPolicy::Drop),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// Herald's configuration. `Config::default()` is the standalone default:
/// `127.0.0.1:8080`, one shard per core, local broker.
///
/// TOML keys are the field names; durations are in milliseconds with an
/// `_ms` suffix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Connections the kernel queues for the acceptor (the `listen(2)`
    /// backlog); past it a connection storm's SYNs are dropped and retried
    /// by the clients seconds later. The kernel caps it at
    /// `net.core.somaxconn` (Herald warns at start when it does). Default
    /// 4,096. Applies when Herald binds (`Herald::start`), not to a listener
    /// the caller bound.
    pub listen_backlog: u32,
    /// Number of shards (threads); 0 means one per available core. At most 128.
    pub shards: usize,
    /// Largest message payload in bytes (publish bodies, `data` of a publish
    /// command); a client frame or reassembled message may be this plus
    /// [`COMMAND_OVERHEAD_BYTES`]. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Largest HTTP request head in bytes; over it the answer is 431.
    /// Default 16 KiB (at least 8 KiB).
    pub max_request_head_bytes: usize,
    /// Deadline for receiving a whole request head, from its first byte;
    /// trickled bytes do not extend it. Default 10 s.
    pub request_head_timeout_ms: u64,
    /// Open client connections allowed at once (TCP connections in the
    /// standalone server; WebSocket and SSE connections when embedded).
    /// Default 100,000.
    pub max_connections: usize,
    /// Subscriptions allowed per connection. Default 1,024.
    pub max_subscriptions: usize,
    /// Channels whose counters are remembered. When full, a channel with no
    /// subscriber is forgotten (its next publish starts a new epoch); when
    /// every channel has subscribers, new channels are refused (`limit`).
    /// Default 1,000,000 (about 150 bytes each plus the name).
    pub max_channels: usize,
    /// Messages each channel keeps for recovery and `history`; 0 turns
    /// history and recovery off. Default 100; at most 100,000.
    pub history_size: usize,
    /// Seconds a message stays in history. Default 300.
    pub history_ttl_s: u64,
    /// Bytes all channels' histories hold together (local broker), split
    /// evenly over 64 groups of channels; in a full group the oldest entries
    /// go first. An entry counts three times its payload plus 448 bytes
    /// (the message and two encoded forms). Default 256 MiB.
    pub history_max_bytes: usize,
    /// Messages one recovery replays at most (more: `recovered: false`), and
    /// the largest `history` page. Default 1,000.
    pub recovery_max: usize,
    /// Seconds an idempotency key is remembered: a publish that repeats a
    /// key on the same channel within it publishes nothing and gets the
    /// first one's reply. 0 ignores keys. Default 300 (local broker).
    pub idempotency_window_s: u64,
    /// Idempotency keys remembered at most (split over 64 groups of
    /// channels; in a full group the oldest goes). Default 65,536.
    pub idempotency_max_keys: usize,
    /// Bytes of frames queued for one connection before the slow-consumer
    /// policy applies. Default 1 MiB.
    pub outbound_queue_bytes: usize,
    /// What happens when a connection's outbound queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// Messages waiting for one shard before publishes to it are refused
    /// with `overloaded` (HTTP 503). Default 65,536 (16 bytes each).
    pub shard_queue_capacity: usize,
    /// Interval between server pings on an idle WebSocket. Default 25 s.
    pub ping_interval_ms: u64,
    /// A WebSocket that sends nothing (not even a pong) for this long is
    /// closed with 1001 "idle timeout". Default 60 s.
    pub idle_timeout_ms: u64,
    /// How long a closing connection may take to flush its close frame and
    /// see the client's reply. Default 5 s.
    pub close_timeout_ms: u64,
    /// Interval of the `:` keep-alive comment on an idle SSE stream. Default 15 s.
    pub sse_keepalive_ms: u64,
    /// Whether WebSocket clients may publish. Default true; when false the
    /// `publish` command gets error `forbidden`.
    pub client_publish: bool,
    /// Serve `GET /echo`, a WebSocket echo endpoint for conformance
    /// testing. Default false.
    pub echo: bool,
    /// Serve `GET /demo`, a multi-device sync page (a shared list on the
    /// channels `demo:…`, which get presence, 1,000 messages of history for
    /// a day, and client publishing unless a `[namespaces.demo]` says
    /// otherwise). Default false.
    pub demo: bool,
    /// Accept permessage-deflate (RFC 7692) on `/ws` and `/echo`: each
    /// message is deflated at most once and the compressed frame shared by
    /// every subscriber that agreed it. Default false.
    pub compression: bool,
    /// Frames with payloads under this many bytes are sent uncompressed
    /// (compression costs more than it saves on them). Default 128.
    pub compression_min_bytes: usize,
    /// zlib level of compressed frames, 1 (fastest) to 9. Default 1.
    pub compression_level: u32,
    /// Benchmarks only: deflate every message once per delivery instead of
    /// once per message, to measure what sharing saves. Default false.
    #[doc(hidden)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compression_per_connection: bool,
    /// Origins (`https://app.example.com`, exactly as a browser sends it)
    /// whose pages may use Herald; `"*"` allows every origin. A request
    /// with another `Origin` header gets 403; answers to allowed origins
    /// carry CORS headers. Requests without `Origin` (not from a browser
    /// page) are not affected. Default `["*"]`.
    pub allowed_origins: Vec<String>,
    /// Connection tokens (`[auth]`): with it, every connection is bound to
    /// a user and every subscribe and publish is checked against the
    /// token's grants. Default: none (everything open, as in v1).
    pub auth: Option<AuthConfig>,
    /// The server API key: with it, `POST /publish/…` and `GET /history/…`
    /// need `Authorization: Bearer <api_key>`. Default: none (open).
    pub api_key: Option<crate::auth::Secret>,
    /// `[namespaces.NAME]`: options of the channels named `NAME:…`;
    /// `[namespaces.default]` applies to the others. Options a namespace
    /// does not set come from the top level. Default: none.
    pub namespaces: std::collections::BTreeMap<String, Namespace>,
    /// `[proxy]`: the application's hooks (connect, subscribe, publish),
    /// called over HTTP before a connection, a subscribe or a publish
    /// takes effect. Default: none.
    pub proxy: Option<ProxyConfig>,
    /// Seconds a node's presence entries live in Redis without a refresh
    /// (each node refreshes every third of it): a node that dies stops
    /// counting in presence within it. Default 60.
    pub presence_ttl_s: u64,
    /// The standalone server's certificate chain (PEM, leaf first): with
    /// [`Config::tls_key`], the listener speaks TLS only (`wss://`,
    /// `https://`). Default: none (plain text). An embedding server
    /// terminates TLS itself.
    pub tls_cert: Option<String>,
    /// The private key of [`Config::tls_cert`] (PEM: PKCS#8, PKCS#1 or
    /// SEC1). Default: none.
    pub tls_key: Option<String>,
    /// The `redis` broker: `redis://[user:password@]host:port`. Every
    /// publish then goes through this Redis, and every node using it serves
    /// the same channels. Default: none (the local broker).
    pub redis: Option<String>,
    /// The `redis-cluster` broker: seed URLs of a Redis Cluster (≥ 7), used
    /// with sharded pub/sub. Default: none.
    pub redis_cluster: Vec<String>,
    /// A PEM bundle of the CA certificates trusted for `rediss://` (TLS)
    /// Redis URLs. Default: none (the system's CAs).
    pub redis_tls_ca: Option<String>,
    /// Prefix of Herald's Redis keys and channels. Default `herald:`.
    pub redis_prefix: String,
    /// Deadline of one Redis command (a publish, a subscription's
    /// confirmation) and of the answer to the ping that checks a subscriber
    /// connection. Default 2 s.
    pub redis_timeout_ms: u64,
    /// A channel's counter in Redis expires this long after its last publish
    /// (the next publish then starts a new epoch); 0 keeps it forever.
    /// Default 7 days.
    pub redis_counter_ttl_ms: u64,
}

/// `[namespaces.NAME]`: the options of one namespace's channels; an option
/// left out takes the top-level setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Namespace {
    /// Messages of history per channel (0: none).
    pub history_size: Option<usize>,
    /// Seconds a message stays in history.
    pub history_ttl_s: Option<u64>,
    /// Whether WebSocket clients may publish (still within their grants).
    pub client_publish: Option<bool>,
    /// With `[auth]`: any connection, with or without a token, may
    /// subscribe to (and read the history of) these channels. Default false.
    pub anonymous: bool,
    /// Keep who is subscribed to each channel (the `presence` command,
    /// `GET /presence/…`). Default false.
    pub presence: bool,
    /// With `presence`: subscribers get `join` and `leave` events when a
    /// user's first connection subscribes and its last one leaves.
    /// Default false.
    pub join_leave: bool,
    /// Subscribes are decided by the application's subscribe hook
    /// (`[proxy] subscribe_url`) instead of the grants. Default false.
    pub subscribe_proxy: bool,
    /// Client publishes go through the application's publish hook
    /// (`[proxy] publish_url`), which may refuse or rewrite them.
    /// Default false.
    pub publish_proxy: bool,
}

/// `[proxy]`: where the application's hooks are, and how long to wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Called for every `/ws` and `/sse` connection: answers the user and
    /// the grants (standing in for a token). Default: none.
    pub connect_url: Option<String>,
    /// Called for subscribes on namespaces with `subscribe_proxy`.
    pub subscribe_url: Option<String>,
    /// Called for client publishes on namespaces with `publish_proxy`.
    pub publish_url: Option<String>,
    /// Deadline of one call; past it the client gets `unavailable`.
    /// Default 1,000 ms.
    pub timeout_ms: u64,
    /// Calls waiting at once on this node; past it a call is not made and
    /// the client gets `unavailable`. Default 1,000.
    pub max_in_flight: usize,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig { connect_url: None, subscribe_url: None, publish_url: None, timeout_ms: 1000, max_in_flight: 1000 }
    }
}

/// The namespace options in effect for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    pub history_size: usize,
    pub history_ttl_s: u64,
    pub client_publish: bool,
    pub anonymous: bool,
    pub presence: bool,
    pub join_leave: bool,
    pub subscribe_proxy: bool,
    pub publish_proxy: bool,
}

/// The rules of every namespace, resolved once.
#[derive(Debug, Clone)]
pub(crate) struct ChannelRules {
    default: Rules,
    named: std::collections::HashMap<String, Rules>,
}

impl ChannelRules {
    pub(crate) fn from_config(c: &Config) -> ChannelRules {
        let top = Rules {
            history_size: c.history_size,
            history_ttl_s: c.history_ttl_s,
            client_publish: c.client_publish,
            anonymous: false,
            presence: false,
            join_leave: false,
            subscribe_proxy: false,
            publish_proxy: false,
        };
        let resolve = |n: &Namespace| Rules {
            history_size: n.history_size.unwrap_or(top.history_size),
            history_ttl_s: n.history_ttl_s.unwrap_or(top.history_ttl_s),
            client_publish: n.client_publish.unwrap_or(top.client_publish),
            anonymous: n.anonymous,
            presence: n.presence,
            join_leave: n.presence && n.join_leave,
            subscribe_proxy: n.subscribe_proxy,
            publish_proxy: n.publish_proxy,
        };
        let default = c.namespaces.get("default").map_or(top, resolve);
        let named = c.namespaces.iter().filter(|(k, _)| *k != "default").map(|(k, n)| (k.clone(), resolve(n))).collect();
        ChannelRules { default, named }
    }

    /// The rules of `channel`: its namespace's (the part before the first
    /// `:`), else the default's.
    pub(crate) fn of(&self, channel: &str) -> &Rules {
        match channel.split_once(':') {
            Some((ns, _)) if !self.named.is_empty() => self.named.get(ns).unwrap_or(&self.default),
            _ => &self.default,
        }
    }

    /// The longest history TTL of any namespace, in seconds.
    pub(crate) fn max_ttl_s(&self) -> u64 {
        self.named.values().map(|r| r.history_ttl_s).fold(self.default.history_ttl_s, u64::max)
    }
}

/// `[auth]`: how connection tokens (JWTs) are verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The secret of HS256/384/512 tokens.
    pub hmac_secret: Option<crate::auth::Secret>,
    /// A PEM public key (RSA, EC P-256/P-384, Ed25519) for RS*, PS*, ES*,
    /// EdDSA tokens.
    pub public_key_file: Option<String>,
    /// When set, a token's `aud` must be this.
    pub audience: Option<String>,
    /// When set, a token's `iss` must be this.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default 30.
    pub leeway_s: u64,
    /// Longer tokens are refused. Default 8192.
    pub max_token_bytes: usize,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig { hmac_secret: None, public_key_file: None, audience: None, issuer: None, leeway_s: 30, max_token_bytes: 8192 }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            listen_backlog: 4096,
            shards: 0,
            max_message_bytes: 64 * 1024,
            max_request_head_bytes: 16 * 1024,
            request_head_timeout_ms: 10_000,
            max_connections: 100_000,
            max_subscriptions: 1024,
            max_channels: 1_000_000,
            history_size: 100,
            history_ttl_s: 300,
            history_max_bytes: 256 << 20,
            recovery_max: 1000,
            idempotency_window_s: 300,
            idempotency_max_keys: 65_536,
            outbound_queue_bytes: 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            shard_queue_capacity: 65_536,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            close_timeout_ms: 5_000,
            sse_keepalive_ms: 15_000,
            client_publish: true,
            echo: false,
            compression: false,
            compression_min_bytes: 128,
            compression_level: 1,
            compression_per_connection: false,
            demo: false,
            redis: None,
            redis_cluster: Vec::new(),
            redis_tls_ca: None,
            tls_cert: None,
            tls_key: None,
            allowed_origins: vec!["*".to_string()],
            auth: None,
            api_key: None,
            namespaces: std::collections::BTreeMap::new(),
            proxy: None,
            presence_ttl_s: 60,
            redis_prefix: "herald:".into(),
            redis_timeout_ms: 2_000,
            redis_counter_ttl_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The path.
        path: String,
        /// The parse error.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Most shards supported (the channel index keeps shard sets as 128-bit masks).
pub const MAX_SHARDS: usize = 128;

macro_rules! setter {
    ($(#[$m:meta])* $name:ident: $ty:ty) => {
        $(#[$m])*
        pub fn $name(&mut self, value: $ty) -> &mut Self {
            self.$name = value;
            self
        }
    };
}

macro_rules! duration_setter {
    ($(#[$m:meta])* $name:ident => $field:ident) => {
        $(#[$m])*
        pub fn $name(&mut self, value: Duration) -> &mut Self {
            self.$field = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
            self
        }
    };
}

impl Config {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })
    }

    setter!(/// Sets [`Config::listen`].
        listen: SocketAddr);
    setter!(/// Sets [`Config::listen_backlog`].
        listen_backlog: u32);
    setter!(/// Sets [`Config::shards`].
        shards: usize);
    setter!(/// Sets [`Config::max_message_bytes`].
        max_message_bytes: usize);
    setter!(/// Sets [`Config::max_request_head_bytes`].
        max_request_head_bytes: usize);
    setter!(/// Sets [`Config::max_connections`].
        max_connections: usize);
    setter!(/// Sets [`Config::max_subscriptions`].
        max_subscriptions: usize);
    setter!(/// Sets [`Config::max_channels`].
        max_channels: usize);
    setter!(/// Sets [`Config::history_size`].
        history_size: usize);
    setter!(/// Sets [`Config::history_ttl_s`].
        history_ttl_s: u64);
    setter!(/// Sets [`Config::history_max_bytes`].
        history_max_bytes: usize);
    setter!(/// Sets [`Config::recovery_max`].
        recovery_max: usize);
    setter!(/// Sets [`Config::idempotency_window_s`].
        idempotency_window_s: u64);
    setter!(/// Sets [`Config::idempotency_max_keys`].
        idempotency_max_keys: usize);
    setter!(/// Sets [`Config::outbound_queue_bytes`].
        outbound_queue_bytes: usize);
    setter!(/// Sets [`Config::slow_consumer`].
        slow_consumer: SlowConsumerPolicy);
    setter!(/// Sets [`Config::shard_queue_capacity`].
        shard_queue_capacity: usize);
    setter!(/// Sets [`Config::client_publish`].
        client_publish: bool);
    setter!(/// Sets [`Config::echo`].
        echo: bool);
    setter!(/// Sets [`Config::compression`].
        compression: bool);
    setter!(/// Sets [`Config::compression_min_bytes`].
        compression_min_bytes: usize);
    setter!(/// Sets [`Config::compression_level`].
        compression_level: u32);
    setter!(/// Sets [`Config::demo`].
        demo: bool);
    /// Verifies connection tokens signed with this HMAC secret (HS256/384/512).
    pub fn auth_hmac_secret(&mut self, secret: impl Into<String>) -> &mut Self {
        self.auth.get_or_insert_with(AuthConfig::default).hmac_secret = Some(crate::auth::Secret::new(secret));
        self
    }

    /// Sets [`Config::auth`].
    pub fn auth(&mut self, auth: AuthConfig) -> &mut Self {
        self.auth = Some(auth);
        self
    }

    /// Sets [`Config::api_key`].
    pub fn api_key(&mut self, key: impl Into<String>) -> &mut Self {
        self.api_key = Some(crate::auth::Secret::new(key));
        self
    }

    /// Sets [`Config::proxy`].
    pub fn proxy(&mut self, proxy: ProxyConfig) -> &mut Self {
        self.proxy = Some(proxy);
        self
    }

    /// Sets the options of namespace `name` (`"default"`: channels of no
    /// configured namespace).
    pub fn namespace(&mut self, name: impl Into<String>, ns: Namespace) -> &mut Self {
        self.namespaces.insert(name.into(), ns);
        self
    }

    setter!(/// Sets [`Config::presence_ttl_s`].
        presence_ttl_s: u64);

    /// Sets [`Config::allowed_origins`].
    pub fn allowed_origins<S: Into<String>>(&mut self, origins: impl IntoIterator<Item = S>) -> &mut Self {
        self.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// Whether a page of `origin` (an `Origin` header's value) may use
    /// Herald.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// Uses the `redis` broker at `url` (see [`Config::redis`]).
    pub fn redis(&mut self, url: impl Into<String>) -> &mut Self {
        self.redis = Some(url.into());
        self
    }

    /// Uses the `redis-cluster` broker with these seed URLs.
    pub fn redis_cluster<S: Into<String>>(&mut self, urls: impl IntoIterator<Item = S>) -> &mut Self {
        self.redis_cluster = urls.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`Config::redis_prefix`].
    pub fn redis_prefix(&mut self, prefix: impl Into<String>) -> &mut Self {
        self.redis_prefix = prefix.into();
        self
    }

    duration_setter!(/// Sets [`Config::redis_timeout_ms`].
        redis_timeout => redis_timeout_ms);
    duration_setter!(/// Sets [`Config::redis_counter_ttl_ms`].
        redis_counter_ttl => redis_counter_ttl_ms);
    duration_setter!(/// Sets [`Config::request_head_timeout_ms`].
        request_head_timeout => request_head_timeout_ms);
    duration_setter!(/// Sets [`Config::ping_interval_ms`].
        ping_interval => ping_interval_ms);
    duration_setter!(/// Sets [`Config::idle_timeout_ms`].
        idle_timeout => idle_timeout_ms);
    duration_setter!(/// Sets [`Config::close_timeout_ms`].
        close_timeout => close_timeout_ms);
    duration_setter!(/// Sets [`Config::sse_keepalive_ms`].
        sse_keepalive => sse_keepalive_ms);

    /// Checks ranges and resolves `shards = 0` to the core count.
    pub fn validated(&self) -> Result<Config, ConfigError> {
        let mut c = self.clone();
        if c.shards == 0 {
            c.shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        if c.demo && !c.namespaces.contains_key("demo") {
            let demo = Namespace {
                history_size: Some(1000),
                history_ttl_s: Some(86_400),
                client_publish: Some(true),
                anonymous: true,
                presence: true,
                join_leave: true,
                ..Namespace::default()
            };
            c.namespaces.insert("demo".into(), demo);
        }
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(ConfigError::Invalid(what.to_string())) };
        check(c.shards <= MAX_SHARDS, &format!("shards must be at most {MAX_SHARDS}"))?;
        check(c.listen_backlog >= 1 && c.listen_backlog <= i32::MAX as u32, "listen_backlog must be between 1 and 2147483647")?;
        check(c.max_message_bytes >= 1, "max_message_bytes must be at least 1")?;
        check((1..=9).contains(&c.compression_level), "compression_level must be from 1 to 9")?;
        check(c.max_request_head_bytes >= 8192, "max_request_head_bytes must be at least 8192")?;
        check(c.request_head_timeout_ms >= 1, "request_head_timeout_ms must be at least 1")?;
        check(c.max_connections >= 1, "max_connections must be at least 1")?;
        check(c.max_subscriptions >= 1, "max_subscriptions must be at least 1")?;
        check(c.max_channels >= 1, "max_channels must be at least 1")?;
        check(c.history_size <= 100_000, "history_size must be at most 100000")?;
        check(c.history_ttl_s >= 1, "history_ttl_s must be at least 1")?;
        check(c.recovery_max >= 1 && c.recovery_max <= 100_000, "recovery_max must be between 1 and 100000")?;
        for (name, n) in &c.namespaces {
            let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            check(ok, &format!("namespace {name:?}: a name is 1 to 64 of A-Z a-z 0-9 _ - ."))?;
            check(n.history_size.is_none_or(|s| s <= 100_000), &format!("namespaces.{name}.history_size must be at most 100000"))?;
            check(n.history_ttl_s.is_none_or(|t| t >= 1), &format!("namespaces.{name}.history_ttl_s must be at least 1"))?;
            check(!n.join_leave || n.presence, &format!("namespaces.{name}.join_leave needs presence = true"))?;
            let url = |f: fn(&ProxyConfig) -> &Option<String>| c.proxy.as_ref().is_some_and(|p| f(p).is_some());
            check(
                !n.subscribe_proxy || url(|p| &p.subscribe_url),
                &format!("namespaces.{name}.subscribe_proxy needs [proxy] subscribe_url"),
            )?;
            check(!n.publish_proxy || url(|p| &p.publish_url), &format!("namespaces.{name}.publish_proxy needs [proxy] publish_url"))?;
        }
        if let Some(p) = &c.proxy {
            for url in [&p.connect_url, &p.subscribe_url, &p.publish_url].into_iter().flatten() {
                let ok = url.starts_with("http://") && url.parse::<http::Uri>().is_ok_and(|u| u.host().is_some());
                check(ok, &format!("[proxy] {url:?} must be an http://host[:port]/path URL (TLS is not supported)"))?;
            }
            check(p.timeout_ms >= 1, "[proxy] timeout_ms must be at least 1")?;
            check(p.max_in_flight >= 1, "[proxy] max_in_flight must be at least 1")?;
        }
        // The counter and epoch must outlive the history stream, or a
        // channel would restart its offsets while history still holds them.
        let max_ttl = ChannelRules::from_config(&c).max_ttl_s();
        check(
            c.redis_counter_ttl_ms == 0 || c.redis_counter_ttl_ms >= max_ttl.saturating_mul(1000),
            "redis_counter_ttl_ms must be 0 (never) or at least the longest history_ttl_s × 1000 (the counter must outlive the history)",
        )?;
        check(c.presence_ttl_s >= 3, "presence_ttl_s must be at least 3")?;
        check(c.idempotency_max_keys >= 64, "idempotency_max_keys must be at least 64")?;
        check(c.outbound_queue_bytes >= 1024, "outbound_queue_bytes must be at least 1024")?;
        // The JSON escaping of a text payload can make its frame up to six
        // times its size: the queue must hold the largest frame whole, or a
        // subscriber with an empty queue would overflow on it.
        let needed = c.max_message_bytes.saturating_mul(6).saturating_add(1024);
        check(
            c.outbound_queue_bytes >= needed,
            &format!(
                "outbound_queue_bytes ({}) must be at least 6 × max_message_bytes + 1024 = {needed} with max_message_bytes = {}: the \
                 largest frame must fit an empty queue; raise it (--outbound-queue-bytes {needed}) or lower --max-message-bytes",
                c.outbound_queue_bytes, c.max_message_bytes
            ),
        )?;
        check(c.close_timeout_ms >= 1, "close_timeout_ms must be at least 1")?;
        check(c.shard_queue_capacity >= 1, "shard_queue_capacity must be at least 1")?;
        check(c.ping_interval_ms >= 1, "ping_interval_ms must be at least 1")?;
        check(c.idle_timeout_ms >= 1, "idle_timeout_ms must be at least 1")?;
        check(c.sse_keepalive_ms >= 1, "sse_keepalive_ms must be at least 1")?;
        check(c.redis.is_none() || c.redis_cluster.is_empty(), "set redis or redis_cluster, not both")?;
        if let Some(a) = &c.auth {
            check(a.hmac_secret.is_some() || a.public_key_file.is_some(), "[auth] needs hmac_secret or public_key_file")?;
            check(a.hmac_secret.as_ref().is_none_or(|s| s.expose().len() >= 16), "[auth] hmac_secret must be at least 16 bytes")?;
            check(a.max_token_bytes >= 256, "[auth] max_token_bytes must be at least 256")?;
            check(a.leeway_s <= 600, "[auth] leeway_s must be at most 600")?;
        }
        check(c.api_key.as_ref().is_none_or(|k| k.expose().len() >= 16), "api_key must be at least 16 bytes")?;
        check(!c.allowed_origins.is_empty(), "allowed_origins must list at least one origin (\"*\" allows all)")?;
        for o in &c.allowed_origins {
            let host = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            check(
                o == "*" || host.is_some_and(|h| !h.is_empty() && !h.contains(['/', '?', '#', ' ', '*'])),
                &format!("allowed_origins: {o:?} is not an origin (scheme://host[:port], no path) or \"*\""),
            )?;
        }
        for url in c.redis.iter().chain(&c.redis_cluster) {
            check(
                url.starts_with("redis://") || url.starts_with("rediss://"),
                &format!("Redis URL {:?} must start with redis:// or rediss:// (TLS)", redact_url(url)),
            )?;
        }
        for url in c.redis.iter().chain(&c.redis_cluster) {
            let after_host = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
            check(
                !after_host.contains('#'),
                &format!("Redis URL {:?}: fragments (#insecure) are not supported: trust a private CA with redis_tls_ca", redact_url(url)),
            )?;
        }
        let tls_redis = c.redis.iter().chain(&c.redis_cluster).filter(|u| u.starts_with("rediss://")).count();
        check(
            tls_redis == 0 || tls_redis == c.redis.iter().chain(&c.redis_cluster).count(),
            "redis_cluster: use rediss:// for every seed or for none",
        )?;
        check(c.tls_cert.is_some() == c.tls_key.is_some(), "tls_cert and tls_key go together: set both or neither")?;
        check(c.redis_prefix.len() <= 64 && !c.redis_prefix.contains(['{', '}']), "redis_prefix must be at most 64 bytes, without { or }")?;
        check(c.redis_timeout_ms >= 1, "redis_timeout_ms must be at least 1")?;
        // A message must fit Redis's pub/sub output buffer (32 MiB hard
        // limit by default) with room to spare, or it would reach no one.
        check(
            (c.redis.is_none() && c.redis_cluster.is_empty()) || c.max_message_bytes <= 8 << 20,
            "with a Redis broker, max_message_bytes must be at most 8 MiB",
        )?;
        Ok(c)
    }

    pub(crate) fn dur(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

/// `url` with the password of its user info replaced by `<redacted>`, for
/// logs and error messages. The user info ends at the last `@` (a password
/// may hold `/`, `?` or `#`; a Redis URL has no `@` after its host), and a
/// string without a scheme is taken as an authority.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:<redacted>@{}", &rest[at + 1..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords_of_urls() {
        use super::redact_url;
        assert_eq!(redact_url("redis://:hunter2@h:6379/0"), "redis://:<redacted>@h:6379/0");
        assert_eq!(redact_url("rediss://app:hunter2@h"), "rediss://app:<redacted>@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        // A password holding URL delimiters, and no scheme at all.
        assert_eq!(redact_url("rediss://:ab/cd?e#f=@host:6380"), "rediss://:<redacted>@host:6380");
        assert_eq!(redact_url("user:hunter2@host:6379"), "user:<redacted>@host:6379");
    }

    use super::*;

    #[test]
    fn toml_overrides_defaults() {
        let c: Config = toml::from_str("max_connections = 5\nslow_consumer = \"drop\"\nlisten = \"0.0.0.0:9000\"").unwrap();
        assert_eq!(c.max_connections, 5);
        assert_eq!(c.slow_consumer, SlowConsumerPolicy::Drop);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_message_bytes, 64 * 1024);
        assert!(toml::from_str::<Config>("max_conections = 5").is_err(), "unknown keys are refused");
    }

    #[test]
    fn builder_and_validation() {
        let mut c = Config::default();
        c.shards(3).idle_timeout(Duration::from_secs(2)).max_subscriptions(4);
        let v = c.validated().unwrap();
        assert_eq!((v.shards, v.idle_timeout_ms, v.max_subscriptions), (3, 2000, 4));
        assert!(Config::default().validated().unwrap().shards >= 1);
        assert!(Config::default().max_request_head_bytes(100).validated().is_err());
        assert!(Config::default().shards(MAX_SHARDS + 1).validated().is_err());
        let err = Config::default().max_message_bytes(1 << 20).validated().unwrap_err().to_string();
        assert!(err.contains("outbound_queue_bytes"), "{err}");
        assert!(Config::default().max_message_bytes(1 << 20).outbound_queue_bytes(8 << 20).validated().is_ok());
    }
}
