//! The engine: what the public handle, the shards and the HTTP handlers
//! share. It owns the router and the broker and is the shards'
//! [`Upstream`]; it holds nothing broker-specific.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::broker::{Broker, HistoryError, Page, Pending, Start};
use crate::config::Config;
use crate::message::{Position, PublishError, PublishFuture, Published};
use crate::metrics::{Metrics, ShardMetrics};
use crate::proto::json::Payload;
use crate::router::Router;
use crate::shard::inbox::Inbox;
use crate::shard::{self, Control, Permit, Shard, Upstream};

pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) router: Arc<Router>,
    pub(crate) broker: Broker,
    /// The token verifier, when `[auth]` is set.
    pub(crate) auth: Option<crate::auth::Auth>,
    /// The namespaces' rules.
    pub(crate) rules: crate::config::ChannelRules,
    /// The application's hooks, when `[proxy]` is set.
    pub(crate) proxy: Option<crate::proxy::Proxy>,
    /// Who is subscribed to the presence channels, on this node.
    pub(crate) presence: Arc<crate::presence::Presence>,
    /// When the engine started (`uptime_s` of `/api/stats`).
    pub(crate) started: std::time::Instant,
    /// Server API calls by call and result (ok, error).
    api_calls: [[crate::metrics::Counter; 2]; 6],
    pub(crate) controls: Box<[mpsc::Sender<Control>]>,
    open: Arc<AtomicUsize>,
    rr: AtomicUsize,
    shutting_down: AtomicBool,
    pub(crate) local_addr: Option<SocketAddr>,
    pub(crate) done: Mutex<Vec<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.config.shards).field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

/// The server API's calls, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiCall {
    Broadcast = 0,
    Disconnect = 1,
    Unsubscribe = 2,
    Channels = 3,
    Stats = 4,
    Presence = 5,
}

impl ApiCall {
    const LABELS: [&'static str; 6] = ["broadcast", "disconnect", "unsubscribe", "channels", "stats", "presence"];
}

/// A server API command that every node carries out for its own
/// connections.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum NodeCommand {
    Disconnect { user: String },
    Unsubscribe { user: String, channel: String },
}

impl NodeCommand {
    /// The command as it travels between nodes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<NodeCommand> {
        let cmd: NodeCommand = serde_json::from_slice(bytes).ok()?;
        match &cmd {
            NodeCommand::Unsubscribe { channel, .. } if crate::proto::channel::validate(channel).is_err() => None,
            _ => Some(cmd),
        }
    }
}

/// A shard did not take the work: its control channel is closed (the
/// engine is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shard is stopping")]
pub(crate) struct ShardGone;

