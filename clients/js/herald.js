// herald.js: the client of Herald (https://github.com/…/herald), for
// browsers and Node >= 20. One ES module, no dependencies, no build step;
// Herald also serves it at GET /herald.js.
//
//   import { Herald } from "/herald.js";
//   const h = new Herald("wss://rt.example.com/ws", { getToken: () => fetch("/token").then(r => r.text()) });
//   h.on("gap", ({ channel }) => reloadFromServer(channel));
//   const sub = h.subscribe("board:groceries", { onMessage: ({ offset, data }) => render(data) });
//   const { offset } = await h.publish("board:groceries", { op: "add", text: "milk" });
//
// What it does for you: reconnects with full-jitter backoff (500 ms
// doubling to 20 s, the first attempt jittered too, so a node restart does
// not bring every client back in the same millisecond); resubscribes every
// channel with `since` = its last position, so what was published
// meanwhile arrives, once, in order; raises `gap` when that is not possible
// (history too short, a new epoch, messages lost), so the page reloads its
// state instead of silently missing changes; refreshes its token with
// `getToken` before it expires (and after close 4001); matches every
// command to its reply by `id`. Browsers and Node answer the server's
// pings by themselves.
//
// `transport: "sse"` receives over Server-Sent Events (one EventSource per
// channel, reopened from its last position) where WebSocket is blocked; it
// cannot publish.

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 20000;
const COMMAND_TIMEOUT_MS = 10000;
const CONNECT_TIMEOUT_MS = 10000;
/** A connection that lived less than this did not really succeed: the backoff keeps growing. */
const STABLE_MS = 5000;
/** setTimeout's longest delay. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Commands waiting for a connection at most; more are refused at once. */
const MAX_QUEUED = 1000;
/** A token is refreshed this long before its `exp`. */
const REFRESH_AHEAD_S = 30;

/** Close codes after which reconnecting would only be refused again. */
const FINAL_CODES = new Set([4002, 4003]);

/** A command that failed: `code` is Herald's error code (`forbidden`, `unavailable`, …). */
export class HeraldError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
}

/** The `exp` of a JWT, in seconds, if it has one. */
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1];
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** One channel the client wants, across reconnects. */
class Subscription {
  constructor(client, channel, opts) {
    this.client = client;
    this.channel = channel;
    this.onMessage = opts.onMessage ?? (() => {});
    this.onJoin = opts.onJoin ?? null;
    this.onLeave = opts.onLeave ?? null;
    /** The last position received, `{epoch, offset}`, or null. */
    this.position = opts.since ? parsePosition(opts.since) : null;
    this.active = true;
    this._ready = null;
    this.ready = new Promise((resolve, reject) => (this._ready = { resolve, reject }));
    // Never an unhandled rejection if the caller does not await it.
    this.ready.catch(() => {});
  }

  /** `epoch:offset`, to resume from later (also across page loads). */
  get since() {
    return this.position ? `${this.position.epoch}:${this.position.offset}` : null;
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._unsubscribe(this);
  }
}

function parsePosition(s) {
  const i = s.lastIndexOf(":");
  return i > 0 ? { epoch: s.slice(0, i), offset: Number(s.slice(i + 1)) } : null;
}

