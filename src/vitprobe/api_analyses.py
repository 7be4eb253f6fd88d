"""The public Python API, analyses and results: attention and frequency statistics, localisation, the
report, a whole study, and reading any result file as its typed model."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.api import _evaluating, load

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch import nn

    from vitprobe.models import Backbone
    from vitprobe.report import ReportOutput
    from vitprobe.results import AttentionResults, FrequencyResults, LocalizationResults
    from vitprobe.study import StudyResult


# ------------------------------------------------------------------------------------------------ analyses


def attention_stats(
    backbone: str | nn.Module | Backbone,
    data: str,
    *,
    split: str,
    out: str | Path | None = None,
    **options: Any,
) -> AttentionResults:
    """Attention statistics per block × head ([cls] self-share, entropies, distance): attention.json.

    `options`: AttentionConfig fields (limit, batch_size, num_workers, rollout, n_maps, device, seed)."""
    from vitprobe.analysis.attention import AttentionConfig, run_attention

    return _analysis(backbone, data, split, out, AttentionConfig, run_attention, options)  # type: ignore[return-value]


def frequency_stats(
    backbone: str | nn.Module | Backbone,
    data: str,
    *,
    split: str,
    out: str | Path | None = None,
    **options: Any,
) -> FrequencyResults:
    """Fourier analysis of the token maps per layer: frequency.json (FrequencyConfig fields as options)."""
    from vitprobe.analysis.frequency import FrequencyConfig, run_frequency

    return _analysis(backbone, data, split, out, FrequencyConfig, run_frequency, options)  # type: ignore[return-value]


def localize(
    backbone: str | nn.Module | Backbone | None,
    data: str | None = None,
    *,
    split: str | None = None,
    heads: Sequence[str | Path] = (),
    cache: str | Path | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> LocalizationResults:
    """MaxBoxAccV2 of the backbone's last-block [cls] attention and/or saved heads' maps (`heads`, computed
    from the tokens of `cache`), against the dataset's boxes: localization.json.

    `options`: LocalizationConfig fields (limit, n_figures, quantize, cls_attention, overwrite, ...)."""
    from vitprobe import results as R
    from vitprobe.analysis.localization import LocalizationConfig, run_localization

    bb = load(backbone) if backbone is not None else None
    with _out_dir(out) as folder:
        cfg = LocalizationConfig(
            out=str(folder),
            model=bb.report.model if bb else None,
            data=data,
            split=split,
            cache=None if cache is None else str(cache),
            heads=tuple(str(h) for h in heads),
            random_init=bool(bb and bb.report.random_init),
            cls_attention=bb is not None,
            **options,
        )
        return R.LocalizationResults.from_dict(run_localization(cfg, backbone=bb).result)


def _analysis(
    backbone: Any, data: str, split: str, out: Any, cls: Any, run: Any, options: dict[str, Any]
) -> Any:
    from vitprobe import results as R

    bb = load(backbone)
    with _out_dir(out) as folder, _evaluating(bb.model):
        cfg = cls(
            model=bb.report.model,
            data=data,
            split=split,
            out=str(folder),
            random_init=bb.report.random_init,
            **{"num_workers": 0, **options},
        )
        return R.parse(run(cfg, backbone=bb).result)


@contextmanager
def _out_dir(out: str | Path | None) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="vitprobe-analysis-") as tmp:
        yield Path(tmp)


# ------------------------------------------------------------------------------------------------ results


def write_report(
    runs: Sequence[str | Path],
    *,
    out: str | Path = "report.html",
    format: str = "html",
    labels: Sequence[str] = (),
    title: str = "vitprobe report",
) -> ReportOutput:
    """One report of run directories (html, md, json, github, csv, latex); `labels` name the runs."""
    from vitprobe.report import ReportConfig, write_report

    return write_report(
        ReportConfig(
            runs=tuple(map(str, runs)), out=str(out), format=format, labels=tuple(labels), title=title
        )
    )


def run_study(study: str | Path, *, out: str | Path | None = None, dry_run: bool = False) -> StudyResult:
    """`vitprobe run STUDY.toml`: every step not done yet, then the report."""
    from vitprobe.study import load_study
    from vitprobe.study import run_study as run

    return run(load_study(study, out=out), say=lambda _msg: None, dry_run=dry_run)


def load_results(path: str | Path) -> Any:
    """Any result file vitprobe writes, as its typed model (vitprobe.results), strictly parsed."""
    from vitprobe.results import load as load_file

    return load_file(path)
