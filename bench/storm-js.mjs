// 1,000 herald.js clients (in this one Node process) on a Herald node that
// is killed and restarted, while another node of the same Redis publishes:
// when each client reconnects (a histogram of the delays after the node is
// back), and whether each recovered what was published while it was away,
// each message once, in order.
//
//   bash bench/storm-js.sh        # builds herald, starts a redis-server, runs this
//   node --experimental-websocket bench/storm-js.mjs <herald-binary> <port-a> <port-b> <redis-url> [clients]
import { spawn } from "node:child_process";
import { Herald } from "../clients/js/herald.js";

const [bin, port, portB, redis, count = "1000"] = process.argv.slice(2);
const n = Number(count);
const base = `127.0.0.1:${port}`;
const other = `127.0.0.1:${portB}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function startNode(at) {
  return spawn(bin, ["--listen", at, "--redis", redis], { stdio: "ignore" });
}

async function waitUp(at) {
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(`http://${at}/healthz`)).ok) return;
    } catch {}
    await sleep(25);
  }
  throw new Error("the node did not start");
}

async function post(channel, body) {
  // Through the node that stays up.
  const r = await fetch(`http://${other}/publish/${channel}`, { method: "POST", body });
  if (!r.ok) throw new Error(`publish: ${r.status}`);
}

const publisher = startNode(other);
let node = startNode(base);
await waitUp(base);
await waitUp(other);
const clients = [];
let restartedAt = 0;
for (let i = 0; i < n; i++) {
  const c = { h: new Herald(`ws://${base}/ws`), received: [], gaps: 0, reconnectedAt: null, connects: 0 };
  c.h.on("connected", () => {
    c.connects += 1;
    if (c.connects === 2) c.reconnectedAt = performance.now();
  });
  c.h.on("gap", () => (c.gaps += 1));
  c.sub = c.h.subscribe(`storm-${i % 10}`, { onMessage: ({ data }) => c.received.push(data) });
  clients.push(c);
}
await Promise.all(clients.map((c) => c.sub.ready));
for (let ch = 0; ch < 10; ch++) await post(`storm-${ch}`, "before");
await sleep(500);
node.kill("SIGKILL");
await new Promise((r) => node.once("exit", r));
// Published while the node is down, on the other node.
for (const m of ["away-1", "away-2", "away-3"]) for (let ch = 0; ch < 10; ch++) await post(`storm-${ch}`, m);
await sleep(500);
node = startNode(base);
await waitUp(base);
restartedAt = performance.now();
const deadline = restartedAt + 30000;
while (clients.some((c) => c.reconnectedAt === null) && performance.now() < deadline) await sleep(50);
for (let ch = 0; ch < 10; ch++) await post(`storm-${ch}`, "after");
await sleep(1000);

const delays = clients.filter((c) => c.reconnectedAt !== null).map((c) => c.reconnectedAt - restartedAt).sort((a, b) => a - b);
const q = (p) => delays[Math.min(delays.length - 1, Math.floor(p * delays.length))];
const buckets = [100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000];
const hist = buckets.map((b, i) => [`<= ${b} ms`, delays.filter((d) => d <= b && (i === 0 || d > buckets[i - 1])).length]);
const want = "before,away-1,away-2,away-3,after";
const ok = clients.filter((c) => c.received.join(",") === want).length;
const gapped = clients.filter((c) => c.gaps > 0).length;
console.log(
  JSON.stringify(
    {
      clients: n,
      reconnected: delays.length,
      after_restart_ms: { min: Math.round(delays[0]), p50: Math.round(q(0.5)), p90: Math.round(q(0.9)), p99: Math.round(q(0.99)), max: Math.round(delays[delays.length - 1]) },
      histogram: Object.fromEntries(hist),
      recovered_every_message_once_in_order: ok,
      told_of_a_gap: gapped,
      example: clients.find((c) => c.received.join(",") !== want)?.received ?? null,
    },
    null,
    1,
  ),
);
for (const c of clients) c.h.close();
node.kill("SIGKILL");
publisher.kill("SIGKILL");
process.exit(0);
