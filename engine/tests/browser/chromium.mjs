// Debian's Chromium as every browser test launches it (CHROMIUM overrides
// the path): headless, no sandbox, no GPU, no background networking.
import { chromium } from 'playwright-core';

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
}
