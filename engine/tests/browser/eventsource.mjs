// Drives a real browser for engine/tests/integration/browser.rs: Debian's
// Chromium (headless, through playwright-core) opens a page and starts an
// EventSource on <origin>/sse?channel=<channel>. The page is <origin>/healthz
// (same origin as the server), or <page-origin>/ when a third argument is
// given: a page on another origin, which first reads <origin>/history/<channel>
// with fetch (CORS). A fourth argument is a connection token, sent as a
// browser must: the `token` query parameter of the EventSource URL. Every
// event becomes one JSON line on stdout. Runs until stdin closes.
//
//   node eventsource.mjs http://127.0.0.1:8080 news [http://127.0.0.1:3000 [token]]
import { launch } from './chromium.mjs';

const [origin, channel, pageOrigin, token] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage();
await page.exposeFunction('report', (e) => process.stdout.write(JSON.stringify(e) + '\n'));
await page.goto(pageOrigin ? `${pageOrigin}/` : `${origin}/healthz`);
await page.evaluate(async ([server, ch, crossOrigin, tok]) => {
  const base = crossOrigin ? server : '';
  if (crossOrigin) {
    try {
      const r = await fetch(`${base}/history/${encodeURIComponent(ch)}`);
      report({ type: 'history', status: r.status, body: await r.text() });
    } catch (e) {
      report({ type: 'history', status: 0, error: String(e) });
    }
  }
  const auth = tok ? `&token=${encodeURIComponent(tok)}` : '';
  const es = new EventSource(`${base}/sse?channel=${encodeURIComponent(ch)}${auth}`);
  es.onopen = () => report({ type: 'open' });
  es.onmessage = (e) => report({ type: 'message', id: e.lastEventId, data: e.data });
  es.addEventListener('subscribed', (e) => report({ type: 'subscribed', data: e.data }));
  es.onerror = () => report({ type: 'error', state: es.readyState });
}, [origin, channel, Boolean(pageOrigin), token ?? '']);
process.stdin.on('end', async () => {
  await browser.close();
  process.exit(0);
});
process.stdin.resume();
