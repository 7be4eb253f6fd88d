"""Decoding policy of `vitprobe.data.images`: corrupt JPEG scan data is warned about when libjpeg itself
reports enough leftover scan data, and never for healthy JPEGs of any common encoding."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vitprobe.data import DatasetWarning
from vitprobe.data.images import decode, jpeg_end_of_image


def _jpeg(**options: object) -> bytes:
    image = Image.fromarray(skimage.data.astronaut())  # 512 x 512 photo
    mode = options.pop("mode", None)
    if mode:
        image = image.convert(str(mode))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _with_exif_thumbnail() -> bytes:
    """A JPEG whose APP1 segment holds a whole JPEG thumbnail (its own SOI ... EOI)."""
    thumbnail = _jpeg(quality=50)[:]
    main = _jpeg(quality=90)
    app1 = b"Exif\x00\x00" + thumbnail  # not a parseable TIFF, but a segment with markers inside
    return main[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + main[2:]


HEALTHY = {
    "baseline": lambda: _jpeg(quality=90),
    "progressive": lambda: _jpeg(quality=85, progressive=True),
    "optimised": lambda: _jpeg(quality=75, optimize=True),
    "quality-20": lambda: _jpeg(quality=20),
    "4:4:4": lambda: _jpeg(quality=90, subsampling=0),
    "grayscale": lambda: _jpeg(mode="L"),
    "cmyk": lambda: _jpeg(mode="CMYK"),
    "restart-markers": lambda: _jpeg(quality=90, restart_marker_blocks=4),
    "exif-thumbnail": _with_exif_thumbnail,
    "data-after-eoi": lambda: _jpeg(quality=90) + b"\x00" * 300 + b"trailer",
}


def _flip(data: bytes, at: float, count: int = 8) -> bytes:
    """Flip `count` bytes of the entropy-coded data at fraction `at` of it."""
    out = bytearray(data)
    start = out.find(b"\xff\xda")
    pos = start + int((len(out) - start) * at)
    for i in range(pos, pos + count):
        out[i] ^= 0x5A
    return bytes(out)


def _libjpeg_reports(paths: list[Path]) -> dict[str, str]:
    """What libjpeg prints for each file (decoded through OpenCV in one child process)."""
    code = (
        "import os, sys, cv2\n"
        "for p in sys.argv[1:]:\n"
        "    os.write(2, ('@@' + p + '\\n').encode())\n"
        "    cv2.imread(p)\n"
    )
    err = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True
    ).stderr
    reports: dict[str, str] = {}
    for chunk in err.split("@@")[1:]:
        name, _, text = chunk.partition("\n")
        reports[Path(name).name] = text.strip()
    return reports


def _warnings_of(path: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(path, where="test", missing_hint="-")
    return [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]


def test_warns_exactly_where_libjpeg_reports_leftover_scan_data(tmp_path: Path) -> None:
    files = {}
    for name, make in HEALTHY.items():
        files[f"{name}.jpg"] = make()
    for at in (0.3, 0.5, 0.8, 0.95):
        files[f"flip-{at}.jpg"] = _flip(HEALTHY["baseline"](), at)
    files["progressive-flip.jpg"] = _flip(HEALTHY["progressive"](), 0.6)
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    libjpeg = _libjpeg_reports(paths)
    assert set(libjpeg) == set(files)
    for name in HEALTHY:
        assert libjpeg[f"{name}.jpg"] == "", name  # the reference decoder finds nothing wrong
        assert _warnings_of(tmp_path / f"{name}.jpg") == [], name
    flagged = 0
    for path in paths:
        match = re.search(r"(\d+) extraneous bytes before marker", libjpeg[path.name])
        leftover = int(match.group(1)) if match else 0  # libjpeg's count of unread scan bytes
        ours = _warnings_of(path)
        if leftover > 64 + 16:  # one fine block plus the slack: always seen
            assert ours and str(path) in ours[0] and "corrupt JPEG data" in ours[0], (path.name, leftover)
            flagged += 1
        elif leftover <= 16:  # within the slack (0: libjpeg saw nothing left over)
            assert ours == [], (path.name, libjpeg[path.name], ours)
    assert flagged >= 2, "the corruptions chosen do produce the case under test"


def test_a_scan_that_runs_short_is_not_detected(tmp_path: Path) -> None:
    """The documented limit: zeroed scan data makes libjpeg hit the end marker early ('premature end of data
    segment'), which leaves no bytes over; vitprobe does not warn about it."""
    data = bytearray(HEALTHY["baseline"]())
    start = data.find(b"\xff\xda")
    at = start + (len(data) - start) // 2
    data[at : at + 2000] = bytes(2000)
    (tmp_path / "short.jpg").write_bytes(bytes(data))
    assert "premature end of data segment" in _libjpeg_reports([tmp_path / "short.jpg"])["short.jpg"]
    assert _warnings_of(tmp_path / "short.jpg") == []


@pytest.mark.parametrize(
    "name", ["baseline", "progressive", "restart-markers", "exif-thumbnail", "data-after-eoi"]
)
def test_end_of_image_is_the_main_images_eoi_marker(name: str) -> None:
    data = HEALTHY[name]()
    end = jpeg_end_of_image(data)
    assert end is not None and data[end : end + 2] == b"\xff\xd9"
    if name == "data-after-eoi":
        assert end == len(data) - 309  # 300 zero bytes and b"trailer" follow the marker
    elif name != "exif-thumbnail":
        assert end == len(data) - 2
    else:
        assert end == len(data) - 2 and data.find(b"\xff\xd9") < end  # the thumbnail's own EOI is skipped
    assert jpeg_end_of_image(b"\x89PNG\r\n\x1a\n") is None
    assert jpeg_end_of_image(data[: len(data) // 2]) is None  # truncated: no end marker


def test_decoded_pixels_are_pillows(tmp_path: Path) -> None:
    for name in ("baseline", "progressive", "cmyk"):
        (tmp_path / f"{name}.jpg").write_bytes(HEALTHY[name]())
        expected = np.asarray(Image.open(tmp_path / f"{name}.jpg").convert("RGB"))
        assert np.array_equal(
            np.asarray(decode(tmp_path / f"{name}.jpg", where="t", missing_hint="-")), expected
        )
