#!/usr/bin/env node
// Drive the OHIF v3 viewer in headless Chromium against a DICOMweb server and
// prove that it rendered a study: exits 0 only if a viewport canvas holds real
// (non-blank, multi-grey-level) pixels and a pixel-data request succeeded.
// Adapted from shared/tools/ohif-probe (tests/e2e/test_ohif.py runs it; tools/install_viewer
// --test installs playwright-core beside it and Debian's chromium). Against our server:
//
//   node tools/browser/ohif-probe.mjs --viewer http://127.0.0.1:8042/viewer \
//        --dicomweb http://127.0.0.1:8042/dicom-web --study 1.2.3... --via-list --out /tmp/ohif
//
// usage: node ohif-probe.mjs --viewer http://127.0.0.1:13000 \
//          --dicomweb http://127.0.0.1:13000/dicom-web --study 1.2.3... \
//          [--out ./ohif-out] [--timeout 120] [--chromium /usr/bin/chromium] [--swiftshader]
//          [--no-studylist] [--search PATIENTNAME] [--via-list] [--chromium-arg ARG]...
//          [--viewer-query 'hangingprotocolId=mpr']   (extra query for the /viewer URL)
//          [--block REGEX]   negative test: the browser aborts requests whose URL matches
//                       (e.g. '/frames/'); the probe must then fail
//          [--settle]   after the image is drawn, wait for the network to go idle (complete
//                       request list for a conformance record; slower)
//
// --viewer    origin (plus optional base path) where the OHIF bundle is served
// --dicomweb  the DICOMweb root configured in app-config.js; requests under it
//             are recorded as the conformance list (requests.jsonl / requests.txt).
//             Repeatable (e.g. also the WADO-URI root); the first one is the main root.
// --search    also type PATIENTNAME into the study list's patient filter (QIDO with
//             PatientName=*X* wildcard) and require at least one row
// --via-list  open the study by clicking its row and the "Basic Viewer" button
//             instead of loading /viewer?StudyInstanceUIDs=... directly (a failure to
//             do so fails the probe)
// No fixed sleeps: every wait polls for a state (rows drawn, button visible, canvas
// pixels) until --timeout.
// Screenshots: OUT/studylist.png, [OUT/studylist-search.png], OUT/viewer.png
// Also written: OUT/result.json, OUT/requests.jsonl, OUT/requests.txt, OUT/console.log
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const argv = process.argv.slice(2);
const opt = { extraArgs: [], prefixes: [], out: './ohif-out', timeout: 120, chromium: '/usr/bin/chromium', swiftshader: false, studylist: true };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '--viewer') opt.viewer = argv[++i].replace(/\/+$/, '');
  else if (a === '--dicomweb') { const v = argv[++i].replace(/\/+$/, ''); if (!opt.dicomweb) opt.dicomweb = v; opt.prefixes.push(v); }
  else if (a === '--study') opt.study = argv[++i];
  else if (a === '--out') opt.out = argv[++i];
  else if (a === '--timeout') opt.timeout = Number(argv[++i]);
  else if (a === '--chromium') opt.chromium = argv[++i];
  else if (a === '--swiftshader') opt.swiftshader = true;
  else if (a === '--no-studylist') opt.studylist = false;
  else if (a === '--search') opt.search = argv[++i];
  else if (a === '--via-list') opt.viaList = true;
  else if (a === '--chromium-arg') opt.extraArgs.push(argv[++i]);
  else if (a === '--viewer-query') opt.viewerQuery = argv[++i];
  else if (a === '--settle') opt.settle = true;
  else if (a === '--block') opt.block = new RegExp(argv[++i]);
  else { console.error('unknown arg ' + a); process.exit(2); }
}
if (!opt.viewer || !opt.dicomweb || !opt.study) {
  console.error('usage: ohif-probe.mjs --viewer URL --dicomweb URL --study UID [--out DIR] [--timeout S]');
  process.exit(2);
}
fs.mkdirSync(opt.out, { recursive: true });
const T0 = Date.now();
const since = () => ((Date.now() - T0) / 1000).toFixed(2) + 's';
const log = (...a) => console.log(`[${since()}]`, ...a);

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-probe-profile-'));
const args = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];
// Without a GPU, WebGL needs SwiftShader, which recent Chromium only enables on request.
if (opt.swiftshader) args.push('--enable-unsafe-swiftshader', '--use-angle=swiftshader');
args.push(...opt.extraArgs);

