// Writes a small test JPEG (a cartoon "pet" on a background) with Chromium's own encoder, for
// MOCK mode where no segctl is around to make a synthetic dataset.
// Usage: node make-photo.mjs OUT.jpg [WIDTH] [HEIGHT]
import { writeFileSync } from 'node:fs';
import { launch } from './browser.mjs';

const [out, w = '320', h = '240'] = process.argv.slice(2);
if (!out) { console.error('usage: node make-photo.mjs OUT.jpg [WIDTH] [HEIGHT]'); process.exit(2); }
const b = await launch();
try {
  const page = b.context.pages()[0] || await b.context.newPage();
  const dataUrl = await page.evaluate(([w, h]) => {
    const c = document.createElement('canvas'); c.width = w; c.height = h;
    const g = c.getContext('2d');
    const sky = g.createLinearGradient(0, 0, 0, h); sky.addColorStop(0, '#9ec9e8'); sky.addColorStop(1, '#5f8f4e');
    g.fillStyle = sky; g.fillRect(0, 0, w, h);
    g.fillStyle = '#b06a2c';
    g.beginPath(); g.ellipse(w * 0.5, h * 0.62, w * 0.22, h * 0.22, 0, 0, 2 * Math.PI); g.fill();
    g.beginPath(); g.arc(w * 0.5, h * 0.33, Math.min(w, h) * 0.14, 0, 2 * Math.PI); g.fill();
    g.beginPath(); g.moveTo(w * 0.42, h * 0.26); g.lineTo(w * 0.40, h * 0.12); g.lineTo(w * 0.47, h * 0.21); g.fill();
    g.beginPath(); g.moveTo(w * 0.58, h * 0.26); g.lineTo(w * 0.60, h * 0.12); g.lineTo(w * 0.53, h * 0.21); g.fill();
    return c.toDataURL('image/jpeg', 0.9);
  }, [Number(w), Number(h)]);
  writeFileSync(out, Buffer.from(dataUrl.split(',')[1], 'base64'));
  console.log(`wrote ${out} (${w}x${h})`);
} finally {
  await b.close();
}
