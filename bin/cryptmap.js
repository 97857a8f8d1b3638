#!/usr/bin/env node
// Entry point: the compiled CLI lives in dist/ (built by `npm ci` via the prepare script).
import { main } from '../dist/src/cli/main.js';

const code = await main(process.argv.slice(2), {
  stdin: process.stdin,
  stdout: process.stdout,
  stderr: process.stderr,
  env: process.env,
});
process.exitCode = code;
