// Drives the demo page (GET /demo) in Debian's Chromium for
// engine/tests/integration/browser.rs: two browser contexts (two devices)
// on one board; an edit in one appears in the other; one goes offline
// (context.setOffline), edits continue on the other, it comes back and
// shows every edit exactly once. Prints one JSON line per step; with a
// third argument, saves a screenshot of both pages there.
//
//   node demo.mjs http://127.0.0.1:8080 board-name [screenshot.png]
import { launch } from './chromium.mjs';

const [origin, board, shot] = process.argv.slice(2);
const out = (e) => process.stdout.write(JSON.stringify(e) + '\n');
const browser = await launch();
const devices = [];
for (let i = 0; i < 2; i++) {
  const context = await browser.newContext({ viewport: { width: 560, height: 640 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => out({ step: 'pageerror', device: i, error: String(e) }));
  await page.goto(`${origin}/demo?board=${board}`);
  await page.waitForFunction(() => document.getElementById('state').textContent === 'live');
  devices.push({ context, page });
}
const items = (page) => page.$$eval('#items li span', (els) => els.map((e) => e.firstChild.textContent));
const add = async (page, text) => {
  await page.fill('#text', text);
  await page.click('#add button');
};
const waitItems = (page, list) =>
  page.waitForFunction((want) => {
    const got = [...document.querySelectorAll('#items li span')].map((e) => e.firstChild.textContent);
    return JSON.stringify(got) === JSON.stringify(want);
  }, list, { timeout: 10000 });
const [a, b] = devices;
try {
  await add(a.page, 'milk');
  await waitItems(b.page, ['milk']);
  out({ step: 'edit seen on the other device', items: await items(b.page) });
  await b.context.setOffline(true);
  await b.page.waitForFunction(() => document.getElementById('state').textContent.startsWith('offline'), null, { timeout: 10000 });
  out({ step: 'offline', state: await b.page.textContent('#state') });
  await add(a.page, 'eggs');
  await add(a.page, 'bread');
  await waitItems(a.page, ['milk', 'eggs', 'bread']);
  out({ step: 'edits while offline', on_the_offline_device: await items(b.page) });
  await b.context.setOffline(false);
  await b.page.waitForFunction(() => document.getElementById('state').textContent === 'live', null, { timeout: 15000 });
  await waitItems(b.page, ['milk', 'eggs', 'bread']);
  // Nothing more arrives (each edit exactly once).
  await b.page.waitForTimeout(500);
  out({ step: 'back', items: await items(b.page), log: await b.page.textContent('#log') });
  if (shot) {
    await a.page.screenshot({ path: shot.replace(/\.png$/, '-a.png') });
    await b.page.screenshot({ path: shot.replace(/\.png$/, '-b.png') });
    out({ step: 'screenshot', path: shot });
  }
} catch (e) {
  out({ step: 'failed', error: String(e), a: await items(a.page), b: await items(b.page), log: await b.page.textContent('#log') });
}
await browser.close();