impl Engine {
    // The parts `Herald::launch` made, each once.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        router: Arc<Router>,
        broker: Broker,
        presence: Arc<crate::presence::Presence>,
        auth: Option<crate::auth::Auth>,
        controls: Box<[mpsc::Sender<Control>]>,
        local_addr: Option<SocketAddr>,
        done: Vec<oneshot::Receiver<()>>,
    ) -> Engine {
        Engine {
            metrics: Metrics::new(config.shards),
            rules: crate::config::ChannelRules::from_config(&config),
            proxy: config.proxy.as_ref().map(|p| crate::proxy::Proxy::from_config(p, config.max_message_bytes)),
            started: std::time::Instant::now(),
            api_calls: Default::default(),
            presence,
            router,
            broker,
            auth,
            controls,
            open: Arc::new(AtomicUsize::new(0)),
            rr: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            local_addr,
            done: Mutex::new(done),
            config,
        }
    }

    /// The metrics slot of the shard running this thread, or the global one.
    pub(crate) fn metrics_here(&self) -> &ShardMetrics {
        match shard::current(self) {
            Some(s) => self.metrics.shard(s.id),
            None => self.metrics.global(),
        }
    }

    pub(crate) fn acquire_permit(&self) -> Option<Permit> {
        Permit::acquire(&self.open, self.config.max_connections)
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Marks the engine as shutting down; false if it already was.
    pub(crate) fn begin_shutdown(&self) -> bool {
        !self.shutting_down.swap(true, Ordering::AcqRel)
    }

    /// The next shard in round-robin order.
    pub(crate) fn next_shard(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % self.config.shards
    }

    /// The shard for a new connection: this thread's shard if the request
    /// is served by one (its socket is already there), else round-robin.
    /// The flag says whether the socket is already on the chosen shard.
    pub(crate) fn pick_shard(&self) -> (usize, bool) {
        match shard::current(self) {
            Some(s) => (s.id, true),
            None => (self.next_shard(), false),
        }
    }

    pub(crate) async fn send_control(&self, shard: usize, ctl: Control) -> Result<(), ShardGone> {
        self.controls[shard].send(ctl).await.map_err(|_| ShardGone)
    }

    /// Runs `f` on shard `target`: at once if this thread is that shard.
    pub(crate) async fn on_shard(&self, target: usize, f: impl FnOnce(&Rc<Shard>) + Send + 'static) -> Result<(), ShardGone> {
        let f = match shard::current(self) {
            Some(s) if s.id == target => {
                f(&s);
                return Ok(());
            }
            _ => f,
        };
        self.send_control(target, Control::Run(Box::new(f))).await
    }

    /// Runs `f` on every shard and collects what each returns (shards that
    /// are stopping give nothing).
    pub(crate) async fn on_every_shard<T: Send + 'static>(&self, f: impl Fn(&Rc<Shard>) -> T + Clone + Send + 'static) -> Vec<T> {
        let mut answers = Vec::with_capacity(self.controls.len());
        for id in 0..self.controls.len() {
            let (tx, rx) = oneshot::channel();
            let f = f.clone();
            if self.on_shard(id, move |s| drop(tx.send(f(s)))).await.is_ok() {
                answers.push(rx);
            }
        }
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            if let Ok(t) = rx.await {
                out.push(t);
            }
        }
        out
    }

    /// Carries out `cmd` for this node's connections; returns how many it
    /// touched.
    pub(crate) async fn run_here(&self, cmd: &NodeCommand) -> usize {
        match cmd {
            NodeCommand::Disconnect { user } => {
                let user: Arc<str> = user.as_str().into();
                self.on_every_shard(move |s| s.disconnect_user(&user)).await.into_iter().sum()
            }
            NodeCommand::Unsubscribe { user, channel } => {
                let (user, channel): (Arc<str>, Arc<str>) = (user.as_str().into(), channel.as_str().into());
                self.on_every_shard(move |s| s.unsubscribe_user(&user, &channel)).await.into_iter().sum()
            }
        }
    }

    /// A connection of `user` (none: anonymous) subscribed to `channel`
    /// (`joined`), or its subscription ended. Presence channels only: the
    /// node's table, then (local broker) a join or leave event for the
    /// user's first or last connection, or (Redis) the write into Redis,
    /// which announces them to every node.
    pub(crate) fn presence_changed(&self, channel: &Arc<str>, user: Option<&str>, joined: bool) {
        let rules = self.rules.of(channel);
        if !rules.presence {
            return;
        }
        // Under the table's lock: what this queues (a Redis write, or an
        // event on the shards) is in the order of the changes.
        self.presence.change(channel, user, joined, |count| {
            if self.broker.presence_changed(channel, user.unwrap_or(""), count, rules.join_leave) {
                return;
            }
            let first_or_last = (joined && count == 1) || (!joined && count == 0);
            if let (Some(user), true, true) = (user, first_or_last, rules.join_leave) {
                self.presence.announce(&self.router, channel, user, joined);
            }
        });
    }

    /// A channel's presence: this node's table (local broker), or Redis's
    /// across the nodes.
    pub(crate) fn presence_of(&self, channel: &str) -> Pending<Result<crate::presence::Snapshot, HistoryError>> {
        match self.broker.presence_read(channel, shard::current(self).map(|s| s.id)) {
            Some(read) => Pending::Waiting(read),
            None => Pending::Ready(Ok(self.presence.read(channel))),
        }
    }

    fn render_presence(&self, out: &mut String) {
        use std::fmt::Write as _;
        let p = &self.presence;
        let _ = writeln!(
            out,
            "# HELP herald_presence_entries (channel, user) entries of this node's presence table.\n# TYPE herald_presence_entries gauge\nherald_presence_entries {}",
            p.entries()
        );
        let _ = writeln!(
            out,
            "# HELP herald_presence_events_total Join and leave events queued to the shards.\n# TYPE herald_presence_events_total counter"
        );
        let _ = writeln!(out, "herald_presence_events_total{{event=\"join\"}} {}", p.joins.get());
        let _ = writeln!(out, "herald_presence_events_total{{event=\"leave\"}} {}", p.leaves.get());
        let _ = writeln!(
            out,
            "# HELP herald_presence_events_dropped_total Join and leave events a full shard queue refused.\n# TYPE herald_presence_events_dropped_total counter\nherald_presence_events_dropped_total {}",
            p.dropped.get()
        );
        let _ = writeln!(
            out,
            "# HELP herald_presence_errors_total Presence writes and refreshes Redis did not take.\n# TYPE herald_presence_errors_total counter\nherald_presence_errors_total {}",
            p.errors.get()
        );
    }

    /// Counts a server API call by its answer's status, and returns it.
    pub(crate) fn api_done(&self, call: ApiCall, r: http::Response<crate::http::Body>) -> http::Response<crate::http::Body> {
        self.api_calls[call as usize][usize::from(!r.status().is_success())].inc();
        r
    }

    fn render_api(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ =
            writeln!(out, "# HELP herald_api_calls_total Server API calls, by method and result.\n# TYPE herald_api_calls_total counter");
        for (i, method) in ApiCall::LABELS.iter().enumerate() {
            for (j, result) in ["ok", "error"].iter().enumerate() {
                let _ = writeln!(out, "herald_api_calls_total{{method=\"{method}\",result=\"{result}\"}} {}", self.api_calls[i][j].get());
            }
        }
    }

    fn check_publish(&self, channel: &str, payload: &Payload) -> Result<(), PublishError> {
        crate::proto::channel::validate(channel)?;
        if payload.len() > self.config.max_message_bytes {
            return Err(PublishError::TooLarge { size: payload.len(), max: self.config.max_message_bytes });
        }
        if self.is_shutting_down() {
            return Err(PublishError::ShuttingDown);
        }
        Ok(())
    }

    /// Starts a publish through the broker. Its result is counted by
    /// [`crate::message::count_publish`] once known.
    /// With `key`, a repeat of an earlier publish on the channel within
    /// `idempotency_window_s` publishes nothing and returns the first one's
    /// result.
    pub(crate) fn start_publish(&self, channel: &str, payload: Payload, key: Option<&str>) -> PublishFuture {
        if key.is_some_and(|k| !crate::message::valid_idempotency_key(k)) {
            return PublishFuture::Ready(Some(Err(PublishError::BadIdempotencyKey)));
        }
        match self.check_publish(channel, &payload) {
            Ok(()) => self.broker.publish(&self.router, channel, payload, key, shard::current(self).map(|s| s.id)),
            Err(e) => PublishFuture::Ready(Some(Err(e))),
        }
    }

    /// Publishes and counts the result in `metrics`.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        payload: Payload,
        key: Option<&str>,
        metrics: &ShardMetrics,
    ) -> Result<Published, PublishError> {
        let r = self.start_publish(channel, payload, key).await;
        crate::message::count_publish(metrics, &r);
        r
    }

    pub(crate) fn metrics_text(&self) -> String {
        let open = self.open.load(Ordering::Relaxed) as u64;
        let mut gauges = vec![
            ("herald_open_permits", "Client connections counted against max_connections.", open),
            ("herald_channels", "Channels with subscribers on this node.", self.router.len() as u64),
        ];
        if let Some(n) = self.broker.channels() {
            gauges.push(("herald_channel_counters", "Channels whose offset counters the local broker remembers.", n as u64));
        }
        let mut out = self.metrics.render(&gauges, self.broker.reconnects());
        self.broker.render(&mut out);
        if let Some(p) = &self.proxy {
            p.render(&mut out);
        }
        self.render_api(&mut out);
        self.render_presence(&mut out);
        render_process(&mut out);
        out
    }
}

