// Opens Kade's OHIF viewer in headless Chromium, signs in with a token, checks the study list
// and that a study's image is drawn (non-black pixels on the viewport canvas).
//
// Usage: node ohif_check.js BASE_URL TOKEN STUDY_UID LIST_TEXT SCREENSHOT.png
// Needs playwright-core (NODE_PATH) and Chromium (CHROMIUM, default /usr/bin/chromium).
const { chromium } = require('playwright-core');

async function main() {
  const [base, token, study, listText, shot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
           '--disable-background-networking', '--disable-component-update',
           '--no-first-run', '--disable-sync', '--disable-domain-reliability'],
  });
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  const outside = [];
  const failures = [];
  let dicomweb = 0;
  await page.route('**/*', (route) => {
    const u = new URL(route.request().url());
    if (u.hostname !== '127.0.0.1') {
      outside.push(u.href);
      return route.abort();
    }
    return route.continue();
  });
  page.on('response', (r) => {
    if (r.url().includes('/dicom-web/')) dicomweb += 1;
    if (r.status() >= 400) failures.push(`${r.status()} ${r.url()}`);
  });

  // Without a token the viewer sends the user to the sign-in page.
  await page.goto(`${base}/viewer/`);
  await page.waitForURL(/kade-login\.html/, { timeout: 30000 });

  // Signing in with a link: the study list shows the stored study.
  await page.goto(`${base}/viewer/#token=${encodeURIComponent(token)}`);
  await page.waitForSelector(`text=${listText}`, { timeout: 60000 });
  if (page.url().includes('token=')) throw new Error('token left in the URL');

  // The viewer draws the image.
  await page.goto(`${base}/viewer/viewer?StudyInstanceUIDs=${study}`);
  await page.waitForSelector('canvas.cornerstone-canvas', { timeout: 60000 });
  let stats = null;
  for (let i = 0; i < 120; i++) {
    stats = await page.evaluate(() => {
      const c = document.querySelector('canvas.cornerstone-canvas');
      if (!c || !c.width) return null;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let lit = 0;
      const levels = new Set();
      for (let p = 0; p < d.length; p += 4) {
        if (d[p] + d[p + 1] + d[p + 2] > 30) lit += 1;
        levels.add(d[p]);
      }
      return { lit, total: d.length / 4, levels: levels.size };
    });
    if (stats && stats.lit > 1000 && stats.levels > 16) break;
    await page.waitForTimeout(500);
  }
  await page.screenshot({ path: shot });
  await browser.close();
  const result = { stats, outside, failures, dicomweb };
  console.log(JSON.stringify(result));
  if (!stats || stats.lit <= 1000 || stats.levels <= 16) throw new Error('no image drawn');
  if (outside.length) throw new Error(`requests left the machine: ${outside}`);
  if (failures.length) throw new Error(`failed requests: ${failures}`);
}

main().catch((e) => { console.error(`FAIL: ${e.message}`); process.exit(1); });
