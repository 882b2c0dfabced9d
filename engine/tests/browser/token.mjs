// herald.js in Debian's Chromium with a token that expires, for
// engine/tests/integration/browser.rs: the page's getToken asks this script,
// which signs HS256 tokens for user 42 (the first expiring in 31 s, so
// herald.js refreshes it after about a second, the next in an hour). The
// page subscribes to user:42 and reports every event; one JSON line each.
// Runs until stdin closes.
//
//   node token.mjs http://127.0.0.1:8080 SECRET
import { launch } from './chromium.mjs';
import { createHmac } from 'node:crypto';

const [origin, secret] = process.argv.slice(2);
const b64 = (s) => Buffer.from(s).toString('base64url');
let issued = 0;
function sign() {
  issued += 1;
  const exp = Math.floor(Date.now() / 1000) + (issued === 1 ? 31 : 3600);
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64(JSON.stringify({ sub: '42', exp, subscribe: ['user:42'] }));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  process.stdout.write(JSON.stringify({ type: 'token', n: issued, exp }) + '\n');
  return `${head}.${body}.${sig}`;
}
const browser = await launch();
const page = await browser.newPage();
page.on('pageerror', (e) => process.stdout.write(JSON.stringify({ type: 'pageerror', error: String(e) }) + '\n'));
await page.exposeFunction('report', (e) => process.stdout.write(JSON.stringify(e) + '\n'));
await page.exposeFunction('nextToken', () => sign());
await page.goto(`${origin}/healthz`);
await page.evaluate(async () => {
  const { Herald } = await import('/herald.js');
  const h = new Herald(`ws://${location.host}/ws`, { getToken: () => window.nextToken() });
  for (const ev of ['connected', 'disconnected', 'gap', 'error']) h.on(ev, (e) => report({ type: ev, ...e, message: e?.message }));
  const sub = h.subscribe('user:42', { onMessage: (m) => report({ type: 'message', offset: m.offset, data: m.data }) });
  const r = await sub.ready;
  report({ type: 'subscribed', ...r });
});
process.stdin.resume();
await new Promise((r) => process.stdin.on('end', r));
await browser.close();
