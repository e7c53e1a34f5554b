// The browser half of `make viewer-check` (started by viewer_check.py, which serves OHIF and
// Orthanc on VIEWER_URL and writes VIEWER_EXPECTED).  Headless Chromium through OHIF 3.13:
//
//   1. the study opens in the viewer; a grey-scale MR viewport has (almost) no coloured pixels;
//   2. layout 1x2; the SEG is opened in the left viewport and OHIF's question whether to load the
//      segmentation is answered Yes; the segmentation panel lists every segment label of the SEG,
//      in order; after a click on the first segment (OHIF jumps to its slice) the viewport has
//      coloured overlay pixels;
//   3. the SR is opened in the right viewport; OHIF offers to load its measurements, and after
//      "Yes" its Measurements panel lists every measurement group of the SR by its label, in
//      order: each finding placed on a key slice by name and probability, then the structure
//      outlines; findings without a location are not listed; a click on each finding (and on a
//      structure) shows its key slice in the viewport, with the outline OHIF measures as the
//      SR's area;
//   4. nothing is written to the page's console as an error and no page error is thrown,
//      from the first request to the end.
//
// Screenshots go to VIEWER_ARTIFACTS: 1-study.png, 2-seg.png, 3-seg-sr.png, with measurements.json (the
// Measurements panel's list) and console.log.
import fs from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const base = process.env.VIEWER_URL;
const expected = JSON.parse(fs.readFileSync(process.env.VIEWER_EXPECTED, 'utf8'));
const artifacts = process.env.VIEWER_ARTIFACTS || 'viewer-artifacts';
const chromium = process.env.CHROMIUM || '/usr/bin/chromium';
// software WebGL on few shared cores: every wait is generous
const WAIT_MS = Number(process.env.VIEWER_WAIT_MS || 180000);
fs.mkdirSync(artifacts, { recursive: true });

const started = Date.now();
const stamp = () => `${((Date.now() - started) / 1000).toFixed(1).padStart(6)} s`;
const consoleLines = [];
const errors = [];
const passed = [];
const say = (line) => console.log(`[viewer-check ${stamp()}] ${line}`);
const pass = (line) => { passed.push(line); say(`ok: ${line}`); };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class CheckFailed extends Error {}
function assert(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  protocolTimeout: WAIT_MS * 2,
  defaultViewport: { width: 1600, height: 1000 },
  args: [
    '--no-sandbox',
    '--use-gl=angle',
    '--use-angle=swiftshader',
    '--enable-unsafe-swiftshader',
    '--ignore-gpu-blocklist',
    '--window-size=1600,1000',
    '--disable-dev-shm-usage',
    '--no-first-run',
  ],
});
let code = 0;
const page = await browser.newPage();
page.setDefaultTimeout(WAIT_MS);
page.on('console', (message) => {
  const line = `${stamp()} ${message.type()}: ${message.text()}`;
  consoleLines.push(line);
  if (message.type() === 'error') {
    const where = message.location()?.url ? ` (${message.location().url})` : '';
    errors.push(`console error: ${message.text()}${where}`);
  }
});
page.on('pageerror', (error) => {
  consoleLines.push(`${stamp()} pageerror: ${error.message}`);
  errors.push(`page error: ${error.message}`);
});
page.on('requestfailed', (request) => {
  consoleLines.push(`${stamp()} request failed: ${request.url()} ${request.failure()?.errorText}`);
});
page.on('response', (response) => {
  if (response.status() >= 400) consoleLines.push(`${stamp()} HTTP ${response.status()}: ${response.url()}`);
});

/** The first element whose own text is exactly `text` (buttons, list rows). */
async function byText(text, selector = '*') {
  const handle = await page.waitForFunction(
    (wanted, sel) => [...document.querySelectorAll(sel)].find(
      (e) => e.offsetParent !== null && (e.innerText || '').trim() === wanted),
    { timeout: WAIT_MS }, text, selector);
  return handle.asElement();
}