export class Herald {
  /**
   * @param {string} url  ws(s)://host/ws (or http(s)://host/sse with transport "sse")
   * @param {object} [opts]
   * @param {string} [opts.token]  a connection token
   * @param {() => Promise<string>|string} [opts.getToken]  fetches a fresh token (before each connect, and before `exp`)
   * @param {Function} [opts.WebSocket]  a WebSocket constructor, where there is no global one
   * @param {Function} [opts.EventSource]  likewise for transport "sse"
   * @param {"ws"|"sse"} [opts.transport]
   */
  constructor(url, opts = {}) {
    this.url = url;
    this.opts = opts;
    this.transport = opts.transport ?? (/^https?:/.test(url) ? "sse" : "ws");
    this.token = opts.token ?? null;
    this.state = "connecting";
    this.subs = new Map();
    this.listeners = new Map();
    this.pending = new Map();
    this.queued = [];
    this.nextId = 1;
    this.attempt = 0;
    this.ws = null;
    this.sources = new Map();
    this.timers = new Set();
    this.refreshTimer = null;
    this.closed = false;
    // A browser that knows it went offline: drop the socket at once (it
    // would otherwise wait for TCP to notice), and come back as soon as it
    // is online again.
    if (typeof globalThis.addEventListener === "function" && typeof window !== "undefined") {
      this._offline = () => {
        const ws = this.ws;
        if (!ws) return;
        try {
          ws.close(4000, "offline");
        } catch {}
        this._lost(ws, 4000, "offline");
      };
      this._online = () => {
        // Only while waiting to retry (not while a connect is under way).
        if (this.state !== "connected" && !this.closed && this.transport === "ws" && !this.ws && this.retrying) {
          for (const t of this.timers) clearTimeout(t);
          this.timers.clear();
          this.retrying = false;
          this._connect(Math.random() * 100);
        }
      };
      globalThis.addEventListener("offline", this._offline);
      globalThis.addEventListener("online", this._online);
    }
    this._connect(0);
  }

