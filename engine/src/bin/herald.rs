//! `herald`: the standalone server.
//!
//! With no arguments it serves `127.0.0.1:8080` with the local broker.
//! Settings come from defaults, then `--config FILE`, then `HERALD_*`
//! environment variables and flags. Every `Config` field has a flag and a
//! variable; docs/operations.md tabulates them (a test keeps that table,
//! this file and `Config::default()` in agreement).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::Parser;
use herald::{Config, Herald, SlowConsumerPolicy};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// WebSocket + SSE fan-out server.
#[derive(Debug, Parser)]
#[command(name = "herald", version, about)]
struct Args {
    /// Address to listen on: `IP:PORT` or `HOST:PORT` (`localhost:8080`;
    /// a name is resolved once, at start, to its first address).
    #[arg(long, env = "HERALD_LISTEN")]
    listen: Option<String>,
    /// Connections the kernel queues for the acceptor (capped by net.core.somaxconn).
    #[arg(long, env = "HERALD_LISTEN_BACKLOG")]
    listen_backlog: Option<u32>,
    /// Shards (threads); 0 = one per core.
    #[arg(long, env = "HERALD_SHARDS")]
    shards: Option<usize>,
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Largest message payload in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Open client connections allowed at once.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Subscriptions allowed per connection.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS")]
    max_subscriptions: Option<usize>,
    /// Bytes queued per connection before the slow-consumer policy applies.
    #[arg(long, env = "HERALD_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// What to do with a subscriber whose queue is full.
    #[arg(long, env = "HERALD_SLOW_CONSUMER", value_parser = ["disconnect", "drop"])]
    slow_consumer: Option<String>,
    /// Largest HTTP request head in bytes (431 above it).
    #[arg(long, env = "HERALD_MAX_REQUEST_HEAD_BYTES")]
    max_request_head_bytes: Option<usize>,
    /// Deadline for a whole request head, in milliseconds.
    #[arg(long, env = "HERALD_REQUEST_HEAD_TIMEOUT_MS")]
    request_head_timeout_ms: Option<u64>,
    /// Server ping interval on idle WebSockets, in milliseconds.
    #[arg(long, env = "HERALD_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// Close a WebSocket silent for this long, in milliseconds.
    #[arg(long, env = "HERALD_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Time a closing connection has to flush and see the client's close, in milliseconds.
    #[arg(long, env = "HERALD_CLOSE_TIMEOUT_MS")]
    close_timeout_ms: Option<u64>,
    /// Keep-alive comment interval on an idle SSE stream, in milliseconds.
    #[arg(long, env = "HERALD_SSE_KEEPALIVE_MS")]
    sse_keepalive_ms: Option<u64>,
    /// Channels whose counters are remembered.
    #[arg(long, env = "HERALD_MAX_CHANNELS")]
    max_channels: Option<usize>,
    /// Messages each channel keeps for recovery and `history` (0: off).
    #[arg(long, env = "HERALD_HISTORY_SIZE")]
    history_size: Option<usize>,
    /// Seconds a message stays in history.
    #[arg(long, env = "HERALD_HISTORY_TTL_S")]
    history_ttl_s: Option<u64>,
    /// Bytes all channels' histories hold together (local broker).
    #[arg(long, env = "HERALD_HISTORY_MAX_BYTES")]
    history_max_bytes: Option<usize>,
    /// Messages one recovery replays at most, and the largest history page.
    #[arg(long, env = "HERALD_RECOVERY_MAX")]
    recovery_max: Option<usize>,
    /// Seconds an idempotency key is remembered (0: keys are ignored).
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW_S")]
    idempotency_window_s: Option<u64>,
    /// Idempotency keys remembered at most.
    #[arg(long, env = "HERALD_IDEMPOTENCY_MAX_KEYS")]
    idempotency_max_keys: Option<usize>,
    /// Messages waiting for one shard before publishes are refused as `overloaded`.
    #[arg(long, env = "HERALD_SHARD_QUEUE_CAPACITY")]
    shard_queue_capacity: Option<usize>,
    /// Refuse `publish` commands from WebSocket clients (sets `client_publish = false`).
    #[arg(long, env = "HERALD_NO_CLIENT_PUBLISH", value_parser = BoolishValueParser::new())]
    no_client_publish: bool,
    /// Also serve `GET /echo`, a WebSocket echo endpoint for conformance tests.
    #[arg(long, env = "HERALD_ECHO", value_parser = BoolishValueParser::new())]
    echo: bool,
    /// Also serve `GET /demo`, a multi-device sync page (channels `demo:…`).
    #[arg(long, env = "HERALD_DEMO", value_parser = BoolishValueParser::new())]
    demo: bool,
    /// Accept permessage-deflate on /ws and /echo (each message compressed once, shared).
    #[arg(long, env = "HERALD_COMPRESSION", value_parser = BoolishValueParser::new())]
    compression: bool,
    /// Payloads under this many bytes are sent uncompressed.
    #[arg(long, env = "HERALD_COMPRESSION_MIN_BYTES")]
    compression_min_bytes: Option<usize>,
    /// zlib level of compressed frames (1-9).
    #[arg(long, env = "HERALD_COMPRESSION_LEVEL")]
    compression_level: Option<u32>,
    /// Benchmarks only: compress once per delivery, not once per message.
    #[arg(long, hide = true)]
    bench_compression_per_connection: bool,
    /// Use the `redis` broker at this URL (redis://[user:password@]host:port):
    /// every publish goes through Redis, so many nodes serve one set of channels.
    #[arg(long, env = "HERALD_REDIS", conflicts_with = "redis_cluster", hide_env_values = true)]
    redis: Option<String>,
    /// Use the `redis-cluster` broker (sharded pub/sub) with these seed URLs.
    #[arg(long, env = "HERALD_REDIS_CLUSTER", value_delimiter = ',', hide_env_values = true)]
    redis_cluster: Option<Vec<String>>,
    /// PEM bundle of the CAs trusted for rediss:// URLs (default: the system's).
    #[arg(long, env = "HERALD_REDIS_TLS_CA")]
    redis_tls_ca: Option<String>,
    /// Serve TLS only (wss://, https://) with this PEM certificate chain; needs --tls-key.
    #[arg(long, env = "HERALD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<String>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "HERALD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<String>,
    /// The server API key: POST /publish and GET /history then need
    /// `Authorization: Bearer <key>` (prefer the variable: flags show in `ps`).
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Verify connection tokens (JWT, HS256/384/512) signed with this secret
    /// (sets `[auth] hmac_secret`; prefer the variable or the file).
    #[arg(long, env = "HERALD_AUTH_HMAC_SECRET", hide_env_values = true)]
    auth_hmac_secret: Option<String>,
    /// Verify connection tokens (RS*, PS*, ES*, EdDSA) with this PEM public
    /// key (sets `[auth] public_key_file`).
    #[arg(long, env = "HERALD_AUTH_PUBLIC_KEY_FILE")]
    auth_public_key_file: Option<String>,
    /// Origins whose pages may use Herald (comma separated; `*` = all).
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Option<Vec<String>>,
    /// The application's connect hook (sets `[proxy] connect_url`).
    #[arg(long, env = "HERALD_PROXY_CONNECT_URL")]
    proxy_connect_url: Option<String>,
    /// The application's subscribe hook (sets `[proxy] subscribe_url`).
    #[arg(long, env = "HERALD_PROXY_SUBSCRIBE_URL")]
    proxy_subscribe_url: Option<String>,
    /// The application's publish hook (sets `[proxy] publish_url`).
    #[arg(long, env = "HERALD_PROXY_PUBLISH_URL")]
    proxy_publish_url: Option<String>,
    /// Seconds a node's presence entries live in Redis without a refresh.
    #[arg(long, env = "HERALD_PRESENCE_TTL_S")]
    presence_ttl_s: Option<u64>,
    /// Prefix of Herald's Redis keys and channels.
    #[arg(long, env = "HERALD_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Deadline of one Redis command, in milliseconds.
    #[arg(long, env = "HERALD_REDIS_TIMEOUT_MS")]
    redis_timeout_ms: Option<u64>,
    /// Expiry of a channel's counter in Redis after its last publish, in milliseconds; 0 = never.
    #[arg(long, env = "HERALD_REDIS_COUNTER_TTL_MS")]
    redis_counter_ttl_ms: Option<u64>,
    /// Seconds to drain connections on SIGINT/SIGTERM.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Print the configuration that defaults, the file, the environment and
    /// the flags give, as TOML, check it, and exit without serving.
    #[arg(long)]
    print_config: bool,
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = args.$f { c.$f = v; } )* };
    }
    if let Some(l) = &args.listen {
        c.listen = resolve(l)?;
    }
    set!(listen_backlog, shards, max_message_bytes, max_connections, max_subscriptions, outbound_queue_bytes, max_request_head_bytes);
    set!(
        request_head_timeout_ms,
        ping_interval_ms,
        idle_timeout_ms,
        close_timeout_ms,
        sse_keepalive_ms,
        max_channels,
        shard_queue_capacity
    );
    set!(history_size, history_ttl_s, history_max_bytes, recovery_max, idempotency_window_s, idempotency_max_keys);
    if let Some(p) = &args.slow_consumer {
        c.slow_consumer = p.parse::<SlowConsumerPolicy>()?;
    }
    if args.no_client_publish {
        c.client_publish = false;
    }
    if args.echo {
        c.echo = true;
    }
    if args.demo {
        c.demo = true;
    }
    if args.compression {
        c.compression = true;
    }
    if args.bench_compression_per_connection {
        c.compression_per_connection = true;
    }
    set!(compression_min_bytes, compression_level);
    if let Some(url) = &args.redis {
        c.redis = Some(url.clone());
        c.redis_cluster.clear();
    }
    if let Some(urls) = &args.redis_cluster {
        c.redis_cluster = urls.clone();
        c.redis = None;
    }
    for (v, f) in [(&args.redis_tls_ca, &mut c.redis_tls_ca), (&args.tls_cert, &mut c.tls_cert), (&args.tls_key, &mut c.tls_key)] {
        if let Some(v) = v {
            *f = Some(v.clone());
        }
    }
    if let Some(k) = &args.api_key {
        c.api_key = Some(herald::auth::Secret::new(k.clone()));
    }
    if let Some(s) = &args.auth_hmac_secret {
        c.auth_hmac_secret(s.clone());
    }
    if let Some(f) = &args.auth_public_key_file {
        c.auth.get_or_insert_with(herald::AuthConfig::default).public_key_file = Some(f.clone());
    }
    if let Some(o) = &args.allowed_origins {
        c.allowed_origins = o.clone();
    }
    for (url, field) in [
        (&args.proxy_connect_url, (|p| &mut p.connect_url) as fn(&mut herald::ProxyConfig) -> &mut Option<String>),
        (&args.proxy_subscribe_url, |p| &mut p.subscribe_url),
        (&args.proxy_publish_url, |p| &mut p.publish_url),
    ] {
        if let Some(u) = url {
            *field(c.proxy.get_or_insert_with(herald::ProxyConfig::default)) = Some(u.clone());
        }
    }
    set!(presence_ttl_s);
    if let Some(p) = &args.redis_prefix {
        c.redis_prefix = p.clone();
    }
    set!(redis_timeout_ms, redis_counter_ttl_ms);
    Ok(c)
}