const panes = () => page.$$('[data-cy="viewport-pane"]');
const pane = async (index) => (await panes())[index];

/** Click what `find` gives, finding it again when OHIF (React) re-rendered it in between. */
async function clickOn(find, options = {}) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      const element = await find();
      if (!element) throw new CheckFailed('nothing to click');
      await element.click(options);
      return;
    } catch (error) {
      if (attempt >= 5) throw error;
      await sleep(1000);
    }
  }
}

/** Fraction of clearly coloured pixels in a viewport (MR images are grey: colour is overlay). */
async function colouredFraction(viewport, file) {
  // the pane's box (the canvas may briefly be larger while panels open or close), once stable
  let box = await viewport.boundingBox();
  for (let tries = 0; tries < 20; tries += 1) {
    await sleep(500);
    const again = await viewport.boundingBox();
    if (JSON.stringify(again) === JSON.stringify(box)) break;
    box = again;
  }
  const clip = { x: box.x + 2, y: box.y + 2, width: box.width - 4, height: box.height - 4 };
  // captureBeyondViewport would resize the page for the capture, and OHIF lays itself out again
  const png = await page.screenshot({ clip, encoding: 'base64', captureBeyondViewport: false });
  if (file) fs.writeFileSync(file, Buffer.from(png, 'base64'));
  return page.evaluate(async (data) => {
    const bitmap = await createImageBitmap(await (await fetch(`data:image/png;base64,${data}`)).blob());
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext('2d');
    context.drawImage(bitmap, 0, 0);
    const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
    let coloured = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      const r = pixels[i], g = pixels[i + 1], b = pixels[i + 2];
      if (Math.max(r, g, b) - Math.min(r, g, b) > 30) coloured += 1;
    }
    return coloured / (pixels.length / 4);
  }, png);
}

/** Let the viewer settle: no request for a while, then one more frame time for software GL. */
async function settle(ms = 2000) {
  await page.waitForNetworkIdle({ idleTime: 1000, timeout: WAIT_MS }).catch(() => {});
  await sleep(ms);
}

async function svgLabels(index) {
  return (await pane(index)).$$eval('svg text', (texts) => texts.map((t) => t.textContent || ''));
}

