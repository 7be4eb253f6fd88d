"""Every user-facing choice is declared once (vitprobe.choices) and agrees with the library's lists."""

from __future__ import annotations

import pytest

from vitprobe import choices


def test_choices_agree_with_the_library() -> None:
    from vitprobe.cache import STORE_DTYPES, TOKEN_MODES
    from vitprobe.data import KINDS
    from vitprobe.devices import DTYPES
    from vitprobe.extract import DECODERS
    from vitprobe.heads import ABMILP_ACTS, ABMILP_CONTENTS, POOLS
    from vitprobe.knn import KNN_POOLS
    from vitprobe.probe import protocols
    from vitprobe.probe.optim import OPTIMIZERS

    assert choices.POOLS == POOLS and choices.ABMILP_ACTS == ABMILP_ACTS
    assert choices.ABMILP_CONTENTS == ABMILP_CONTENTS and choices.OPTIMIZERS == OPTIMIZERS
    assert choices.PROTOCOLS == tuple(protocols.PROTOCOLS) and choices.SELECT_ONS == protocols.SELECT_ON
    assert choices.SELECT_EPOCHS == protocols.SELECT_EPOCH
    assert choices.LOAD_MODES == protocols.LOAD_MODES and choices.AMP_MODES == protocols.AMP_MODES
    assert choices.LOGREG_POOLS == protocols.LOGREG_POOLS and choices.KNN_POOLS == KNN_POOLS
    assert choices.DATASET_KINDS == tuple(KINDS) and choices.TOKEN_MODES == TOKEN_MODES
    assert choices.STORE_DTYPES == tuple(STORE_DTYPES) and set(choices.COMPUTE_DTYPES) == {"auto", *DTYPES}
    assert choices.DECODERS == DECODERS


def test_a_choice_refuses_unknown_values_naming_the_option() -> None:
    from vitprobe.errors import VitprobeError

    with pytest.raises(VitprobeError, match=r"results.json: unknown --pool 'clss'") as info:
        choices.POOL.check("clss", where="results.json")
    assert "cls, mean, cls+mean, abmilp, attentive" in (info.value.hint or "")
    enum = choices.POOL.enum()
    assert [m.value for m in enum] == list(choices.POOLS) and enum("abmilp") == "abmilp"


def test_choices_import_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, vitprobe.choices, vitprobe.output, vitprobe.results; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
