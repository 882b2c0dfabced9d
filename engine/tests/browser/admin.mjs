// Opens the admin page (GET /admin) in Debian's Chromium for
// engine/tests/integration/browser.rs, gives it the API key as a user
// would (the form), and prints what it shows as one JSON line; with a
// third argument, saves a screenshot there.
//
//   node admin.mjs http://127.0.0.1:8080 API_KEY [screenshot.png]
import { launch } from './chromium.mjs';

const [origin, key, shot] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1000, height: 760 } });
const errors = [];
page.on('pageerror', (e) => errors.push(String(e)));
await page.goto(`${origin}/admin`);
await page.waitForSelector('#key', { state: 'visible' });
const asked = await page.textContent('#error');
await page.fill('#keyvalue', key);
await page.click('#key button');
// Two updates: the second has rates.
await page.waitForFunction(() => document.body.dataset.updated, null, { timeout: 10000 });
await page.waitForTimeout(1500);
const text = (id) => page.textContent(`#${id}`);
const shown = {
  asked,
  ws: await text('ws'),
  sse: await text('sse'),
  subscriptions: await text('subscriptions'),
  channels: await text('channels'),
  published: await text('published'),
  top: await page.$$eval('#top tr', (trs) => trs.map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent])),
  disconnects: await page.$$eval('#disconnects tr', (trs) => Object.fromEntries(trs.map((tr) => [tr.cells[0].textContent, tr.cells[1].textContent]))),
  bars: await page.$$eval('#chart rect', (rs) => rs.length),
  percentiles: await text('percentiles'),
  errors,
};
if (shot) await page.screenshot({ path: shot, fullPage: true });
process.stdout.write(JSON.stringify(shown) + '\n');
await browser.close();