try {
  // ---------------------------------------------------------------- 1. the study
  const url = `${base}/viewer?StudyInstanceUIDs=${expected.study_instance_uid}`;
  say(`opening ${url}`);
  await page.goto(url, { waitUntil: 'networkidle0', timeout: WAIT_MS });
  const tour = await page.waitForSelector('.shepherd-button-secondary', { timeout: 15000 }).catch(() => null);
  if (tour) await clickOn(() => page.$('.shepherd-button-secondary')); // OHIF's first-visit tour ("Skip all")
  await page.waitForSelector('[data-cy="study-browser-thumbnail"]');
  await page.waitForSelector('[data-cy="viewport-pane"] canvas');
  await settle();
  await page.mouse.move(5, 995);
  const baseline = await colouredFraction(await pane(0), path.join(artifacts, '1-study.png'));
  // the viewport's overlay text, icons and scroll bar are drawn in colour over the canvas
  assert(baseline < 0.005, `the plain MR viewport already has ${(baseline * 100).toFixed(2)} % coloured pixels`);
  pass(`study opened; MR viewport is grey-scale (${(baseline * 100).toFixed(3)} % coloured pixels)`);

  // ---------------------------------------------------------------- 2. the SEG
  await clickOn(() => page.waitForSelector('[data-cy="Layout"]'));
  await clickOn(() => page.waitForSelector('[data-cy="Layout-1-0"]')); // two columns, one row
  await page.waitForFunction(() => document.querySelectorAll('[data-cy="viewport-pane"]').length === 2);
  await settle();
  await clickOn(() => pane(0));
  const segThumb = `[data-cy="study-browser-thumbnail-no-image"][data-series="${expected.seg_series_number}"]`;
  await clickOn(() => page.waitForSelector(segThumb), { count: 2 });
  await page.waitForFunction(
    () => document.body.innerText.includes('Do you want to open this Segmentation?'), { timeout: WAIT_MS });
  pass('OHIF asks "Do you want to open this Segmentation?"');
  await clickOn(() => byText('Yes', 'button'));
  await clickOn(() => page.waitForSelector('[data-cy="panelSegmentation-btn"]'));
  await page.waitForFunction(
    (n) => document.querySelectorAll('[data-cy="data-row-title"]').length >= n, { timeout: WAIT_MS },
    expected.segment_labels.length);
  const rows = await page.$$eval('[data-cy="data-row-title"]', (els) => els.map((e) => e.innerText.trim()));
  assert(JSON.stringify(rows) === JSON.stringify(expected.segment_labels),
    `segment list ${JSON.stringify(rows)} is not the SEG's ${JSON.stringify(expected.segment_labels)}`);
  pass(`segment list shows the SEG's ${rows.length} segments: ${rows.join(', ')}`);
  const panelText = await page.evaluate(() => document.body.innerText);
  assert(panelText.includes(expected.seg_series_description.slice(0, 20)),
    `the segmentation panel does not name the SEG (${expected.seg_series_description})`);
  await clickOn(() => byText(expected.segment_labels[0], '[data-cy="data-row-title"]'));
  await page.mouse.move(5, 995); // no hover card over the viewport
  await settle(4000);
  const overlay = await colouredFraction(await pane(0), path.join(artifacts, '2-seg.png'));
  assert(overlay > Math.max(0.02, baseline + 0.015), `after loading the SEG only ${(overlay * 100).toFixed(2)} % of the viewport is coloured`);
  pass(`SEG overlay rendered: ${(overlay * 100).toFixed(1)} % of the viewport's pixels coloured (before: ${(baseline * 100).toFixed(3)} %)`);

  // ---------------------------------------------------------------- 3. the SR
  await clickOn(() => pane(1));
  const srThumb = `[data-cy="study-browser-thumbnail-no-image"][data-series="${expected.sr_series_number}"]`;
  await clickOn(() => page.waitForSelector(srThumb), { count: 2 });
  // OHIF offers to load ("track") an SR's measurements only when it can hydrate them
  await page.waitForFunction(
    () => document.body.innerText.includes('Do you want to continue tracking measurements for this study?'),
    { timeout: Math.min(WAIT_MS, 90000) }).catch(() => {
    throw new CheckFailed('OHIF does not offer to load the SR\'s measurements: it finds no group it can hydrate '
      + '(Tracking Identifier of one of its tools, first NUM inferred from the outline)');
  });
  pass('OHIF offers to load the SR\'s measurements (the SR is compatible with it)');
  await clickOn(() => page.waitForSelector('[data-cy="yes-hydrate-btn"]'));
  await clickOn(() => page.waitForSelector('[data-cy="trackedMeasurements-btn"]'));
  const wanted = expected.measurements.map((m) => m.label);
  const header = `Measurements (${wanted.length})`;
  await page.waitForFunction((text) => document.body.innerText.includes(text), { timeout: WAIT_MS }, header)
    .catch(async () => {
      const shown = (await page.evaluate(() => document.body.innerText)).match(/Measurements \(\d+\)/);
      throw new CheckFailed(`the Measurements panel shows ${shown ? shown[0] : 'no count'}, not "${header}"`);
    });
  const titles = async () => page.$$eval('[data-cy^="measurement-table-row-"] [data-cy="data-row-title"]',
    (els) => els.map((e) => e.innerText.trim()));
  const listed = await titles();
  fs.writeFileSync(path.join(artifacts, 'measurements.json'), JSON.stringify(listed, null, 2));
  assert(JSON.stringify(listed) === JSON.stringify(wanted),
    `the Measurements panel lists ${JSON.stringify(listed)}, not the SR's ${JSON.stringify(wanted)}`);
  const findings = expected.measurements.filter((m) => m.probability !== null);
  assert(findings.length === expected.placed_findings.length && findings.length > 0,
    `${findings.length} findings among the measurements, the SR places ${expected.placed_findings.length}`);
  for (const finding of findings) {
    assert(finding.label.startsWith(finding.finding) && finding.label.includes(`p = ${finding.probability.toFixed(2)}`),
      `measurement "${finding.label}" does not name ${finding.finding} with its probability`);
  }
  pass(`${header}: the ${findings.length} placed findings by name and probability (${findings.map((f) => f.label).join('; ')}) and ${wanted.length - findings.length} structure outlines`);
  for (const name of expected.unplaced_findings) {
    assert(!listed.some((title) => title.startsWith(name)), `${name} has no location but is listed`);
  }
  pass(`findings without a location are not listed: ${expected.unplaced_findings.join(', ')}`);

  // a click on a measurement shows its key slice with the outline OHIF measures as the SR's area
  const sliceOf = async (index) => {
    const text = await (await pane(index)).$eval('[data-cy="viewport-overlay-bottom-right"]', (e) => e.innerText);
    const match = text.match(/I:\s*(\d+)/);
    return match ? Number(match[1]) : null;
  };
  const areaShown = (labels, area) => labels.some((label) => {
    const match = label.match(/Area: ([0-9.]+) mm²/); // a text box: its lines run together
    return match && Math.abs(Number(match[1]) - area) <= Math.max(1, 0.01 * area);
  });
  const jumps = [...findings, expected.measurements.find((m) => m.probability === null)].filter(Boolean);
  const seenSlices = [];
  for (const measurement of jumps) {
    await clickOn(() => byText(measurement.label, '[data-cy="data-row-title"]'));
    await page.waitForFunction((n) => {
      const right = document.querySelectorAll('[data-cy="viewport-pane"]')[1];
      const text = right?.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText || '';
      return new RegExp(`I:\\s*${n}\\b`).test(text);
    }, { timeout: 60000 }, measurement.instance_number).catch(() => {});
    const slice = await sliceOf(1);
    assert(slice === measurement.instance_number,
      `after a click on "${measurement.label}" the SR viewport shows image ${slice}, not its key slice ${measurement.instance_number}`);
    let labels = [];
    for (let tries = 0; tries < 20 && !areaShown(labels, measurement.area_mm2); tries += 1) {
      await sleep(500);
      labels = await svgLabels(1);
    }
    assert(areaShown(labels, measurement.area_mm2),
      `on the key slice of "${measurement.label}" OHIF draws no outline of area ${measurement.area_mm2} mm²; labels ${JSON.stringify(labels)}`);
    seenSlices.push(slice);
  }
  assert(new Set(seenSlices).size > 1, `every jump showed the same image ${seenSlices[0]}`);
  pass(`a click on a measurement jumps to its key slice and OHIF draws its outline with the SR's area: ${jumps.map((m, i) => `${m.finding} image ${seenSlices[i]}`).join(', ')}`);
  // the first finding for the picture, the Measurements panel beside the SEG and the SR
  await clickOn(() => byText(findings[0].label, '[data-cy="data-row-title"]'));
  await page.mouse.move(5, 995);
  await settle(3000);
  await page.screenshot({ path: path.join(artifacts, '3-seg-sr.png'), captureBeyondViewport: false });

  // ---------------------------------------------------------------- 4. the console
  assert(errors.length === 0, `the page reported errors:\n  ${errors.join('\n  ')}`);
  pass('no console error and no page error');
} catch (error) {
  code = 1;
  say(`FAILED: ${error instanceof CheckFailed ? error.message : error.stack}`);
  if (errors.length) say(`errors in the page:\n  ${errors.join('\n  ')}`);
  await page.screenshot({ path: path.join(artifacts, 'failure.png') }).catch(() => {});
} finally {
  fs.writeFileSync(path.join(artifacts, 'console.log'), consoleLines.join('\n') + '\n');
  await browser.close();
}
say(code === 0 ? `all ${passed.length} checks passed` : `failed after ${passed.length} passed checks`);
process.exit(code);
