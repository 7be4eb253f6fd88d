"""`torchrun --nproc_per_node 2 -m vitprobe extract` (gloo, CPU) writes the same cache as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitprobe.cache import open_cache
from vitprobe.data import stratified_subset


@pytest.mark.slow
def test_two_processes_write_the_single_process_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    data = f"imagefolder:{tmp_path / 'images'}"
    common = ["extract", "--model", "timm:test_vit", "--random-init", "--data", data,
              "--split", "all", "--layers=-1,1", "--workers", "0", "--batch-size", "2", "--shard-size", "2",
              "--limit", "7", "--store", "fp32"]
    # one thread per process: the two runs must do the same arithmetic in the same batches
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "vitprobe", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run([*launcher, "-m", "vitprobe", *common, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    assert "on 2 processes" in multi.stderr
    one, two = open_cache(tmp_path / "one", verify=True), open_cache(tmp_path / "two", verify=True)
    # 4 shards: ranks 0 and 1 write shards 0 and 1, then 2 and 3
    assert [(s.start, s.stop) for s in two.shards] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [s.sha256 for s in two.shards] == [s.sha256 for s in one.shards]
    for x, y in zip(one.iter_shards(), two.iter_shards(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert two.indices().tolist() == stratified_subset([0] * 4 + [1] * 4, 7)  # --limit 7: stratified by class
    assert two.manifest["config"]["out"] == str(tmp_path / "two") and two.complete


_GROUP_LIFETIME = """
import os, sys
import torch
import torch.distributed as dist
from vitprobe.ranks import init_distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

rank, world, created = init_distributed(torch.device("cpu"))
assert created and world == 2
during = gloo_threads()
import timm  # what an extraction imports once the group exists (it loads the backbone after)
timm.create_model("test_vit", pretrained=False)
dist.destroy_process_group()
print(f"rank {rank}: gloo threads during {during}, after destroy {gloo_threads()}", file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_destroying_the_process_group_stops_its_gloo_threads_after_timm_is_imported(tmp_path: Path) -> None:
    # A group kept alive past destroy_process_group (by torch.distributed.nn's defaults, bound at import) has
    # its threads torn down with the interpreter, which aborted a finished torchrun extraction at random.
    script = tmp_path / "group_lifetime.py"
    script.write_text(_GROUP_LIFETIME)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = sorted(line for line in run.stderr.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, run.stderr
    for line in lines:
        during, after = line.split("during ")[1].split(", after destroy ")
        assert "gloo" in during, line  # the check sees the group's threads while it exists
        assert after == "[]", line