/// The configuration as it is shown (logged, printed): secrets are
/// `<redacted>` already, and so are the passwords of URLs (Redis, hooks).
fn shown(config: &Config) -> Option<toml::Table> {
    let redact = |v: &mut toml::Value| {
        if let toml::Value::String(u) = v {
            *u = herald::config::redact_url(u);
        }
    };
    let toml::Value::Table(mut t) = toml::Value::try_from(config).ok()? else { return None };
    if let Some(v) = t.get_mut("redis") {
        redact(v);
    }
    if let Some(toml::Value::Array(urls)) = t.get_mut("redis_cluster") {
        urls.iter_mut().for_each(redact);
    }
    if let Some(toml::Value::Table(proxy)) = t.get_mut("proxy") {
        for key in ["connect_url", "subscribe_url", "publish_url"] {
            if let Some(v) = proxy.get_mut(key) {
                redact(v);
            }
        }
    }
    Some(t)
}

/// Logs, once, where the configuration came from and every setting that
/// differs from its default (secrets and URL passwords as `<redacted>`).
fn log_config(file: Option<&std::path::Path>, config: &Config) {
    let (Some(now), Some(default)) = (shown(config), shown(&Config::default())) else { return };
    let changed: Vec<String> = now.iter().filter(|(k, v)| default.get(*k) != Some(v)).map(|(k, v)| format!("{k}={v}")).collect();
    let file = file.map_or_else(|| "none".to_string(), |p| p.display().to_string());
    let changed = if changed.is_empty() { "none (all defaults)".to_string() } else { changed.join(" ") };
    tracing::info!(%file, %changed, "configuration");
}

