#!/usr/bin/env node
// Prove that OHIF loads a DICOM SEG from this server over its source series: open the study,
// double-click the SEG in the study browser, accept "open this Segmentation?", and pass only
// if the viewport, read back pixel by pixel, gains coloured (segment) pixels it did not have
// before (the source MR is grey). tests/e2e/test_ohif.py runs it; by hand:
//
//   node tools/browser/ohif-seg-probe.mjs --viewer http://127.0.0.1:8042/viewer --study 1.2.3... \
//        [--out DIR] [--timeout 120] [--chromium /usr/bin/chromium]
//
// Writes OUT/before.png, OUT/after.png, OUT/result.json and OUT/console.log. No fixed sleeps:
// every wait polls for a state until --timeout.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const argv = process.argv.slice(2);
const opt = { out: './ohif-seg-out', timeout: 120, chromium: '/usr/bin/chromium' };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '--viewer') opt.viewer = argv[++i].replace(/\/+$/, '');
  else if (a === '--study') opt.study = argv[++i];
  else if (a === '--out') opt.out = argv[++i];
  else if (a === '--timeout') opt.timeout = Number(argv[++i]);
  else if (a === '--chromium') opt.chromium = argv[++i];
  else { console.error('unknown arg ' + a); process.exit(2); }
}
if (!opt.viewer || !opt.study) {
  console.error('usage: ohif-seg-probe.mjs --viewer URL --study UID [--out DIR] [--timeout S]');
  process.exit(2);
}
fs.mkdirSync(opt.out, { recursive: true });
const ms = opt.timeout * 1000;
const consoleLines = [];
const result = { ok: false, step: 'start' };

// The number of coloured pixels in the largest canvas (segments are drawn in colour).
const colouredPixels = () => {
  let best = 0;
  for (const c of document.querySelectorAll('canvas')) {
    const r = c.getBoundingClientRect();
    if (r.width < 200 || r.height < 200) continue;
    const copy = document.createElement('canvas');
    copy.width = c.width; copy.height = c.height;
    const ctx = copy.getContext('2d');
    ctx.drawImage(c, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (Math.abs(d[i] - d[i + 1]) > 30 || Math.abs(d[i + 1] - d[i + 2]) > 30) n++;
    }
    best = Math.max(best, n);
  }
  return best;
};

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-seg-probe-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: opt.chromium,
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
         '--enable-unsafe-swiftshader', '--use-angle=swiftshader'],
});
try {
  const page = context.pages()[0] || await context.newPage();
  page.on('console', m => consoleLines.push(`${m.type()}: ${m.text()}`));
  // the first-visit onboarding tour (shepherd.js) would cover the study browser
  await page.addInitScript(() => {
    try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) { /* */ }
  });
  result.step = 'open study';
  await page.goto(`${opt.viewer}/viewer?StudyInstanceUIDs=${opt.study}`, { timeout: ms });
  await page.waitForFunction(() => [...document.querySelectorAll('canvas')]
    .some(c => c.getBoundingClientRect().width >= 200), null, { timeout: ms });
  const seg = page.locator('[data-cy^="study-browser-thumbnail"]', { hasText: 'SEG' }).first();
  await seg.waitFor({ state: 'visible', timeout: ms });
  result.before = await page.evaluate(colouredPixels);
  await page.screenshot({ path: path.join(opt.out, 'before.png') });
  result.step = 'open the SEG';
  await seg.dblclick({ timeout: ms });
  const yes = page.getByRole('button', { name: 'Yes' }).first();
  await yes.waitFor({ state: 'visible', timeout: ms });
  await yes.click({ timeout: ms });
  result.step = 'segments drawn';
  const handle = await page.waitForFunction(
    ([fn, floor]) => { const n = eval(`(${fn})`)(); return n > floor + 500 ? n : false; },
    [colouredPixels.toString(), result.before], { timeout: ms, polling: 250 });
  result.after = await handle.jsonValue();
  await page.screenshot({ path: path.join(opt.out, 'after.png') });
  result.segParsed = consoleLines.some(l => l.includes('SEG parse complete'));
  result.ok = true;
  result.step = 'done';
} catch (e) {
  result.error = String(e).slice(0, 2000);
} finally {
  fs.writeFileSync(path.join(opt.out, 'result.json'), JSON.stringify(result, null, 2));
  fs.writeFileSync(path.join(opt.out, 'console.log'), consoleLines.join('\n'));
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