let currentPhase = 'studylist';
const records = [];          // every request under the DICOMweb root
const byReq = new Map();
const consoleLines = [];
const pageErrors = [];
let exitCode = 1;
let context, page;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opt.chromium, headless: true, args,
    viewport: { width: 1400, height: 900 }, ignoreDefaultArgs: ['--enable-automation'],
  });
  // nothing outside this machine is reachable: fail such requests fast instead of waiting
  await context.route('**/*', route => {
    const u = new URL(route.request().url());
    if (['http:', 'https:'].includes(u.protocol) && !['127.0.0.1', 'localhost', '[::1]'].includes(u.hostname)) return route.abort();
    if (opt.block && opt.block.test(u.href)) return route.abort('failed');
    return route.continue();
  });
  const isDicomweb = url => opt.prefixes.some(p => url.startsWith(p + '/') || url.startsWith(p + '?') || url === p);
  // the first-visit onboarding tour (shepherd.js) would cover the viewport: mark it as already shown
  await context.addInitScript(() => {
    try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) { /* opaque origin */ }
  });
  context.on('request', req => {
    if (!isDicomweb(req.url())) return;
    const u = new URL(req.url());
    const rec = {
      t: since(), method: req.method(), path: u.pathname, query: u.search.slice(1),
      accept: req.headers()['accept'] || '', status: null, contentType: '', bytes: null,
      phase: currentPhase,
    };
    records.push(rec); byReq.set(req, rec);
  });
  context.on('requestfinished', async req => {
    const rec = byReq.get(req); if (!rec) return;
    const resp = await req.response().catch(() => null);
    if (resp) {
      rec.status = resp.status();
      rec.contentType = resp.headers()['content-type'] || '';
      try { rec.bytes = (await resp.body()).length; } catch { /* body gone */ }
    }
  });
  context.on('requestfailed', req => {
    const rec = byReq.get(req); if (rec) { rec.status = 'FAILED'; rec.error = req.failure()?.errorText; }
  });

  page = context.pages()[0] || await context.newPage();
  page.on('console', m => consoleLines.push(`[${since()}] ${m.type()}: ${m.text()}`));
  page.on('pageerror', e => pageErrors.push(`[${since()}] ${e.message}`));

  const webgl = await (async () => {
    await page.goto(opt.viewer + '/app-config.js');
    return page.evaluate(() => {
      const c = document.createElement('canvas');
      const gl = c.getContext('webgl2') || c.getContext('webgl');
      if (!gl) return 'none';
      const d = gl.getExtension('WEBGL_debug_renderer_info');
      return d ? gl.getParameter(d.UNMASKED_RENDERER_WEBGL) : 'webgl(unknown renderer)';
    });
  })();
  log('WebGL renderer:', webgl);

  // ---- 1. study list (QIDO-RS study search)
  let studyListBody = null;
  const studyList = { shown: false, qidoStatus: null, studiesReturned: null, studyInList: null, rows: 0 };
  if (opt.studylist) {
    const t = Date.now();
    const qido = page.waitForResponse(r => isDicomweb(r.url()) && /\/studies$/.test(new URL(r.url()).pathname), { timeout: opt.timeout * 1000 });
    await page.goto(opt.viewer + '/', { waitUntil: 'domcontentloaded' });
    const resp = await qido;
    studyList.qidoStatus = resp.status();
    try {
      const body = await resp.json();
      studyListBody = body;
      studyList.studiesReturned = body.length;
      studyList.studyInList = body.some(s => (s['0020000D']?.Value || [])[0] === opt.study);
    } catch (e) { log('study list: QIDO body is not JSON:', String(e)); }
    studyList.rows = await page.waitForFunction(() => document.querySelectorAll('tbody tr').length, null, { timeout: opt.timeout * 1000 })
      .then(h => h.jsonValue()).catch(() => 0);
    await page.screenshot({ path: path.join(opt.out, 'studylist.png') });
    studyList.shown = studyList.qidoStatus === 200 && studyList.rows > 0;
    log(`study list in ${((Date.now() - t) / 1000).toFixed(2)}s:`, JSON.stringify(studyList));
    if (opt.search) {
      currentPhase = 'search';
      const q = page.waitForResponse(r => isDicomweb(r.url()) && /PatientName=/i.test(r.url()), { timeout: opt.timeout * 1000 });
      await page.locator('thead input, input').first().fill(opt.search);
      const r = await q;
      // a row that shows the searched name (the list before the search had rows already)
      const hit = page.locator('tbody tr', { hasText: new RegExp(opt.search.replace(/[^A-Za-z0-9]/g, '.'), 'i') });
      const rows = await hit.first().waitFor({ timeout: opt.timeout * 1000 }).then(() => hit.count()).catch(() => 0);
      studyList.search = { query: new URL(r.url()).search, status: r.status(), rows };
      await page.screenshot({ path: path.join(opt.out, 'studylist-search.png') });
      if (!(r.status() === 200 && studyList.search.rows > 0)) studyList.shown = false;
      log('study list search:', JSON.stringify(studyList.search));
    }
  }

  // ---- 2. viewer for one study
  currentPhase = 'viewer';
  const tv = Date.now();
  const viewerUrl = `${opt.viewer}/viewer?StudyInstanceUIDs=${encodeURIComponent(opt.study)}` +
    (opt.viewerQuery ? '&' + opt.viewerQuery : '');
  let opened = false;
  const basePath = new URL(opt.viewer).pathname.replace(/\/+$/, '');
  if (opt.viaList) {
    // find the study's row by its accession number or "Family, Given" name as QIDO returned them
    try {
      if (opt.search) await page.goto(opt.viewer + '/', { waitUntil: 'domcontentloaded' });
      const st = (studyListBody || []).find(s => (s['0020000D']?.Value || [])[0] === opt.study);
      if (!st) throw new Error('study not in the first page of the study list');
      const acc = (st['00080050']?.Value || [])[0];
      const pn = ((st['00100010']?.Value || [])[0]?.Alphabetic || '').split('^').filter(Boolean).join(', ');
      const row = page.locator('tbody tr', { hasText: acc || pn }).first();
      currentPhase = 'studylist';
      await row.click({ timeout: opt.timeout * 1000 });
      const btn = page.getByRole('button', { name: /Basic Viewer/ }).first();
      await btn.waitFor({ state: 'visible', timeout: opt.timeout * 1000 });
      currentPhase = 'viewer';
      // click() waits until the button is enabled and stable
      await btn.click({ timeout: opt.timeout * 1000 });
      await page.waitForURL(u => u.pathname.startsWith(basePath + '/viewer') && decodeURIComponent(u.search).includes(opt.study), { timeout: opt.timeout * 1000 });
      log('opened via study list:', page.url());
      opened = true;
    } catch (e) {
      throw new Error('could not open the study from the study list: ' + String(e).split('\n')[0]);
    }
  }
  if (!opened) {
    log('opening', viewerUrl);
    await page.goto(viewerUrl, { waitUntil: 'domcontentloaded' });
  }

  // poll all canvases; a rendered CT/MR image has many non-black pixels and many grey levels
  const probeCanvases = () => page.evaluate(() => {
    const out = [];
    for (const c of document.querySelectorAll('canvas')) {
      if (!c.width || !c.height) continue;
      const r = c.getBoundingClientRect();
      if (r.width < 64 || r.height < 64) continue;               // skip icons, thumbnails are checked too but tagged
      let data;
      try {
        const tmp = document.createElement('canvas');
        tmp.width = c.width; tmp.height = c.height;
        const g = tmp.getContext('2d', { willReadFrequently: true });
        g.drawImage(c, 0, 0);
        data = g.getImageData(0, 0, c.width, c.height).data;
      } catch (e) { out.push({ cls: c.className, error: String(e) }); continue; }
      let nonBlack = 0; const levels = new Set();
      const step = 4 * Math.max(1, Math.floor((c.width * c.height) / 200000));
      let n = 0;
      for (let i = 0; i < data.length; i += step) {
        n++;
        const v = (data[i] + data[i + 1] + data[i + 2]) / 3;
        if (v > 8) nonBlack++;
        levels.add(data[i] >> 2);
      }
      out.push({
        cls: c.className, w: c.width, h: c.height, cssW: Math.round(r.width), cssH: Math.round(r.height),
        inViewport: !!c.closest('[data-viewport-uid], .viewport-wrapper, [data-cy="viewport-pane"], .cornerstone-viewport-element'),
        nonBlackFrac: +(nonBlack / n).toFixed(4), greyLevels: levels.size,
      });
    }
    return out;
  });

  let rendered = null, last = [];
  const deadline = Date.now() + opt.timeout * 1000;
  while (Date.now() < deadline) {
    last = await probeCanvases().catch(e => [{ error: String(e) }]);
    rendered = last.find(c => c.inViewport && c.nonBlackFrac > 0.02 && c.greyLevels >= 8)
      || last.find(c => c.cssW >= 200 && c.nonBlackFrac > 0.02 && c.greyLevels >= 8);
    if (rendered) break;
    await page.waitForTimeout(500);
  }
  const renderSecs = ((Date.now() - tv) / 1000).toFixed(2);
  if (rendered) {
    log(`viewer: image rendered after ${renderSecs}s`, JSON.stringify(rendered));
    // let thumbnails / prefetch settle so the request list is complete (--settle)
    if (opt.settle) await page.waitForLoadState('networkidle', { timeout: 20000 }).catch(() => {});
  } else {
    log(`viewer: NO rendered image after ${renderSecs}s; canvases:`, JSON.stringify(last));
  }
  await page.screenshot({ path: path.join(opt.out, 'viewer.png') });

  const inStudy = r => r.path.includes('/studies/' + opt.study + '/') || decodeURIComponent(r.query).includes(opt.study);
  const pixelOk = records.some(r => r.phase === 'viewer' && inStudy(r) && r.status === 200 &&
    (/\/frames\/|\/bulk|\/rendered|\/instances\/[^/]+$/.test(r.path) || /requestType=WADO/i.test(r.query)));
  const metaOk = records.some(r => inStudy(r) && /\/metadata$/.test(r.path) && r.status === 200);
  log(`metadata request ok: ${metaOk}, pixel request ok: ${pixelOk}`);
  fs.writeFileSync(path.join(opt.out, 'result.json'), JSON.stringify({
    viewer: opt.viewer, dicomweb: opt.dicomweb, study: opt.study, webgl,
    studyList, rendered: !!rendered, renderSeconds: +renderSecs, canvas: rendered, canvases: last, metaOk, pixelOk,
    totalSeconds: +((Date.now() - T0) / 1000).toFixed(2),
  }, null, 2));
  exitCode = rendered && pixelOk && metaOk && (!opt.studylist || studyList.shown) ? 0 : 1;
} catch (e) {
  console.error('probe failed:', e);
  exitCode = 1;
  if (page) await page.screenshot({ path: path.join(opt.out, 'failure.png') }).catch(() => {});
} finally {
  fs.writeFileSync(path.join(opt.out, 'requests.jsonl'), records.map(r => JSON.stringify(r)).join('\n') + '\n');
  const lines = records.map(r =>
    `${r.phase.padEnd(9)} ${r.status} ${r.method} ${r.path}${r.query ? '?' + r.query : ''}  Accept: ${r.accept}  -> ${r.contentType ? r.contentType.replace(/;\s*boundary=.*$/, '') : '-'}`);
  fs.writeFileSync(path.join(opt.out, 'requests.txt'), lines.join('\n') + '\n');
  fs.writeFileSync(path.join(opt.out, 'console.log'), consoleLines.concat(pageErrors.map(e => 'PAGEERROR ' + e)).join('\n') + '\n');
  log(`${records.length} DICOMweb requests recorded -> ${path.join(opt.out, 'requests.txt')}`);
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  log(exitCode === 0 ? 'PASS: OHIF rendered the study' : 'FAIL');
  process.exit(exitCode);
}
