// End-to-end test of segctl's web page (GET /) in real headless Chromium.
//
//   SEGCTL_URL=http://127.0.0.1:8080 TEST_PHOTO=photo.jpg [OUT_DIR=dir] node page.test.mjs
//
// Env: SEGCTL_URL (base URL of a running `segctl serve` or mock_server.py), TEST_PHOTO (a JPEG
// or PNG), OUT_DIR (optional: screenshots go there), TEST_TIMEOUT_MS (per wait, default 60000),
// CHROMIUM (default /usr/bin/chromium). Exits 0 when every check passed.
import { readFileSync, existsSync, mkdirSync } from 'node:fs';
import { basename, extname, join } from 'node:path';
import { launch } from './browser.mjs';

const BASE = (process.env.SEGCTL_URL || '').replace(/\/+$/, '');
const PHOTO = process.env.TEST_PHOTO || '';
const OUT_DIR = process.env.OUT_DIR || '';
const TIMEOUT = Number(process.env.TEST_TIMEOUT_MS || 60_000);

function die(msg) {
  console.error(`browser-test: ${msg}`);
  process.exit(2);
}

/** (width, height) from a JPEG SOF or PNG IHDR header. */
function imageSize(buf) {
  if (buf.length >= 24 && buf.readUInt32BE(0) === 0x89504e47 && buf.toString('latin1', 12, 16) === 'IHDR') {
    return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
  }
  if (buf[0] !== 0xff || buf[1] !== 0xd8) return null;
  let i = 2;
  while (i + 4 <= buf.length) {
    if (buf[i] !== 0xff) return null;
    const m = buf[i + 1];
    if (m === 0xff) { i += 1; continue; }
    if (m === 0x01 || (m >= 0xd0 && m <= 0xd7)) { i += 2; continue; }
    if (m === 0xd9 || m === 0xda) return null;
    const len = buf.readUInt16BE(i + 2);
    if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) {
      return { height: buf.readUInt16BE(i + 5), width: buf.readUInt16BE(i + 7) };
    }
    i += 2 + len;
  }
  return null;
}

if (!BASE) die('set SEGCTL_URL to the server base URL, e.g. http://127.0.0.1:8080');
if (!PHOTO) die('set TEST_PHOTO to a JPEG or PNG photo');
if (!existsSync(PHOTO)) die(`TEST_PHOTO ${PHOTO} does not exist`);
const photoBytes = readFileSync(PHOTO);
const size = imageSize(photoBytes);
if (!size) die(`TEST_PHOTO ${PHOTO} is not a JPEG or PNG`);
const photoMime = photoBytes[0] === 0xff ? 'image/jpeg' : 'image/png';
if (OUT_DIR) mkdirSync(OUT_DIR, { recursive: true });
const origin = new URL(BASE).origin;