/// `herald_build_info` and the standard `process_*` metrics of the
/// process, read from `/proc` (Linux; elsewhere only the build info).
fn render_process(out: &mut String) {
    use std::fmt::Write as _;
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(out, "herald_build_info", "gauge", "Always 1; the version of this build.");
    let _ = writeln!(out, "herald_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    // /proc reports times in USER_HZ, 100 on every Linux ABI.
    const HZ: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        head(out, "process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.");
        let _ = writeln!(out, "process_cpu_seconds_total {}", (utime + stime) / HZ);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    if let Some(rss) = kib("VmRSS:") {
        head(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        let _ = writeln!(out, "process_resident_memory_bytes {}", rss * 1024);
    }
    if let Some(vm) = kib("VmSize:") {
        head(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
        let _ = writeln!(out, "process_virtual_memory_bytes {}", vm * 1024);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        head(out, "process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(out, "process_open_fds {}", fds.count());
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(max) =
        limits.lines().find_map(|l| l.strip_prefix("Max open files")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    {
        head(out, "process_max_fds", "gauge", "The soft limit of open file descriptors.");
        let _ = writeln!(out, "process_max_fds {max}");
    }
    let btime = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok()));
    if let (Some(btime), Some(start)) = (btime, field(22)) {
        head(out, "process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch, in seconds.");
        let _ = writeln!(out, "process_start_time_seconds {}", btime + start / HZ);
    }
}

impl Upstream for Engine {
    fn config(&self) -> &Config {
        &self.config
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn inbox(&self, shard: usize) -> &Inbox {
        self.router.inbox(shard)
    }

    fn joined(&self, channel: &str, shard: usize) -> Option<Arc<str>> {
        let (name, first) = self.router.subscribe(channel, shard).ok()?;
        if first {
            self.broker.interest_changed(&name);
        }
        Some(name)
    }

    fn left(&self, channel: &Arc<str>, shard: usize) {
        if self.router.unsubscribe(channel, shard) {
            self.broker.interest_changed(channel);
        }
    }

    fn publish(&self, channel: &str, payload: Payload, key: Option<&str>) -> PublishFuture {
        self.start_publish(channel, payload, key)
    }

    fn starting_point(&self, channel: &str, since: Option<Position>) -> Pending<Result<Start, HistoryError>> {
        self.broker.starting_point(&self.router, channel, since, shard::current(self).map(|s| s.id))
    }

    fn history(&self, channel: &str, since: Option<Position>, limit: usize) -> Pending<Result<Page, HistoryError>> {
        self.broker.history(&self.router, channel, since, limit, shard::current(self).map(|s| s.id))
    }

    fn auth(&self) -> Option<&crate::auth::Auth> {
        self.auth.as_ref()
    }

    fn rules(&self) -> &crate::config::ChannelRules {
        &self.rules
    }

    fn proxy(&self) -> Option<&crate::proxy::Proxy> {
        self.proxy.as_ref()
    }

    fn presence_changed(&self, channel: &Arc<str>, user: Option<&str>, joined: bool) {
        Engine::presence_changed(self, channel, user, joined);
    }

    fn presence(&self, channel: &str) -> Pending<Result<crate::presence::Snapshot, HistoryError>> {
        self.presence_of(channel)
    }
}
