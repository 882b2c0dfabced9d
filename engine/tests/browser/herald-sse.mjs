// herald.js's receive-only SSE mode in Debian's Chromium, for
// engine/tests/integration/browser.rs: the page (of <origin>) subscribes to
// <channel> over <origin>/sse and reports every event as a JSON line.
// Runs until stdin closes.
//
//   node herald-sse.mjs http://127.0.0.1:8080 news
import { launch } from './chromium.mjs';

const [origin, channel] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage();
page.on('pageerror', (e) => process.stdout.write(JSON.stringify({ type: 'pageerror', error: String(e) }) + '\n'));
await page.exposeFunction('report', (e) => process.stdout.write(JSON.stringify(e) + '\n'));
await page.goto(`${origin}/healthz`);
await page.evaluate(async (ch) => {
  const { Herald } = await import('/herald.js');
  const h = new Herald(`http://${location.host}/sse`);
  for (const ev of ['connected', 'disconnected', 'gap']) h.on(ev, (e) => report({ type: ev, ...e }));
  const sub = h.subscribe(ch, { onMessage: (m) => report({ type: 'message', offset: m.offset, data: m.data }) });
  const r = await sub.ready;
  report({ type: 'subscribed', ...r });
}, channel);
process.stdin.resume();
await new Promise((r) => process.stdin.on('end', r));
await browser.close();
