// Drives a real browser for engine/tests/integration/browser.rs: Debian's
// Chromium (headless, through playwright-core) opens a page at
// <origin>/healthz, so the page is same-origin with the server, and starts
// an EventSource on <origin>/sse?channel=<channel>. Every event becomes
// one JSON line on stdout. Runs until stdin closes.
//
//   node eventsource.mjs http://127.0.0.1:8080 news
import { chromium } from 'playwright-core';

const [origin, channel] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const page = await browser.newPage();
await page.exposeFunction('report', (e) => process.stdout.write(JSON.stringify(e) + '\n'));
await page.goto(`${origin}/healthz`);
await page.evaluate((ch) => {
  const es = new EventSource(`/sse?channel=${encodeURIComponent(ch)}`);
  es.onopen = () => report({ type: 'open' });
  es.onmessage = (e) => report({ type: 'message', id: e.lastEventId, data: e.data });
  es.addEventListener('subscribed', (e) => report({ type: 'subscribed', data: e.data }));
  es.onerror = () => report({ type: 'error', state: es.readyState });
}, channel);
process.stdin.on('end', async () => {
  await browser.close();
  process.exit(0);
});
process.stdin.resume();
