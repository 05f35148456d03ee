"""Renders a report page in headless Chromium and saves a full-page screenshot (PNG).

  python docs/tools/screenshot_report.py /tmp/shpeft_demo/report/report.html docs/img/report.png

Uses Debian's chromium (`apt-get install chromium`); the flags keep it off the network (this
machine has none) and away from the user's profile. The height is chosen large enough for the
whole page; the blank bottom is cropped, so the PNG shows what a reader scrolls through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def chromium() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: str, out: str, *, width: int = 1400, height: int = 6000) -> tuple[int, int]:
  """Screenshot of `page` into `out`, cropped below the last non-white row; returns its size."""
  exe = chromium()
  if exe is None:
    raise SystemExit("error: chromium not found; install Debian's chromium package.")
  with tempfile.TemporaryDirectory() as profile:
    raw = os.path.join(profile, "raw.png")
    subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                    f"--screenshot={raw}", "file://" + os.path.abspath(page)],
                   check=True, capture_output=True, timeout=120)
    with Image.open(raw) as im:
      a = np.asarray(im.convert("L"))
      rows = np.flatnonzero((a < 245).any(axis=1))
      bottom = int(rows[-1]) + 20 if rows.size else a.shape[0]
      im.crop((0, 0, a.shape[1], min(bottom, a.shape[0]))).save(out)
      return a.shape[1], min(bottom, a.shape[0])


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit(__doc__)
  print(screenshot(sys.argv[1], sys.argv[2]))