  /** Listens to `connected`, `disconnected` ({code, reason, reconnect}), `gap` ({channel, reason}), `join`, `leave`, `error`. Returns a function that stops listening. */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event)?.delete(fn);
  }

  _emit(event, value) {
    for (const fn of this.listeners.get(event) ?? []) {
      try {
        fn(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  /** Subscribes to `channel`: `onMessage({channel, offset, data})` for each message, in order. `since` resumes from a saved position. */
  subscribe(channel, opts = {}) {
    const old = this.subs.get(channel);
    if (old) old.unsubscribe();
    const sub = new Subscription(this, channel, opts);
    if (this.closed) {
      sub.active = false;
      sub._ready.reject(new HeraldError("closed", "the client is closed"));
      return sub;
    }
    this.subs.set(channel, sub);
    if (this.transport === "sse") this._openSource(sub);
    else if (this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  _unsubscribe(sub) {
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    if (this.transport === "sse") {
      this.sources.get(sub)?.close();
      this.sources.delete(sub);
    } else if (this.state === "connected") {
      this._command({ op: "unsubscribe", channel: sub.channel }).catch(() => {});
    }
  }

  /** Publishes `data` (any JSON value) to `channel`; resolves to `{offset, epoch}`. With `idempotencyKey`, a retry publishes once. */
  publish(channel, data, opts = {}) {
    const cmd = { op: "publish", channel, data };
    if (opts.idempotencyKey) cmd.idempotency_key = opts.idempotencyKey;
    return this._command(cmd).then((r) => ({ offset: r.offset, epoch: r.epoch }));
  }

  /** A page of `channel`'s history: `{epoch, offset, publications, complete}`. */
  history(channel, opts = {}) {
    const cmd = { op: "history", channel };
    if (opts.since) cmd.since = opts.since;
    if (opts.limit) cmd.limit = opts.limit;
    return this._command(cmd);
  }

  /** Who is subscribed to `channel`: `{clients, users, truncated?}`. */
  presence(channel) {
    return this._command({ op: "presence", channel });
  }

  /** Closes for good. */
  close() {
    this.closed = true;
    if (this._offline) {
      globalThis.removeEventListener("offline", this._offline);
      globalThis.removeEventListener("online", this._online);
    }
    this.state = "closed";
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    clearTimeout(this.refreshTimer);
    this.ws?.close(1000);
    for (const s of this.sources.values()) s.close();
    this.sources.clear();
    this._failAll(new HeraldError("closed", "the client was closed"));
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this.timers.delete(t);
      fn();
    }, ms);
    this.timers.add(t);
    return t;
  }

  /** The delay before reconnect attempt `n` (1, 2, …): full jitter. */
  _backoff(n) {
    const cap = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** Math.max(0, n - 1));
    return Math.random() * cap;
  }

  async _freshToken() {
    if (!this.opts.getToken) return this.token;
    this.token = await this.opts.getToken();
    return this.token;
  }

  _withToken(url, token) {
    if (!token) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  async _connect(delay) {
    if (delay > 0) {
      this.retrying = true;
      await new Promise((r) => this._later(delay, r));
      if (!this.retrying) return; // `online` started another attempt
      this.retrying = false;
    }
    if (this.closed || this.transport === "sse") return;
    let token;
    try {
      token = await this._freshToken();
    } catch (e) {
      this._emit("error", e);
      return this._retry();
    }
    if (this.closed) return;
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error("no WebSocket here: pass opts.WebSocket (Node 20: run with --experimental-websocket)");
    const ws = new WS(this._withToken(this.url, token));
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.state = "connected";
      this.openedAt = Date.now();
      this._scheduleRefresh();
      for (const sub of this.subs.values()) this._sendSubscribe(sub);
      const queued = this.queued.splice(0);
      for (const q of queued) this._send(q);
      this._emit("connected", {});
    };
    ws.onmessage = (ev) => this._receive(ev.data);
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
    // A connect that fails: some runtimes (Node 20's) fire only `error`,
    // never `close`; and one that hangs is given up after a while.
    ws.onerror = () => {
      if (this.ws === ws && this.state !== "connected") this._lost(ws, 1006, "connect failed");
    };
    this._later(CONNECT_TIMEOUT_MS, () => {
      if (this.ws === ws && this.state !== "connected") {
        try {
          ws.close();
        } catch {}
        this._lost(ws, 1006, "connect timed out");
      }
    });
  }

  /** The connection `ws` ended with `code`: fail what waited on it, and reconnect unless told not to. */
  _lost(ws, code, reason) {
    if (this.ws !== ws) return;
    this.ws = null;
    const was = this.state;
    this.state = this.closed ? "closed" : "disconnected";
    clearTimeout(this.refreshTimer);
    // In flight when the connection went: their outcome is unknown (a
    // publish may have been published; retry it with its idempotency key).
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new HeraldError("disconnected", "the connection closed before the reply"));
    }
    const reconnect = !this.closed && !FINAL_CODES.has(code);
    // Only a connection that lasted resets the backoff: a server that
    // accepts and closes at once is not hit in a loop.
    const lasted = was === "connected" && Date.now() - this.openedAt >= STABLE_MS;
    if (lasted) this.attempt = 0;
    if (was === "connected" || !this.closed) this._emit("disconnected", { code, reason, reconnect });
    if (!reconnect) {
      if (!this.closed) {
        // Final: the server said so (4002, 4003). Nothing waits any more.
        this.close();
        this._failAll(new HeraldError("disconnected", `closed by the server: ${code} ${reason}`));
      }
      return;
    }
    // 4001 after a while: the token expired; get a new one right away.
    if (code === 4001 && lasted) return this._connect(Math.random() * MIN_DELAY_MS);
    this._retry();
  }

  _retry() {
    if (this.closed) return;
    this.attempt += 1;
    this._connect(this._backoff(this.attempt));
  }

  /** Refreshes the token ahead of its `exp` with an `auth` command. */
  _scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (!this.opts.getToken || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const inMs = Math.max(1000, (exp - REFRESH_AHEAD_S) * 1000 - Date.now());
    if (inMs > MAX_TIMER_MS) {
      this.refreshTimer = setTimeout(() => this._scheduleRefresh(), MAX_TIMER_MS);
      return;
    }
    this.refreshTimer = setTimeout(async () => {
      try {
        const token = await this._freshToken();
        await this._command({ op: "auth", token });
        this._scheduleRefresh();
      } catch (e) {
        this._emit("error", e);
        // Try again a little later; past `exp` the server closes with 4001.
        if (!this.closed) this.refreshTimer = setTimeout(() => this._scheduleRefresh(), 5000);
      }
    }, inMs);
  }

  _sendSubscribe(sub) {
    const cmd = { op: "subscribe", channel: sub.channel };
    const since = sub.since;
    if (since) cmd.since = since;
    this._command(cmd, true).then(
      (r) => {
        if (!sub.active) return;
        const gap = since && r.recovered === false;
        if (!sub.position || gap || sub.position.epoch !== r.epoch) {
          sub.position = { epoch: r.epoch, offset: r.offset };
        }
        sub._ready.resolve({ epoch: r.epoch, offset: r.offset, recovered: r.recovered });
        if (gap) this._emit("gap", { channel: sub.channel, reason: "not_recovered" });
      },
      (e) => {
        if (e.code === "disconnected" || !sub.active) return; // resubscribed on reconnect
        if (["unavailable", "overloaded", "timeout"].includes(e.code)) {
          // Passing trouble (Redis, a hook): try again while connected.
          this._later(this._backoff(2), () => {
            if (sub.active && this.state === "connected" && this.subs.get(sub.channel) === sub) this._sendSubscribe(sub);
          });
          return;
        }
        sub._ready.reject(e);
        if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
        sub.active = false;
        e.channel = sub.channel;
        this._emit("error", e);
      },
    );
  }

  /** Sends a command and resolves with its reply (rejects with a HeraldError). */
  _command(cmd, now = false) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new HeraldError("closed", "the client was closed"));
      const id = this.nextId++;
      const entry = { cmd: { ...cmd, id }, resolve, reject, timer: null };
      if (this.state === "connected" || now) {
        this._send(entry);
      } else if (this.transport === "sse") {
        reject(new HeraldError("bad_request", "the SSE transport only receives (publish from your backend)"));
      } else if (this.queued.length >= MAX_QUEUED) {
        reject(new HeraldError("overloaded", `more than ${MAX_QUEUED} commands wait for a connection`));
      } else {
        // It times out while it waits, too (and is not sent after).
        entry.timer = setTimeout(() => {
          const i = this.queued.indexOf(entry);
          if (i >= 0) {
            this.queued.splice(i, 1);
            reject(new HeraldError("timeout", `not connected within ${COMMAND_TIMEOUT_MS} ms`));
          }
        }, COMMAND_TIMEOUT_MS);
        this.queued.push(entry);
      }
    });
  }

  _send(entry) {
    const id = entry.cmd.id;
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      if (this.pending.delete(id)) entry.reject(new HeraldError("timeout", `no reply within ${COMMAND_TIMEOUT_MS} ms`));
    }, COMMAND_TIMEOUT_MS);
    this.pending.set(id, entry);
    try {
      this.ws.send(JSON.stringify(entry.cmd));
    } catch (e) {
      this.pending.delete(id);
      clearTimeout(entry.timer);
      entry.reject(new HeraldError("disconnected", String(e)));
    }
  }

  _failAll(err) {
    for (const q of this.queued.splice(0)) {
      clearTimeout(q.timer);
      q.reject(err);
    }
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  _receive(text) {
    let m;
    try {
      m = JSON.parse(text);
    } catch {
      return;
    }
    if (m.id !== undefined && this.pending.has(m.id)) {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.op === "error") p.reject(new HeraldError(m.code, m.message));
      else p.resolve(m);
      return;
    }
    if (m.op === undefined && typeof m.offset === "number") return this._message(m);
    const sub = m.channel !== undefined ? this.subs.get(m.channel) : undefined;
    switch (m.op) {
      case "epoch":
        if (sub) {
          sub.position = { epoch: m.epoch, offset: 0 };
          this._emit("gap", { channel: m.channel, reason: "epoch" });
        }
        break;
      case "lagged":
        if (sub) {
          if (sub.position) sub.position.offset = Math.max(sub.position.offset, m.missed_to);
          this._emit("gap", { channel: m.channel, reason: "lagged", from: m.missed_from, to: m.missed_to });
        }
        break;
      case "join":
      case "leave": {
        const e = { channel: m.channel, user: m.user };
        if (sub) (m.op === "join" ? sub.onJoin : sub.onLeave)?.(e);
        this._emit(m.op, e);
        break;
      }
      case "unsubscribed":
        // The server removed the subscription (the server API).
        if (sub) {
          sub.active = false;
          this.subs.delete(m.channel);
          this._emit("unsubscribed", { channel: m.channel });
        }
        break;
      default:
        break;
    }
  }

  _message(m, epoch) {
    const sub = this.subs.get(m.channel);
    if (!sub || !sub.active) return;
    if (sub.position) {
      if (epoch && epoch !== sub.position.epoch) {
        sub.position = { epoch, offset: 0 };
      }
      // Delivered already (a replay overlapping what came live).
      if (m.offset <= sub.position.offset) return;
      sub.position.offset = m.offset;
    }
    try {
      sub.onMessage({ channel: m.channel, offset: m.offset, data: m.data });
    } catch (e) {
      queueMicrotask(() => {
        throw e;
      });
    }
  }

  // Server-Sent Events: one EventSource per channel. The browser resumes
  // with Last-Event-ID by itself; a stream it gave up on (a 401 after the
  // token expired, say) is opened again with a fresh token and the last
  // position as `last_event_id`.
  async _openSource(sub, attempt = 0) {
    if (this.closed || !sub.active) return;
    let token;
    try {
      token = await this._freshToken();
    } catch (e) {
      this._emit("error", e);
    }
    if (this.closed || !sub.active) return;
    const ES = this.opts.EventSource ?? globalThis.EventSource;
    if (!ES) throw new Error("no EventSource here: pass opts.EventSource");
    let url = this.url + (this.url.includes("?") ? "&" : "?") + "channel=" + encodeURIComponent(sub.channel);
    if (sub.since) url += "&last_event_id=" + encodeURIComponent(sub.since);
    const es = new ES(this._withToken(url, token));
    this.sources.set(sub, es);
    const asked = sub.since;
    es.onopen = () => {
      this.state = "connected";
      this._emit("connected", { channel: sub.channel });
    };
    es.addEventListener("subscribed", (ev) => {
      attempt = 0; // the stream works: the backoff starts over next time
      const r = JSON.parse(ev.data);
      const gap = (asked || sub.position) && r.recovered === false;
      if (!sub.position || gap) sub.position = { epoch: r.epoch, offset: r.offset };
      sub._ready.resolve({ epoch: r.epoch, offset: r.offset, recovered: r.recovered });
      if (gap) this._emit("gap", { channel: sub.channel, reason: "not_recovered" });
    });
    es.addEventListener("epoch", (ev) => {
      const r = JSON.parse(ev.data);
      sub.position = { epoch: r.epoch, offset: 0 };
      this._emit("gap", { channel: sub.channel, reason: "epoch" });
    });
    es.addEventListener("lagged", (ev) => {
      const r = JSON.parse(ev.data);
      if (sub.position) sub.position.offset = Math.max(sub.position.offset, r.missed_to);
      this._emit("gap", { channel: sub.channel, reason: "lagged", from: r.missed_from, to: r.missed_to });
    });
    for (const op of ["join", "leave"]) {
      es.addEventListener(op, (ev) => {
        const r = JSON.parse(ev.data);
        const e = { channel: r.channel, user: r.user };
        (op === "join" ? sub.onJoin : sub.onLeave)?.(e);
        this._emit(op, e);
      });
    }
    es.onmessage = (ev) => {
      let m;
      try {
        m = JSON.parse(ev.data);
      } catch {
        return;
      }
      const epoch = ev.lastEventId ? parsePosition(ev.lastEventId)?.epoch : undefined;
      this._message(m, epoch);
    };
    es.onerror = () => {
      // Reopened by hand rather than by the browser: the browser's retry
      // carries no Last-Event-ID before the stream's first message, and
      // this one carries the position from the `subscribed` event too.
      if (this.sources.get(sub) !== es) return;
      es.close();
      this.sources.delete(sub);
      this._emit("disconnected", { channel: sub.channel, reconnect: true });
      this._later(this._backoff(attempt + 1), () => this._openSource(sub, attempt + 1));
    };
  }
}
