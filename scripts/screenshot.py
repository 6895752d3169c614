"""Screenshot a page the way a person would see it: headless Chromium renders a report file or a
URL (the scoring service's ``/docs``, say) to a PNG.

    python scripts/screenshot.py reports/demo/report.html reports/demo/report.png
    python scripts/screenshot.py http://127.0.0.1:8000/docs docs.png --height 1400

Chromium comes from the system (Debian: ``apt-get install chromium``); nothing is downloaded.
The exit status is Chromium's, and the PNG must exist and not be empty, so a page that fails to
render fails the script.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise SystemExit(f"no headless browser on PATH ({', '.join(BROWSERS)}): apt-get install chromium")


def screenshot(page: str, out: Path, width: int = 1100, height: int = 2400, wait_ms: int = 3000) -> Path:
    url = page if "://" in page else Path(page).resolve().as_uri()
    out = out.resolve()
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        argv = [
            browser(),
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",  # let scripts (Swagger UI) render before the shot
            f"--screenshot={out}",
            url,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise SystemExit(f"chromium could not render {url} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="an HTML file or a URL")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    path = screenshot(args.page, args.out, args.width, args.height)
    print(f"{path} ({path.stat().st_size:,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
