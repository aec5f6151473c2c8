#!/usr/bin/env node
// Runs the test tiers in order (unit, kernel, pipy, e2e, or those named on the
// command line), each as its own jest run, and ends with one plain summary line
// "tests: N passed, N failed, N skipped" that CI reads. Exit 1 if any failed.
// FSM_LAB_LOCK=FILE runs the e2e tier under `flock FILE`: it brings up the lab,
// whose names are fixed, so two runs on one kernel must take turns.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const tiers = process.argv.slice(2).length ? process.argv.slice(2) : ['unit', 'kernel', 'pipy', 'e2e'];
const totals = { passed: 0, failed: 0, skipped: 0 };
let broken = false;

mkdirSync(`${root}/.cache`, { recursive: true });
for (const tier of tiers) {
  const out = `${root}/.cache/jest-${tier}.json`;
  rmSync(out, { force: true });
  const args = ['--experimental-vm-modules', 'node_modules/jest/bin/jest.js', '--selectProjects', tier, '--passWithNoTests', '--json', `--outputFile=${out}`];
  if (tier !== 'unit') args.push('--runInBand');
  console.log(`\n== ${tier} tier ==`);
  const lock = tier === 'e2e' ? process.env.FSM_LAB_LOCK : undefined;
  if (lock) console.log(`(e2e waits for ${lock})`);
  const r = lock
    ? spawnSync('flock', [lock, process.execPath, ...args], { cwd: root, stdio: 'inherit' })
    : spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' });
  let report;
  try {
    report = JSON.parse(readFileSync(out, 'utf8'));
  } catch {
    console.log(`${tier}: jest produced no report (exit ${r.status}); counting the tier as failed`);
    broken = true;
    totals.failed += 1;
    continue;
  }
  totals.passed += report.numPassedTests;
  totals.failed += report.numFailedTests;
  totals.skipped += report.numPendingTests + report.numTodoTests;
  if (r.status !== 0 && report.numFailedTests === 0) {
    console.log(`${tier}: jest exited ${r.status} (a suite failed to run)`);
    broken = true;
    totals.failed += report.numFailedTestSuites || 1;
  }
}
console.log(`\ntests: ${totals.passed} passed, ${totals.failed} failed, ${totals.skipped} skipped`);
process.exit(totals.failed > 0 || broken ? 1 : 0);