/// `--listen`'s address: a socket address as it is, else a `host:port`
/// resolved (its first address, IPv4 first: `localhost` means 127.0.0.1).
fn resolve(listen: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = listen.parse() {
        return Ok(a);
    }
    let addrs: Vec<std::net::SocketAddr> = listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {listen:?} is neither IP:PORT nor a HOST:PORT that resolves"))?
        .collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().with_context(|| format!("--listen {listen:?} resolves to no address"))
}

/// Each cause of `e` once: a cause whose text its parent's message already
/// contains is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut kept: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !kept.iter().any(|k| k.contains(&text)) {
            kept.push(text);
        }
    }
    kept.join(": ")
}

/// The parser, each flag's help ending with its default (from
/// `Config::default()`, so the help and the defaults cannot drift).
fn command() -> clap::Command {
    use clap::CommandFactory;
    let defaults = toml::Value::try_from(Config::default()).ok();
    let mut cmd = Args::command();
    let ids: Vec<String> = cmd.get_arguments().map(|a| a.get_id().to_string()).collect();
    for id in ids {
        let Some(v) = defaults.as_ref().and_then(|d| d.get(&id)) else { continue };
        let shown = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(a) if a.is_empty() => "none".into(),
            other => other.to_string(),
        };
        cmd = cmd.mut_arg(&id, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {shown}]"))
        });
    }
    cmd
}

async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = match <Args as clap::FromArgMatches>::from_arg_matches(&command().get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = config(&args)?;
    // Checked before anything is bound: a bad setting is reported as
    // itself, not as whatever binding the port says.
    config.validated()?;
    if args.print_config {
        // Printed as given (`shards = 0` stays "one per core"), secrets
        // and URL passwords redacted.
        let table = shown(&config).context("cannot render the configuration")?;
        print!("{}", toml::to_string(&table).context("cannot render the configuration")?);
        return Ok(());
    }
    log_config(args.config.as_deref(), &config);
    let herald = Herald::start(config).context("cannot start herald")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let which = signal().await?;
        tracing::info!(signal = which, "draining connections");
        herald.shutdown(Duration::from_secs(args.shutdown_grace_secs)).await;
        anyhow::Ok(())
    })
}
