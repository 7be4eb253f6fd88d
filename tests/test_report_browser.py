"""The HTML report in a real browser: headless Chromium loads it from disk and shows the table and images."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from report_fixtures import make_run
from vitprobe.report import ReportConfig, write_report

CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no headless Chromium on PATH: install Debian's chromium (apt-get install chromium "
        "chromium-driver; .ci/run does this) to run the browser test",
    ),
]

# Runs in the page after load and writes what the browser sees into the DOM, read back with --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const rows = Array.from(document.querySelectorAll("#accuracy tbody tr"));
  const table = document.getElementById("accuracy");
  const box = table ? table.getBoundingClientRect() : {width: 0, height: 0};
  const out = {
    images: imgs.length,
    loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    rows: rows.map((r) => Array.from(r.cells).map((c) => c.textContent)),
    table_size: [box.width, box.height],
    warning: (document.getElementById("random-init-warning") || {}).textContent || "",
    title: document.title,
  };
  const pre = document.createElement("pre");
  pre.id = "browser-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _render_in_chromium(page: Path, tmp_path: Path) -> dict:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
        "--dump-dom", page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="browser-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page script did not run; chromium said:\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_html_report_shows_table_and_images_in_chromium(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path, "mae-tiny", cls=0.5, abmilp=0.7),
        make_run(tmp_path, "dino-tiny", cls=0.6, abmilp=0.65, random_init=False, with_analyses=False),
    ]
    out = write_report(ReportConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "report.html")))
    page = tmp_path / "probe.html"  # the report plus the probe script; the report itself has no script
    page.write_text(out.text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    seen = _render_in_chromium(page, tmp_path)
    assert seen["title"] == "vitprobe report"
    assert seen["images"] >= 6 and seen["loaded"] == seen["images"]  # every embedded figure decoded
    assert seen["table_size"][0] > 0 and seen["table_size"][1] > 0  # the table is laid out, visible
    assert len(seen["rows"]) == 10  # 2 runs × (cls, mean, abmilp, k-NN k=10, k=20)
    row = ["mae-tiny ⚠ random weights", "synthetic:needles", "abmilp", "70.0", "95.0", "+20.0"]
    assert row in seen["rows"]
    assert "RANDOM WEIGHTS" in seen["warning"]
