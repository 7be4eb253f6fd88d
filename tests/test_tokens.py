"""The token feed: mapped shards equal safetensors, multi-layer reads, the stream's order, memory bounds,
reused buffers, resident evaluation splits, verification, load_whole and pooled_source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vitprobe.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TokenCache,
    open_cache,
    shard_entries,
    write_final_norm,
    write_manifest,
    write_shard,
)
from vitprobe.errors import CacheError
from vitprobe.mapped import MappedFile
from vitprobe.sources import CacheSource, MemorySource
from vitprobe.stream import plan_groups, plan_windows, stream_batches
from vitprobe.tokens import Split, iter_batches, load_whole, pooled_source, to_tokens

GRID, DIM, CLASSES = (2, 2), 8, 3
CPU = torch.device("cpu")


def rows_of(start: int, stop: int, layers: int) -> dict[str, torch.Tensor]:
    """Rows whose values encode (row, layer, token, channel) exactly in fp16 (row < 40)."""
    n, p = stop - start, GRID[0] * GRID[1]
    row = torch.arange(start, stop, dtype=torch.float32).view(n, 1, 1, 1)
    base = row * 50 + torch.arange(layers).view(1, layers, 1, 1) * 10  # (n, L, 1, 1)
    patches = base + torch.arange(p).view(1, 1, p, 1) + torch.arange(DIM).view(1, 1, 1, DIM) / 16
    cls = base[:, :, 0] - 1 + torch.zeros(DIM)  # (n, L, D)
    if layers == 1:
        patches, cls = patches[:, 0], cls[:, 0]
    return {
        "patches": patches.half(),
        "cls": cls.half(),
        "labels": torch.arange(start, stop) % CLASSES,
        "indices": torch.arange(start, stop),
    }


def write_cache(path: Path, n: int = 37, shard: int = 10, layers: tuple[int, ...] = (7,)) -> TokenCache:
    shards = [
        write_shard(path, i, s, rows_of(s, min(s + shard, n), len(layers)))
        for i, s in enumerate(range(0, n, shard))
    ]
    write_manifest(
        path,
        {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "model": {"spec": "toy", "timm_name": "toy", "checkpoint": "x", "random_init": False,
                      "source": "x"},
            "layers": list(layers), "grid": list(GRID), "dim": DIM, "num_prefix_tokens": 1, "has_cls": True,
            "num_reg_tokens": 0, "tokens": "all", "store_dtype": "fp16", "views": 0, "seed": 0,
            "dataset": {"spec": "x", "split": "train", "fingerprint": "f", "num_classes": CLASSES,
                        "class_names": [str(c) for c in range(CLASSES)]},
            "num_samples": n, "shard_size": shard, "shards": shard_entries(shards),
            "final_norm": write_final_norm(path, torch.nn.LayerNorm(DIM)), "complete": True,
        },
    )
    return open_cache(path)


def row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """Source row of each batch row, decoded from its [cls] value (single-layer caches)."""
    return ((batch["cls"][:, 0].float() + 1) / 50).round().long().tolist()


def test_mapped_file_equals_safetensors_for_every_dtype(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f16": torch.randn(5, 3, generator=g).half(),
        "bf16": torch.randn(4, 2, 3, generator=g).bfloat16(),
        "f32": torch.randn(7, generator=g),
        "f8": torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn),
        "i8": torch.randint(-100, 100, (3, 5), generator=g, dtype=torch.int8),
        "i64": torch.arange(9),
        "flag": torch.tensor([True, False, True]),
    }
    file = tmp_path / "x.safetensors"
    save_file(tensors, str(file), metadata={"a": "b"})
    mapped = MappedFile(file)
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            ours = mapped.tensor(key)
            assert ours.dtype == tensors[key].dtype and ours.shape == tensors[key].shape
            assert torch.equal(ours.view(torch.uint8), f.get_tensor(key).view(torch.uint8)), key
    mapped.page_in("f16", torch.tensor([0, 1, 3]))  # a hint: the values stay what they are
    mapped.page_in("bf16", torch.tensor([2]), part=(0, 6))
    assert torch.equal(mapped.tensor("f16"), tensors["f16"])
    rows = torch.tensor([0, 2, 3])  # read without mapping: whole rows, or part of each row
    assert torch.equal(mapped.read_rows("bf16", rows).view(torch.bfloat16), tensors["bf16"][rows].flatten(1))
    part = mapped.read_rows("bf16", rows, part=(6, 6)).view(torch.bfloat16)  # bytes 6..12: [1, :]
    assert torch.equal(part, tensors["bf16"][rows, 1])
    (tmp_path / "bad.safetensors").write_text("not a safetensors file")
    with pytest.raises(CacheError, match="cannot map"):
        MappedFile(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("layer", [5, [3, 5, 7], [5, 7], [7, 3], [3, 7], [3, 5, 6]])
def test_cache_source_reads_one_block_or_several(tmp_path: Path, layer: int | list[int]) -> None:
    cache = write_cache(tmp_path, layers=(3, 5, 6, 7))
    source = CacheSource(cache, layer)
    pos = [cache.layers.index(b) for b in ([layer] if isinstance(layer, int) else layer)]
    whole = load_whole(source, ["patches", "cls"], CPU)
    stored = torch.cat([cache.read_shard(i, ["patches"])["patches"] for i in range(len(cache.shards))])
    expected = stored[:, pos[0]] if isinstance(layer, int) else stored[:, pos]  # (n, P, D) | (n, L', P, D)
    assert torch.equal(whole["patches"], expected)
    split = Split("s", source, torch.arange(0, 37, 3))
    g = torch.Generator().manual_seed(1)
    batches = list(iter_batches(split, ["patches"], 4, generator=g, buffer_mb=0.001))
    got = torch.cat([b["patches"] for b in batches])
    assert got.shape[1:] == expected.shape[1:]
    order = torch.cat([b["labels"] for b in batches])
    assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == sorted((split.rows % 3).tolist())
    # every gathered row is the stored row it claims to be (labels follow the rows)
    for r, lab in zip(got, order.tolist(), strict=True):
        matches = [i for i in split.rows.tolist() if torch.equal(expected[i], r)]
        assert len(matches) == 1 and matches[0] % CLASSES == lab
    assert source.row_bytes(["patches"]) == 8 + expected[0].numel() * 2
    with pytest.raises(CacheError, match="not in the cache"):
        CacheSource(cache, [3, 4])


def test_the_stream_gives_every_row_once_deterministically_across_windows_and_groups(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=37, shard=10)
    source = CacheSource(cache, 7)
    rows = torch.tensor([r for r in range(37) if r % 4])  # a split with gaps
    split = Split("train", source, rows)
    row_bytes = source.row_bytes(["cls", "patches"])
    buffer_mb = 6 * row_bytes / 2**20  # groups of 3 rows, windows of 1-2 rows: many of both

    def epoch(seed: int, e: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [
            row_ids(b)
            for b in iter_batches(split, ["cls", "patches"], 4, epoch=e, generator=g, buffer_mb=buffer_mb)
        ]

    first = epoch(0, 0)
    assert sorted(r for b in first for r in b) == rows.tolist()
    assert [len(b) for b in first] == [4] * 6 + [3]
    assert first == epoch(0, 0)  # seeded: the same batches
    assert first != epoch(1, 0)  # another seed: another order
    flat = [r for b in first for r in b]
    assert flat != sorted(flat)
    dropped = [
        row_ids(b)
        for b in iter_batches(
            split, ["cls"], 4, generator=torch.Generator().manual_seed(0), drop_last=True, buffer_mb=buffer_mb
        )
    ]
    assert [len(b) for b in dropped] == [4] * 6
    in_order = [r for b in iter_batches(split, ["cls"], 5, buffer_mb=buffer_mb) for r in row_ids(b)]
    assert in_order == rows.tolist()
    memory = Split("train", source, rows, memory=load_whole(source, ["cls"], CPU))
    assert [r for b in iter_batches(memory, ["cls"], 5) for r in row_ids(b)] == rows.tolist()


def test_stream_memory_is_bounded_by_the_buffer_not_the_shard_size() -> None:
    """Windows cut big shards; groups hold about half the buffer, however large the shards are."""
    n, row = 10_000, 1000
    for shard in (1000, 5000, 10_000):
        source = MemorySource({"cls": torch.zeros(n, 1), "labels": torch.zeros(n, dtype=torch.long)})
        source.blocks = [(s, min(s + shard, n)) for s in range(0, n, shard)]
        windows = plan_windows(source, torch.arange(n), per_window=250)
        assert max(len(w.local) for w in windows) == 250
        assert all(source.blocks[w.block][0] <= int(w.rows[0]) for w in windows)
        groups = plan_groups(windows, row, group_bytes=1_000_000)
        assert max(sum(len(w.local) for w in grp) for grp in groups) * row <= 1_000_000


def test_reused_buffers_never_change_what_to_tokens_returned(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=37, shard=10)
    split = Split("train", CacheSource(cache, 7), torch.arange(37))
    g = torch.Generator().manual_seed(0)
    kept, ids = [], []
    for batch in iter_batches(split, ["cls"], 4, generator=g):
        ids.append(row_ids(batch))
        kept.append(to_tokens(batch, CPU, None).cls)  # the feed may refill the batch's buffer now
    for tokens, rows in zip(kept, ids, strict=True):
        assert torch.equal(tokens[:, 0], torch.tensor(rows, dtype=torch.float32) * 50 - 1)
    # a caller that keeps raw batches (never calls to_tokens) gets buffers of its own
    held = list(iter_batches(split, ["cls"], 4, generator=torch.Generator().manual_seed(0)))
    assert [row_ids(b) for b in held] == ids


class CountingSource(MemorySource):
    opened = 0

    def open_block(self, i, keys):  # type: ignore[no-untyped-def]
        CountingSource.opened += 1
        return super().open_block(i, keys)


def test_an_evaluation_split_read_again_is_served_from_memory() -> None:
    n = 40
    source = CountingSource({"cls": torch.arange(n, dtype=torch.float16)[:, None] * 50 - 1,
                             "labels": torch.arange(n) % CLASSES}, block_size=8)
    held = Split("holdout", source, torch.arange(3, n, 10))

    def passes() -> list[list[int]]:
        return [row_ids(b) for b in iter_batches(held, ["cls"], 3)]

    first = passes()
    opened = CountingSource.opened
    assert first == [[3, 13, 23], [33]]
    assert passes() == first  # the second pass gathers the rows into memory once
    assert held.resident[("cls",)]["cls"].dtype == torch.float16  # kept in the stored dtype
    opened = CountingSource.opened
    assert passes() == first and passes() == first
    assert CountingSource.opened == opened  # later passes never open a block


def test_a_corrupt_shard_stops_the_stream_and_an_early_stop_does_not_hang(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=37, shard=10)
    clean = Split("train", CacheSource(cache, 7), torch.arange(37))
    first = next(iter(iter_batches(clean, ["cls"], 4, buffer_mb=0.0001)))  # stop after one batch
    assert len(first["cls"]) == 4
    file = cache.path / cache.shards[2].file
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # tensor bytes: the header still parses
    file.write_bytes(bytes(data))
    split = Split("train", CacheSource(open_cache(tmp_path), 7), torch.arange(37))
    for buffer_mb in (None, 0.0001):  # one group, or many (verification runs beside the reading)
        with pytest.raises(CacheError, match="corrupt"):
            for _ in iter_batches(split, ["cls"], 4, generator=torch.Generator(), buffer_mb=buffer_mb):
                pass
    unverified = Split("train", CacheSource(open_cache(tmp_path), 7, verify=False), torch.arange(37))
    assert sum(len(b["cls"]) for b in iter_batches(unverified, ["cls"], 8)) == 37


def test_load_whole_and_pooled_source_equal_the_stored_rows(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=23, shard=5)
    source = CacheSource(cache, 7)
    stored = {k: torch.cat([cache.read_shard(i, [k])[k] for i in range(5)]) for k in ("cls", "patches")}
    whole = load_whole(source, ["cls", "patches"], CPU, dtype=torch.float32)
    assert whole["patches"].dtype == torch.float32 and whole["labels"].dtype == torch.int64
    assert torch.equal(whole["patches"], stored["patches"].float())
    assert torch.equal(load_whole(source, ["cls"], CPU)["cls"], stored["cls"])  # stored dtype kept
    pooled = pooled_source(source, ["cls", "patches"], None, CPU)
    assert torch.equal(pooled.tensors["cls"], stored["cls"].float())
    torch.testing.assert_close(pooled.tensors["mean"], stored["patches"].float().mean(dim=1))
    assert torch.equal(pooled.labels, source.labels)


def test_stream_batches_into_memory_copies_instead_of_viewing(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=12, shard=12)
    source = CacheSource(cache, 7)
    (batch,) = stream_batches(source, torch.arange(12), ["cls"], 12, into_memory=True)
    view = next(stream_batches(source, torch.arange(12), ["cls"], 12))
    assert torch.equal(batch["cls"], view["cls"])
    assert batch["cls"].untyped_storage().nbytes() == batch["cls"].numel() * 2  # its own memory


# (5, 7) -> 7: rows are strided views of the shards; (3, 5, 7) -> 3, 7: rows that cannot be flattened either
@pytest.mark.parametrize(("layers", "pick"), [((7,), 7), ((5, 7), 7), ((3, 5, 7), [3, 7])])
def test_carried_rows_of_many_groups_reach_the_batches_intact_through_the_reused_carry_buffers(
    tmp_path: Path, layers: tuple[int, ...], pick: int | list[int]
) -> None:
    """Groups of a few rows each leave leftovers that are carried into the next group in two reused
    buffers (contiguous, beside the strided views of a multi-block cache); every row must come out once,
    with its own tokens, in an order fixed by the seed."""
    cache = write_cache(tmp_path, n=61, shard=9, layers=layers)
    source = CacheSource(cache, pick)
    stored = load_whole(source, ["cls", "patches"], CPU)  # the picked blocks' rows, in order
    row_bytes = source.row_bytes(["cls", "patches"])
    rows = torch.arange(61)

    def epoch(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        got: dict[str, list[torch.Tensor]] = {"cls": [], "patches": [], "labels": []}
        g = torch.Generator().manual_seed(seed)
        # groups of about 7 rows against batches of 4: a carry after almost every group
        small = 14 * row_bytes
        batches = stream_batches(source, rows, ["cls", "patches"], 4, generator=g, buffer_bytes=small)
        for batch in batches:
            for k in got:
                got[k].append(batch[k].clone())  # the batch's buffer is reused once released
        return torch.cat(got["labels"]), {k: torch.cat(v) for k, v in got.items() if k != "labels"}

    labels, tokens = epoch(0)
    # which stored row each yielded row is: match [cls] tokens (random, so distinct)
    flat = tokens["cls"].reshape(61, -1)  # (61, [L *] D)
    match = (flat[:, None, :] == stored["cls"].reshape(61, -1)[None]).all(-1)  # (61, 61)
    assert torch.equal(match.sum(0), torch.ones(61, dtype=torch.long))  # every row exactly once
    which = match.float().argmax(1)
    assert torch.equal(tokens["patches"], stored["patches"][which])  # patches travel with their [cls]
    assert torch.equal(labels, source.labels[which])
    again_labels, again = epoch(0)
    assert torch.equal(again["cls"], tokens["cls"]) and torch.equal(again_labels, labels)
    assert not torch.equal(epoch(1)[1]["cls"], tokens["cls"])


def test_load_auto_decides_from_memory_and_says_what_it_chose() -> None:
    from vitprobe.probe import ProbeConfig
    from vitprobe.probe.train import load_decision
    from vitprobe.tokens import available_memory, memory_budget

    source = MemorySource({"cls": torch.zeros(1000, 256), "labels": torch.zeros(1000, dtype=torch.long)})
    need = source.row_bytes(["cls"]) * 1000  # 1,032,000 bytes
    small = ProbeConfig(load="auto", preload_gb=need / 2 / 2**30)
    in_memory, store, pin, why = load_decision(small, [source], ["cls"], CPU)
    assert (in_memory, store.type, pin) == (False, "cpu", False)
    assert why.startswith("stream (auto): 0.00 GB of tokens exceed preload_gb")
    in_memory, _, _, why = load_decision(ProbeConfig(load="auto"), [source], ["cls"], CPU)
    assert in_memory and why == "memory (auto): 0.00 GB of tokens"
    assert load_decision(ProbeConfig(load="stream"), [source], ["cls"], CPU)[3].startswith("stream (--load")
    free = available_memory()
    assert free is not None and free > 0  # Linux: MemAvailable
    budget, limit = memory_budget(1e9)  # more than any machine has: half the available memory decides
    assert budget == pytest.approx(free // 2, rel=0.05) and limit.startswith("half the")


def test_batches_from_pinned_memory_equal_indexing_it() -> None:
    from vitprobe.stream import memory_batches

    memory = {"cls": torch.randn(50, 4).half(), "labels": torch.arange(50) % CLASSES}
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    got = []
    for batch in memory_batches(memory, ["cls"], order, 8, 7, pin=False):  # pinning needs CUDA
        got.append((to_tokens(batch, CPU, None).cls, batch["labels"]))
    for b, (cls, labels) in enumerate(got):
        take = order[b * 8 : (b + 1) * 8]
        assert torch.equal(cls, memory["cls"][take].float()) and torch.equal(labels, memory["labels"][take])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_pinned_batches_and_block_picks_equal_the_cpu_path(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=37, shard=10, layers=(3, 5, 7))
    split = Split("train", CacheSource(cache, [3, 5, 7]), torch.arange(37))
    cuda = torch.device("cuda")
    for pinned, plain in zip(
        iter_batches(split, ["patches"], 8, generator=torch.Generator().manual_seed(0), pin=True),
        iter_batches(split, ["patches"], 8, generator=torch.Generator().manual_seed(0), pin=False),
        strict=True,
    ):
        for layer in (0, 2):
            on_gpu = to_tokens(pinned, cuda, None, layer=layer).patches
            assert torch.equal(on_gpu.cpu(), to_tokens(plain, CPU, None, layer=layer).patches)
    memory = load_whole(split.source, ["patches"], cuda, pin=True)
    assert memory["patches"].is_pinned()
    pinned_split = Split("train", split.source, torch.arange(37), memory)
    first = next(iter(iter_batches(pinned_split, ["patches"], 8)))
    assert torch.equal(to_tokens(first, cuda, None, layer=1).patches.cpu(), memory["patches"][:8, 1].float())


def expected_cls(rows: list[int]) -> torch.Tensor:
    """The [cls] tokens (n, D) of cache rows `rows` of `write_cache`, in fp32."""
    return (torch.tensor(rows, dtype=torch.float32) * 50 - 1)[:, None].expand(-1, DIM)


def test_cpu_fp32_buffers_are_reused_once_released_and_never_while_a_prefetch_queue_holds_them(
    tmp_path: Path,
) -> None:
    """Streamed batches are converted into a few reused fp32 buffers (the same memory comes back), but a
    batch converted ahead and still waiting in a queue is never overwritten by the ones after it."""
    from collections import deque

    cache = write_cache(tmp_path, n=37, shard=10)
    split = Split("train", CacheSource(cache, 7), torch.arange(37))
    pointers = set()
    previous = None
    for batch in iter_batches(split, ["cls"], 4, generator=torch.Generator().manual_seed(0)):
        rows = row_ids(batch)
        tokens = to_tokens(batch, CPU, None)  # converted while the previous step's tokens are held
        if previous is not None:
            assert torch.equal(previous[0].cls, expected_cls(previous[1]))  # not overwritten
        pointers.add(tokens.cls.data_ptr())
        previous = (tokens, rows)
    assert len(pointers) <= 3  # 10 batches in at most 3 buffers: reused, not allocated per batch

    queue: deque = deque()
    checked = 0
    for batch in iter_batches(split, ["cls"], 4, generator=torch.Generator().manual_seed(1)):
        queue.append((to_tokens(batch, CPU, None), row_ids(batch)))  # prefetched 4 batches ahead
        if len(queue) > 4:
            tokens, rows = queue.popleft()
            assert torch.equal(tokens.cls, expected_cls(rows))
            checked += 1
    for tokens, rows in queue:
        assert torch.equal(tokens.cls, expected_cls(rows))
        checked += 1
    assert checked == 10


def test_tokens_saved_by_autograd_are_not_overwritten_before_backward(tmp_path: Path) -> None:
    """A head's input saved for its backward pass keeps its buffer busy: converting the next batches before
    the backward (dropping every Python reference to the tokens) leaves the gradient as it was."""
    cache = write_cache(tmp_path, n=37, shard=10)
    split = Split("train", CacheSource(cache, 7), torch.arange(37))
    head = torch.nn.Linear(DIM, 2, bias=False)
    batches = iter_batches(split, ["cls"], 4, generator=torch.Generator().manual_seed(0))
    first = next(batches)
    rows = row_ids(first)
    loss = head(to_tokens(first, CPU, None).cls).square().sum()  # only autograd holds the tokens now
    for batch in batches:
        to_tokens(batch, CPU, None)  # the rest of the epoch, converted and dropped
    loss.backward()
    expected = torch.nn.Linear(DIM, 2, bias=False)
    expected.weight.data.copy_(head.weight.data)
    expected(expected_cls(rows)).square().sum().backward()
    assert torch.equal(head.weight.grad, expected.weight.grad)


def test_each_block_picked_from_a_streamed_batch_gets_its_own_fp32_buffer(tmp_path: Path) -> None:
    cache = write_cache(tmp_path, n=23, shard=10, layers=(3, 5))
    split = Split("train", CacheSource(cache, [3, 5]), torch.arange(23))
    for batch in iter_batches(split, ["cls", "patches"], 4, generator=torch.Generator().manual_seed(0)):
        views = {layer: to_tokens(batch, CPU, None, layer=layer) for layer in (0, 1)}
        rows = ((batch["cls"][:, 0, 0].float() + 1) / 50).round()  # (B,) decoded from block 0
        for layer, tokens in views.items():
            assert torch.equal(tokens.cls[:, 0], rows * 50 + 10 * layer - 1)
            assert torch.equal(tokens.patches, batch["patches"][:, layer].float())
        assert views[0].cls.data_ptr() != views[1].cls.data_ptr()
