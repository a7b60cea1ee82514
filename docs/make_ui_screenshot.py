"""Take docs/ui.png: the browser UI mid-denoising, from a real ``pixeldiffusion serve`` run.

    python docs/make_ui_screenshot.py [-cp runs/digits] [--out docs/ui.png]

Starts ``pixeldiffusion serve`` on a free port, opens the page in headless Chromium
(/usr/bin/chromium through Playwright), presses Generate and saves a screenshot once the chosen
fraction of the steps is done. Needs the [dev] extra and Debian's chromium package.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-cp", "--checkpoint", default="runs/digits")
    parser.add_argument("--out", default="docs/ui.png")
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--at", type=float, default=0.6, help="fraction of steps done")
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pixeldiffusion", "serve", "-cp",
                               args.checkpoint, "--port", str(port), "--device", "cpu"])
    profile = tempfile.mkdtemp(prefix="pixeldiffusion-chromium-")
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("pixeldiffusion serve exited; see its message above")
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                viewport={"width": 1000, "height": 760})
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#generate:not([disabled])")
            page.select_option("#sampler", args.sampler)
            page.fill("#steps", str(args.steps))
            page.fill("#batch", str(args.batch))
            page.fill("#seed", str(args.seed))
            page.click("#generate")
            target = int(args.at * args.steps)
            while True:
                match = re.search(r"step (\d+) of", page.text_content("#status") or "")
                if match and int(match.group(1)) >= target:
                    break
                page.wait_for_timeout(20)
            page.screenshot(path=args.out)
            print(f"{args.out}: {page.text_content('#status')}")
            page.wait_for_selector("#download:not([hidden])", timeout=600_000)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
