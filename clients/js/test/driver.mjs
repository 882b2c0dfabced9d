// Drives herald.js for engine/tests/integration/clients.rs: one JSON
// command per line on stdin, one JSON event per line on stdout.
//
//   node --experimental-websocket clients/js/test/driver.mjs ws://127.0.0.1:8080/ws [token|-] [refresh]
//
// With "refresh", the client's getToken asks the test for each token
// ({"ev":"token?"}) and waits for {"do":"token","token":…}.
import { createInterface } from "node:readline";
import { Herald } from "../herald.js";

const [url, token, refresh] = process.argv.slice(2);
const out = (e) => process.stdout.write(JSON.stringify(e) + "\n");
const waiting = [];
const opts = {};
if (token && token !== "-") opts.token = token;
if (refresh === "refresh") {
  opts.getToken = () =>
    new Promise((resolve) => {
      waiting.push(resolve);
      out({ ev: "token?" });
    });
}
const h = new Herald(url, opts);
for (const ev of ["connected", "disconnected", "gap", "join", "leave", "unsubscribed"]) {
  h.on(ev, (e) => out({ ev, ...e }));
}
h.on("error", (e) => out({ ev: "error", code: e.code ?? null, message: String(e.message ?? e) }));
const subs = new Map();
const answer = (n, p) =>
  p.then(
    (value) => out({ ev: "result", n, value }),
    (e) => out({ ev: "result", n, error: e.code ?? String(e) }),
  );

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const c = JSON.parse(line);
  switch (c.do) {
    case "subscribe": {
      const sub = h.subscribe(c.channel, {
        since: c.since,
        onMessage: (m) => out({ ev: "message", ...m }),
      });
      subs.set(c.channel, sub);
      answer(c.n, sub.ready);
      break;
    }
    case "unsubscribe":
      subs.get(c.channel)?.unsubscribe();
      out({ ev: "result", n: c.n, value: null });
      break;
    case "publish":
      answer(c.n, h.publish(c.channel, c.data, { idempotencyKey: c.key }));
      break;
    case "history":
      answer(c.n, h.history(c.channel, { since: c.since, limit: c.limit }));
      break;
    case "presence":
      answer(c.n, h.presence(c.channel));
      break;
    case "position":
      out({ ev: "result", n: c.n, value: subs.get(c.channel)?.since ?? null });
      break;
    case "token":
      waiting.shift()?.(c.token);
      break;
    case "close":
      h.close();
      out({ ev: "result", n: c.n, value: null });
      break;
  }
}
h.close();
