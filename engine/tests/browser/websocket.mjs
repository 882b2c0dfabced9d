// Drives a real browser for engine/tests/integration/browser.rs: Chromium
// opens <origin>/healthz and a WebSocket to <origin>/ws?channel=<channel>
// (Chromium always offers permessage-deflate). It reports the extensions
// agreed, then publishes one large change through a command (which
// Chromium sends compressed when agreed), and reports every message it
// receives. One JSON line per event on stdout; runs until stdin closes.
//
//   node websocket.mjs http://127.0.0.1:8080 news
import { launch } from './chromium.mjs';

const [origin, channel] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage();
await page.exposeFunction('report', (e) => process.stdout.write(JSON.stringify(e) + '\n'));
await page.goto(`${origin}/healthz`);
await page.evaluate(([server, ch]) => {
  const ws = new WebSocket(`${server.replace('http', 'ws')}/ws?channel=${encodeURIComponent(ch)}`);
  ws.onopen = () => {
    report({ type: 'open', extensions: ws.extensions });
    const items = Array.from({ length: 40 }, (_, i) => ({ id: i, title: `from the browser ${i}`, done: i % 2 === 0 }));
    ws.send(JSON.stringify({ op: 'publish', channel: ch, data: { from: 'chromium', items }, id: 1 }));
  };
  ws.onmessage = (e) => report({ type: 'message', data: e.data });
  ws.onclose = (e) => report({ type: 'close', code: e.code });
}, [origin, channel]);
process.stdin.on('end', async () => {
  await browser.close();
  process.exit(0);
});
process.stdin.resume();