let passed = 0, failed = 0;
const results = new Map();
async function check(name, deps, fn) {
  const missing = deps.filter((d) => results.get(d) !== true);
  if (missing.length) {
    failed++; results.set(name, false);
    console.log(`not ok - ${name} (skipped: needs ${missing.join(', ')})`);
    return;
  }
  const t0 = Date.now();
  try {
    await fn();
    passed++; results.set(name, true);
    console.log(`ok - ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++; results.set(name, false);
    console.log(`not ok - ${name}: ${(e && e.message ? e.message : String(e)).split('\n')[0]}`);
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }
const text = (page, sel) => page.locator(sel).innerText();

/** Waits until #overlay shows a loaded image other than `prevSrc`; returns its natural size. */
async function waitOverlay(page, prevSrc) {
  try {
    await page.waitForFunction((prev) => {
      const img = document.getElementById('overlay');
      return img && img.getAttribute('src') && img.src !== prev && img.complete && img.naturalWidth > 0;
    }, prevSrc || null, { timeout: TIMEOUT });
  } catch (e) {
    const err = await text(page, '#error').catch(() => '');
    throw new Error(`#overlay never loaded within ${TIMEOUT} ms${err ? `; #error says: ${err}` : ''}`);
  }
  return page.evaluate(() => {
    const img = document.getElementById('overlay');
    return { src: img.src, width: img.naturalWidth, height: img.naturalHeight };
  });
}

let browser;
try {
  browser = await launch();
} catch (e) {
  die(`could not start Chromium: ${e.message}`);
}
const { context } = browser;
const page = context.pages()[0] || await context.newPage();
page.setDefaultTimeout(TIMEOUT);
const pageErrors = [], foreign = [], consoleErrors = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
// The page must be self-contained: anything not from the server itself (or blob:/data:) is refused.
await context.route('**/*', (route) => {
  const url = route.request().url();
  if (url.startsWith(origin + '/')) return route.continue();
  foreign.push(url);
  return route.abort();
});

console.log(`browser-test: ${BASE} with ${PHOTO} (${size.width}x${size.height})`);
let firstOverlay;

await check('page loads and lists models', [], async () => {
  const resp = await page.goto(BASE + '/', { waitUntil: 'load', timeout: TIMEOUT });
  assert(resp && resp.ok(), `GET / answered ${resp ? resp.status() : 'nothing'}`);
  const ctype = resp.headers()['content-type'] || '';
  assert(/^text\/html/i.test(ctype), `GET / Content-Type is "${ctype}", expected text/html`);
  await page.waitForFunction(() => {
    const s = document.getElementById('model');
    return s && !s.disabled && s.value !== '' && s.options.length > 0;
  }, null, { timeout: TIMEOUT }).catch(async () => {
    throw new Error(`#model never got a model; #notice: "${await text(page, '#notice')}", #error: "${await text(page, '#error')}"`);
  });
  const versions = await page.locator('#version option').allInnerTexts();
  assert(versions[0] === 'latest', `#version's first option is "${versions[0]}", expected "latest"`);
});

await check('photo via file input shows overlay at photo size', ['page loads and lists models'], async () => {
  await page.setInputFiles('#file', PHOTO);
  firstOverlay = await waitOverlay(page, null);
  assert(firstOverlay.width === size.width && firstOverlay.height === size.height,
    `overlay is ${firstOverlay.width}x${firstOverlay.height}, photo is ${size.width}x${size.height}`);
  const orig = await page.evaluate(() => document.getElementById('original').naturalWidth);
  assert(orig > 0, '#original shows no image');
  const err = await text(page, '#error');
  assert(err === '', `#error is not empty: ${err}`);
});

await check('timing and answering model are shown', ['photo via file input shows overlay at photo size'], async () => {
  const timing = await text(page, '#timing');
  assert(timing.includes('inference'), `#timing lacks "inference": "${timing}"`);
  assert(/round trip \d+ ms/.test(timing), `#timing lacks the round trip: "${timing}"`);
  const model = await page.locator('#model').inputValue();
  const by = await text(page, '#answered-by');
  assert(by.includes(model), `#answered-by "${by}" does not name model "${model}"`);
  console.log(`  timing: ${timing}\n  ${by}`);
  if (OUT_DIR) await page.screenshot({ path: join(OUT_DIR, 'page.png'), fullPage: true });
});

let colorSrc;
await check('mask toggle shows the colour mask', ['photo via file input shows overlay at photo size'], async () => {
  await page.click('#show-color');
  const c = await waitOverlay(page, firstOverlay.src);
  colorSrc = c.src;
  assert(c.width === size.width && c.height === size.height, `mask is ${c.width}x${c.height}`);
  assert((await page.getAttribute('#show-color', 'aria-pressed')) === 'true', '#show-color not pressed');
  if (OUT_DIR) await page.screenshot({ path: join(OUT_DIR, 'page-mask.png'), fullPage: true });
  await page.click('#show-overlay');
  await page.waitForFunction((prev) => document.getElementById('overlay').src !== prev, c.src);
});

await check('photo dropped on the drop zone is segmented', ['page loads and lists models'], async () => {
  const prev = await page.evaluate(() => document.getElementById('overlay').src);
  const dragged = await page.evaluate(async ([b64, name, type]) => {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, { type }));
    const zone = document.getElementById('dropzone');
    zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    const styled = zone.classList.contains('dragover');
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    return { styled, after: zone.classList.contains('dragover') };
  }, [photoBytes.toString('base64'), 'dropped' + extname(PHOTO), photoMime]);
  assert(dragged.styled, '#dropzone did not get the dragover class on dragover');
  assert(!dragged.after, '#dropzone kept the dragover class after the drop');
  const d = await waitOverlay(page, prev);
  assert(d.width === size.width && d.height === size.height, `overlay is ${d.width}x${d.height}`);
});

await check('an explicit version is asked for and answers', ['photo via file input shows overlay at photo size'], async () => {
  const opts = await page.locator('#version option').evaluateAll((os) => os.map((o) => o.value).filter(Boolean));
  assert(opts.length > 0, '#version lists no AVAILABLE version');
  const prev = await page.evaluate(() => document.getElementById('overlay').src);
  const v = opts[opts.length - 1];
  const [req] = await Promise.all([
    page.waitForRequest((r) => r.method() === 'POST' && r.url().includes(`/versions/${v}:segment`), { timeout: TIMEOUT }),
    page.selectOption('#version', v),
  ]);
  assert(req.headers()['content-type'] === photoMime, `sent Content-Type ${req.headers()['content-type']}`);
  const o = await waitOverlay(page, prev);
  assert(o.width === size.width && o.height === size.height, `overlay is ${o.width}x${o.height}`);
  const by = await text(page, '#answered-by');
  assert(by.includes(`v${v}`), `#answered-by "${by}" does not name version ${v}`);
  await page.selectOption('#version', '');
});

await check('non-image upload shows the server error', ['page loads and lists models'], async () => {
  await page.setInputFiles('#file', {
    name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('this is not a photo\n'),
  });
  await page.waitForFunction(() => document.getElementById('error').textContent.trim().length > 0, null, { timeout: TIMEOUT })
    .catch(() => { throw new Error('#error stayed empty after uploading a text file'); });
  const err = await text(page, '#error');
  assert(/HTTP 4\d\d/.test(err), `#error does not carry a 4xx status: "${err}"`);
  const src = await page.getAttribute('#overlay', 'src');
  assert(!src, '#overlay still shows an image after the error');
  console.log(`  error shown: ${err}`);
  if (OUT_DIR) await page.screenshot({ path: join(OUT_DIR, 'page-error.png'), fullPage: true });
});

await check('no script errors and no requests off the server', [], async () => {
  assert(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join(' | ')}`);
  assert(foreign.length === 0, `page requested other origins: ${foreign.join(', ')}`);
});

const unexpectedConsole = consoleErrors.filter((m) => !/status of 4\d\d/.test(m));
if (unexpectedConsole.length) console.log(`  console errors (not failing): ${unexpectedConsole.join(' | ')}`);
await browser.close();
if (OUT_DIR) console.log(`browser-test: screenshots in ${OUT_DIR} (page.png, page-mask.png, page-error.png)`);
console.log(`browser-test: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
