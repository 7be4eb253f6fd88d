"""Provenance: versions() names the installed software without importing model code."""

from __future__ import annotations

import json
import subprocess
import sys


def test_versions_reads_timm_without_importing_it() -> None:
    code = (
        "import json, sys; from vitprobe.provenance import versions; v = versions(); "
        "print(json.dumps({'imported': 'timm' in sys.modules, 'timm': v['timm']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    import timm

    from vitprobe.provenance import versions

    assert seen == {"imported": False, "timm": timm.__version__}  # no seconds-long timm import for a version
    assert versions()["timm"] == timm.__version__  # and the same answer once timm is imported
