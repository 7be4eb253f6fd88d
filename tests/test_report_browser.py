"""The two-checkpoint study's HTML report in a real browser: headless Chromium loads it from disk, every
table is laid out and names both runs, every image decodes."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from report_fixtures import RealRuns, session_runs, sweep_runs

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
  const tables = Array.from(document.querySelectorAll("table")).map((t) => {
    const box = t.getBoundingClientRect();
    return {id: t.id, text: t.innerText, size: [box.width, box.height],
            rows: Array.from(t.querySelectorAll("tbody tr"))
              .map((r) => Array.from(r.cells).map((c) => c.innerText))};
  });
  const out = {
    images: imgs.length,
    loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    captions: Array.from(document.querySelectorAll("figcaption")).map((c) => c.textContent),
    tables: tables,
    title: document.title,
    width: document.documentElement.scrollWidth,
  };
  const pre = document.createElement("pre");
  pre.id = "browser-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> RealRuns:
    return session_runs(tmp_path_factory)


def _render_in_chromium(page: Path, tmp_path: Path) -> dict:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
        "--window-size=1280,2000", "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    match = re.search(r'<pre id="browser-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page script did not run; chromium said:\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_study_report_names_both_runs_in_every_table_and_legend(real: RealRuns, tmp_path: Path) -> None:
    report = real.out / "report.html"  # written by `vitprobe run` (killed once, resumed)
    text = report.read_text(encoding="utf-8")
    assert "<script" not in text and report.stat().st_size < 1_500_000
    page = tmp_path / "probe.html"  # the report plus the probe script
    page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    seen = _render_in_chromium(page, tmp_path)
    assert seen["title"] == "test_vit: two checkpoints"
    assert seen["images"] >= 8 and seen["loaded"] == seen["images"]  # every embedded figure decoded
    ids = {t["id"] for t in seen["tables"]}
    assert {"pivot", "readouts", "why-cls-loses", "localization", "weakest", "provenance"} <= ids
    for table in seen["tables"]:
        assert table["size"][0] > 0 and table["size"][1] > 0, table["id"]  # laid out, visible
        assert "ckpt-a" in table["text"] and "ckpt-b" in table["text"], table["id"]
    pivot = next(t for t in seen["tables"] if t["id"] == "pivot")
    assert [row[0] for row in pivot["rows"]] == ["ckpt-a", "ckpt-b"]
    for row in pivot["rows"]:  # every top-1 with its interval; below it the lr, epoch and verdict
        assert all(re.match(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", cell) for cell in row[3:])
        assert all(re.search(r"(ok|warning|optimistic)$", cell.strip()) for cell in row[3:])
    for caption in seen["captions"]:  # every figure says whose it is: both runs, or its run
        assert ("ckpt-a" in caption) or ("ckpt-b" in caption), caption
    cross = [c for c in seen["captions"] if "ckpt-a" in c and "ckpt-b" in c]
    assert len(cross) >= 3  # attention per block, frequency per layer, spectra: one figure each, both runs
    assert seen["width"] <= 1300  # nothing overflows the page sideways


def test_a_sweep_report_names_both_runs_in_its_depth_table_and_figure(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from vitprobe.report import ReportConfig, write_report

    runs = tuple(str(p) for p in sweep_runs(tmp_path_factory).values())
    page = tmp_path / "sweep.html"
    text = write_report(ReportConfig(runs=runs, out=str(page))).text
    page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    seen = _render_in_chromium(page, tmp_path)
    assert seen["loaded"] == seen["images"] >= 4
    depth = next(t for t in seen["tables"] if t["id"] == "depth")
    assert depth["size"][1] > 0 and {row[0] for row in depth["rows"]} == {"ckpt-a", "ckpt-b"}
    for table in seen["tables"]:
        assert "ckpt-a" in table["text"] and "ckpt-b" in table["text"], table["id"]
    assert "Accuracy vs depth: ckpt-a, ckpt-b" in seen["captions"]
    import base64

    (data,) = re.findall(r'<img src="data:image/svg\+xml;base64,([^"]+)" alt="Accuracy vs depth', text)
    svg = base64.b64decode(data).decode()  # the figure's own legend names both runs (SVG text)
    assert "ckpt-a" in svg and "ckpt-b" in svg and "block (0-based)" in svg
