"""Writers of the official checkpoint layouts of the seed papers' backbones, for tests.

Each writer takes `want`, a state dict in timm's names of the (tiny) preset architecture, and `other`, a
second one for the network a file also holds (teacher / EMA / momentum encoder), writes the file exactly as
the reference save code does (cited per writer; the same citations are in docs/models.md), and returns
`(expected, dropped)`: the state dict the backbone must end up with and the keys the remap must drop.
Key names are written out from the reference module definitions, never derived from vitprobe's remaps.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from vitprobe.models import PRESETS, build_preset

StateDict = dict[str, torch.Tensor]
Written = tuple[StateDict, list[str]]


def tiny(name: str) -> dict[str, float]:
    """A two-block, 32-wide version of a preset's architecture with a 2x2 patch grid."""
    overrides: dict[str, float] = {"img_size": 2 * PRESETS[name].patch, "embed_dim": 32, "depth": 2}
    overrides["num_heads"] = 2
    if "g14" in name:  # DINOv2 SwiGLUFFNFused: hidden (int(4 * 32 * 2 / 3) + 7) // 8 * 8 = 88, packed 176
        overrides["mlp_ratio"] = 176 / 32
    if name.startswith("data2vec2"):  # 2 context-encoder blocks + 2 shared blocks
        overrides["depth"] = 4
    return overrides


def random_state_dict(name: str, overrides: dict[str, float], seed: int) -> StateDict:
    """Random values for every key of the (tiny) architecture, unlike any initialisation."""
    model = build_preset(name, device="meta", **overrides)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _sizes(sd: StateDict) -> tuple[int, int, int]:
    """(embed dim, positions incl. [cls], patch size) of a timm ViT state dict."""
    return sd["cls_token"].shape[-1], sd["pos_embed"].shape[1], sd["patch_embed.proj.weight"].shape[-1]


def _blocks(sd: StateDict) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})


# ---- mmpretrain (MFF, MAE, MaskFeat; classifiers) -------------------------------------------------------


def mmpretrain_vit(sd: StateDict) -> StateDict:
    """timm ViT tensors under mmpretrain `VisionTransformer` names: mmpretrain
    models/backbones/vision_transformer.py:61-82 (`ln1`, `attn` = MultiheadAttention `qkv`/`proj`, `ln2`,
    `ffn` = mmcv FFN `layers.0.0` Linear + GELU, `layers.1` Linear), :297 (`patch_embed` = mmcv PatchEmbed
    `projection`), :310/:320 (`cls_token`, `pos_embed` with the [cls] row), :367 (final norm `ln1`)."""
    out = {
        "cls_token": sd["cls_token"],
        "pos_embed": sd["pos_embed"],
        "patch_embed.projection.weight": sd["patch_embed.proj.weight"],
        "patch_embed.projection.bias": sd["patch_embed.proj.bias"],
        "ln1.weight": sd["norm.weight"],
        "ln1.bias": sd["norm.bias"],
    }
    for i in _blocks(sd):
        for mm, timm in (
            ("ln1", "norm1"),
            ("attn.qkv", "attn.qkv"),
            ("attn.proj", "attn.proj"),
            ("ln2", "norm2"),
            ("ffn.layers.0.0", "mlp.fc1"),
            ("ffn.layers.1", "mlp.fc2"),
        ):
            for p in ("weight", "bias"):
                out[f"layers.{i}.{mm}.{p}"] = sd[f"blocks.{i}.{timm}.{p}"]
    return out


def _mmpretrain_block(prefix: str, dim: int, hidden: int) -> StateDict:
    return {
        f"{prefix}.ln1.weight": _rand(dim),
        f"{prefix}.ln1.bias": _rand(dim),
        f"{prefix}.attn.qkv.weight": _rand(3 * dim, dim),
        f"{prefix}.attn.qkv.bias": _rand(3 * dim),
        f"{prefix}.attn.proj.weight": _rand(dim, dim),
        f"{prefix}.attn.proj.bias": _rand(dim),
        f"{prefix}.ln2.weight": _rand(dim),
        f"{prefix}.ln2.bias": _rand(dim),
        f"{prefix}.ffn.layers.0.0.weight": _rand(hidden, dim),
        f"{prefix}.ffn.layers.0.0.bias": _rand(hidden),
        f"{prefix}.ffn.layers.1.weight": _rand(dim, hidden),
        f"{prefix}.ffn.layers.1.bias": _rand(dim),
    }


def mae_decoder(dim: int, tokens: int, patch: int) -> StateDict:
    """mmpretrain models/necks/mae_neck.py:65-92 `MAEPretrainDecoder` (one 16-wide block): `decoder_embed`,
    `mask_token`, `decoder_pos_embed`, `decoder_blocks.N` (TransformerEncoderLayer), the norm `ln1`
    (build_norm_layer postfix=1), `decoder_pred`."""
    d = 16
    return {
        "neck.decoder_embed.weight": _rand(d, dim),
        "neck.decoder_embed.bias": _rand(d),
        "neck.mask_token": _rand(1, 1, d),
        "neck.decoder_pos_embed": _rand(1, tokens, d),
        **_mmpretrain_block("neck.decoder_blocks.0", d, 4 * d),
        "neck.ln1.weight": _rand(d),
        "neck.ln1.bias": _rand(d),
        "neck.decoder_pred.weight": _rand(3 * patch * patch, d),
        "neck.decoder_pred.bias": _rand(3 * patch * patch),
    }


MFF_CFG = """model = dict(
    type='MFF',
    backbone=dict(
        type='MFFViT',
        arch='b',
        patch_size=16,
        mask_ratio=0.75,
        norm_cfg=dict(type='LN', eps=1e-06),
        out_indices=[
            0,
            1,
        ]),
    neck=dict(type='MAEPretrainDecoder'))
"""


def mmengine_meta(cfg: str) -> dict[str, object]:
    """The `meta` of a published mmpretrain checkpoint: open-mmlab/mmengine mmengine/runner/runner.py:
    2193-2198 (`epoch`, `iter`), 2214-2222 (`cfg` as text, `seed`, `experiment_name`, `time`,
    `mmengine_version`, `dataset_meta`); mmpretrain tools/model_converters/publish_model.py:45-61."""
    return {
        "epoch": 300,
        "iter": 187_500,
        "cfg": cfg,
        "seed": 2,
        "experiment_name": "mff_vit-base-p16",
        "time": "20230801_093000",
        "mmengine_version": "0.8.2",
        "dataset_meta": {"classes": ("tench", "goldfish")},
        "mmpretrain_version": "1.0.1",
    }


def write_mmpretrain_mff(want: StateDict, other: StateDict, path: Path) -> Written:
    """MFF pretraining file `mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230801-3c1bcce4.pth`:
    `{'meta', 'state_dict'}` (mmengine runner.py:2229-2236 writes `meta`, `state_dict`, `message_hub`,
    `optimizer`, `param_schedulers`; publish_model.py:38-39 pops all but `meta` and `state_dict`). The model
    is `MFF(MAE)`: `backbone` = `MFFViT` (mmpretrain models/selfsup/mff.py:87-95 adds `proj_layers` (one
    Linear per fused level but the last) and `proj_weights` (levels, 1, 1, 1)), `neck` = MAE decoder,
    `head` = MAEPretrainHead (no parameters); the data preprocessor's mean/std buffers are non-persistent."""
    dim, tokens, patch = _sizes(want)
    fusion = {
        "backbone.proj_layers.0.weight": _rand(dim, dim),
        "backbone.proj_layers.0.bias": _rand(dim),
        "backbone.proj_weights": torch.tensor([0.3, -0.2]).view(-1, 1, 1, 1),
    }
    decoder = mae_decoder(dim, tokens, patch)
    state = {**{f"backbone.{k}": v for k, v in mmpretrain_vit(want).items()}, **fusion, **decoder}
    torch.save({"meta": mmengine_meta(MFF_CFG), "state_dict": state}, path)
    return want, sorted([*fusion, *decoder])


def write_mmpretrain_mae(want: StateDict, other: StateDict, path: Path) -> Written:
    """mmselfsup 1.x / mmpretrain MAE (`mae_vit-base-p16_8xb512-fp16-coslr-1600e_in1k_20220825-f7569ca2.pth`):
    `MAE`: `backbone` = `MAEViT` (models/selfsup/mae.py:14-92, plain VisionTransformer keys; `pos_embed`
    fixed sin-cos but a stored parameter), `neck` = MAE decoder. Written as a training file: with
    `message_hub` and `optimizer` too (runner.py:2229-2245)."""
    dim, tokens, patch = _sizes(want)
    decoder = mae_decoder(dim, tokens, patch)
    state = {**{f"backbone.{k}": v for k, v in mmpretrain_vit(want).items()}, **decoder}
    torch.save(
        {
            "meta": mmengine_meta("model = dict(type='MAE')\n"),
            "state_dict": state,
            "message_hub": {"log_scalars": {}, "runtime_info": {"epoch": 1599}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
        },
        path,
    )
    return want, sorted(decoder)


def write_mmpretrain_maskfeat(want: StateDict, other: StateDict, path: Path) -> Written:
    """MaskFeat (`maskfeat_vit-base-p16_8xb256-amp-coslr-300e_in1k_20221101-6dfc8bf3.pth`): `MaskFeatViT`
    adds `mask_token` (models/selfsup/maskfeat.py:231-232), the neck is a `LinearNeck` (`fc`), and the
    `HOGGenerator` target registers persistent buffers `weight_x`, `weight_y`, `gaussian_kernel`
    (maskfeat.py:45-52)."""
    dim = want["cls_token"].shape[-1]
    extras = {
        "backbone.mask_token": _rand(1, 1, dim),
        "neck.fc.weight": _rand(108, dim),
        "neck.fc.bias": _rand(108),
        "target_generator.weight_x": _rand(3, 1, 3, 3),
        "target_generator.weight_y": _rand(3, 1, 3, 3),
        "target_generator.gaussian_kernel": _rand(16, 16),
    }
    state = {**{f"backbone.{k}": v for k, v in mmpretrain_vit(want).items()}, **extras}
    torch.save({"meta": mmengine_meta("model = dict(type='MaskFeat')\n"), "state_dict": state}, path)
    return want, sorted(extras)


def write_mmpretrain_classifier(want: StateDict, other: StateDict, path: Path) -> Written:
    """An mmpretrain linear-probe classifier (configs/mff/benchmarks/vit-base-p16_8xb2048-linear-coslr-90e):
    `ImageClassifier` with `neck` = ClsBatchNormNeck (`bn`, affine=False: necks/mae_neck.py:180) and
    `head` = VisionTransformerClsHead (`layers.head`: heads/vision_transformer_head.py:55-62)."""
    dim = want["cls_token"].shape[-1]
    extras = {
        "neck.bn.running_mean": _rand(dim),
        "neck.bn.running_var": _rand(dim).abs(),
        "neck.bn.num_batches_tracked": torch.tensor(1000),
        "head.layers.head.weight": _rand(10, dim),
        "head.layers.head.bias": _rand(10),
    }
    state = {**{f"backbone.{k}": v for k, v in mmpretrain_vit(want).items()}, **extras}
    torch.save({"meta": mmengine_meta("model = dict(type='ImageClassifier')\n"), "state_dict": state}, path)
    return want, sorted(extras)


# ---- Latent MIM -----------------------------------------------------------------------------------------


def lmim_vit(sd: StateDict, *, patch: int) -> StateDict:
    """timm ViT tensors under Latent MIM `VIT` names (yibingwei-1/LatentMIM vits.py:200-227): `embed.proj`
    a Linear over patches flattened by `Patchify` in (row, col, channel) order (vits.py:50-57, the weight
    is (D, p * p * 3)), `pos_embed.pos_embeds` a (1 + N, D) buffer (vits.py:113-123, `freeze_pe=True`),
    `cls_token`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` (vits.py:149-197),
    `norm`, and the projector `head` = `_build_mlp` (models_lmim.py:9-21: `linear{l}`, `norm{l}`)."""
    dim = sd["cls_token"].shape[-1]
    out = {
        "cls_token": sd["cls_token"],
        "pos_embed.pos_embeds": sd["pos_embed"][0],
        # Conv2d (D, 3, p, p) -> Linear (D, p * p * 3) over (row, col, channel)
        "embed.proj.weight": sd["patch_embed.proj.weight"].permute(0, 2, 3, 1).reshape(dim, -1),
        "embed.proj.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    out.update({k: v for k, v in sd.items() if k.startswith("blocks.")})
    for layer in range(3):  # proj.mlp_depth = 3 (configs/lmim.yaml), out_norm=True
        out[f"head.linear{layer}.weight"] = _rand(dim if layer == 2 else 64, dim if layer == 0 else 64)
        out[f"head.norm{layer}.weight"] = _rand(dim if layer == 2 else 64)
        out[f"head.norm{layer}.bias"] = _rand(dim if layer == 2 else 64)
    return out


def lmim_decoder(dim: int, tokens: int) -> StateDict:
    """LatentMIM xvits.py:67-92 `CrossDecoder` (one 16-wide `CrossBlock`, xvits.py:41-58) and its heads."""
    d = 16
    block = {
        "norm1": (d,),
        "self_attn.qkv": (3 * d, d),
        "self_attn.proj": (d, d),
        "norm2q": (d,),
        "norm2kv": (d,),
        "cross_attn.q_proj": (d, d),
        "cross_attn.kv_proj": (2 * d, d),
        "cross_attn.proj": (d, d),
        "norm3": (d,),
        "mlp.fc1": (4 * d, d),
        "mlp.fc2": (d, 4 * d),
    }
    out = {
        "decoder.embed.weight": _rand(d, dim),
        "decoder.embed.bias": _rand(d),
        "decoder.pos_embed.pos_embeds": _rand(tokens, d),
        "decoder.cls_token": _rand(1, 1, d),
        "decoder.mask_token": _rand(1, 1, d),
        "decoder.norm.weight": _rand(d),
        "decoder.norm.bias": _rand(d),
        "decoder.head.weight": _rand(dim, d),
        "decoder.head.bias": _rand(dim),
    }
    for name, shape in block.items():
        out[f"decoder.blocks.0.{name}.weight"] = _rand(*shape)
        out[f"decoder.blocks.0.{name}.bias"] = _rand(shape[0])
    return out


def write_latentmim(want: StateDict, other: StateDict, path: Path, branch: str = "encoder") -> Written:
    """Latent MIM `checkpoint_latest.pth`: main_lmim.py:149-158 registers `{'state_dict': model (DDP),
    'optimizer', 'loss_scaler'}` with util/misc.py `CheckpointManager`, whose `create_state_dict` (misc.py:
    520-524) saves each module's `state_dict()` and `checkpoint` (misc.py:532-538) adds `epoch`. The model
    is DDP-wrapped (main_lmim.py:139), hence `module.`; `LMIM` holds `encoder`, `target_encoder`, `decoder`
    (models_lmim.py:50-70)."""
    patch = want["patch_embed.proj.weight"].shape[-1]
    dim, tokens = want["cls_token"].shape[-1], want["pos_embed"].shape[1]
    online, target = (want, other) if branch == "encoder" else (other, want)
    state = {
        **{f"module.encoder.{k}": v for k, v in lmim_vit(online, patch=patch).items()},
        **{f"module.target_encoder.{k}": v for k, v in lmim_vit(target, patch=patch).items()},
        **{f"module.{k}": v for k, v in lmim_decoder(dim, tokens).items()},
    }
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 12,
    }
    torch.save(
        {
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []},
            "loss_scaler": scaler,
            "epoch": 800,
        },
        path,
    )
    projector = [f"{branch}.head.linear{i}.weight" for i in range(3)]
    projector += [f"{branch}.head.norm{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    decoder = [k.removeprefix("module.") for k in state if k.startswith("module.decoder.")]
    return want, sorted(projector + decoder)


def write_latentmim_target(want: StateDict, other: StateDict, path: Path) -> Written:
    return write_latentmim(want, other, path, branch="target_encoder")


# ---- SimMIM ---------------------------------------------------------------------------------------------


class FakeCfgNode(dict):
    """yacs.config.CfgNode as rbgirshick/yacs yacs/config.py:63-109 defines its state: a dict subclass whose
    `__init__` sets four `__dict__` entries and has no `__reduce__`, so its pickle is GLOBAL
    yacs.config CfgNode / NEWOBJ / SETITEMS / BUILD, like a real SimMIM `config`."""

    def __init__(self, init: dict | None = None) -> None:
        super().__init__({k: FakeCfgNode(v) if isinstance(v, dict) else v for k, v in (init or {}).items()})
        self.__dict__["__immutable__"] = True
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__renamed_keys__"] = {}
        self.__dict__["__new_allowed__"] = False


@contextmanager
def pickled_as_yacs() -> Iterator[type[FakeCfgNode]]:
    """While active, `FakeCfgNode` pickles under the name `yacs.config.CfgNode` (yacs is not installed)."""
    module, package = types.ModuleType("yacs.config"), types.ModuleType("yacs")
    module.CfgNode = FakeCfgNode  # type: ignore[attr-defined]
    saved = FakeCfgNode.__module__, FakeCfgNode.__qualname__
    FakeCfgNode.__module__, FakeCfgNode.__qualname__ = "yacs.config", "CfgNode"
    sys.modules["yacs"], sys.modules["yacs.config"] = package, module
    try:
        yield FakeCfgNode
    finally:
        FakeCfgNode.__module__, FakeCfgNode.__qualname__ = saved
        del sys.modules["yacs"], sys.modules["yacs.config"]


SIMMIM_CONFIG = {
    "MODEL": {
        "TYPE": "vit",
        "NAME": "simmim_pretrain",
        "DROP_PATH_RATE": 0.1,
        "VIT": {
            "EMBED_DIM": 768,
            "DEPTH": 12,
            "NUM_HEADS": 12,
            "QKV_BIAS": True,
            "INIT_VALUES": 0.1,
            "USE_APE": False,
            "USE_RPB": False,
            "USE_SHARED_RPB": True,
            "USE_MEAN_POOLING": False,
        },
    },
    "DATA": {"IMG_SIZE": 224, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
    "AMP_OPT_LEVEL": "O1",
    "TAG": "simmim_pretrain__vit_base__img224__800ep",
}


def write_simmim(want: StateDict, other: StateDict, path: Path) -> Written:
    """SimMIM `simmim_pretrain__vit_base__img224__800ep.pth`: utils.py:49-61 `save_checkpoint` writes
    `{'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}` plus `amp` when
    AMP_OPT_LEVEL != "O0", from `model_without_ddp` (main_simmim.py:80, 112). `SimMIM` (models/simmim.py:
    98-109) = `encoder` (`VisionTransformerForSimMIM`: vision_transformer.py:216-256 with `mask_token`,
    simmim.py:63) + `decoder` (a 1x1 Conv2d to stride^2 * 3 channels, then PixelShuffle). The encoder's
    names are timm's `Beit` names; `rel_pos_bias.relative_position_index` is a persistent buffer
    (vision_transformer.py:206)."""
    dim = want["cls_token"].shape[-1]
    window = (round((want["rel_pos_bias.relative_position_bias_table"].shape[0] - 3) ** 0.5) + 1) // 2
    n = window * window + 1  # tokens: (2w - 1)^2 + 3 relative positions for a w x w grid plus [cls]
    extras = {
        "encoder.mask_token": _rand(1, 1, dim),
        "encoder.rel_pos_bias.relative_position_index": torch.randint(0, 10, (n, n)),
        "decoder.0.weight": _rand(16 * 16 * 3, dim, 1, 1),
        "decoder.0.bias": _rand(16 * 16 * 3),
    }
    with pickled_as_yacs() as cfg_node:
        torch.save(
            {
                "model": {**{f"encoder.{k}": v for k, v in want.items()}, **extras},
                "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"decay_t": 700, "decay_rate": 0.1, "t_in_epochs": False},
                "max_accuracy": 0.0,
                "epoch": 799,
                "config": cfg_node(SIMMIM_CONFIG),
                "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}},
            },
            path,
        )
    return want, sorted(extras)


# ---- data2vec 2.0 ---------------------------------------------------------------------------------------

D2V = "modality_encoders.IMAGE."


def d2v_model(sd: StateDict, prenet: int) -> StateDict:
    """timm tensors (PostNormBlock ViT) under data2vec 2.0 names: fairseq examples/data2vec/models/
    modalities/images.py:69-115 (`local_encoder` = mae.PatchEmbed `proj`, `fixed_positional_encoder`
    `positions` (1, N, D) without [cls], `context_encoder` = BlockEncoder of `prenet_depth` AltBlocks with
    `norm`), base.py:103-105 (`extra_tokens`), data2vec2.py:234 (`blocks`, the shared blocks)."""
    out = {
        f"{D2V}local_encoder.proj.weight": sd["patch_embed.proj.weight"],
        f"{D2V}local_encoder.proj.bias": sd["patch_embed.proj.bias"],
        f"{D2V}fixed_positional_encoder.positions": sd["pos_embed"],
        f"{D2V}extra_tokens": sd["cls_token"],
        f"{D2V}context_encoder.norm.weight": sd["norm_pre.weight"],
        f"{D2V}context_encoder.norm.bias": sd["norm_pre.bias"],
    }
    for key, value in sd.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            i = int(i)
            new = f"{D2V}context_encoder.blocks.{i}.{rest}" if i < prenet else f"blocks.{i - prenet}.{rest}"
            out[new] = value
    return out


def write_data2vec2(want: StateDict, other: StateDict, path: Path, branch: str = "student") -> Written:
    """data2vec 2.0 `base_imagenet.pt`: fairseq/trainer.py:401-441 `state_dict` (`args`, `cfg` as a plain
    container, `model`, `criterion`, `optimizer_history`, `task_state`, `extra_state`,
    `last_optimizer_state`); `model` is Data2VecMultiModel.state_dict() with `_ema` = the EMA teacher's
    fp32 params (data2vec2.py:358-364; fairseq/modules/ema_module.py:96-109: a dict under the state-dict
    names; the teacher has no decoder, data2vec2.py:323-324). The image decoder is `Decoder2d`
    (modules.py:181-229: `blocks.N.0` Conv2d, `proj` Linear)."""
    dim = want["cls_token"].shape[-1]
    student, teacher = (want, other) if branch == "student" else (other, want)
    decoder = {  # one conv block (groups 16) and the projection
        f"{D2V}decoder.blocks.0.0.weight": _rand(16, dim // 16, 3, 3),
        f"{D2V}decoder.blocks.0.0.bias": _rand(16),
        f"{D2V}decoder.proj.weight": _rand(dim, 16),
        f"{D2V}decoder.proj.bias": _rand(dim),
    }
    model: dict[str, object] = {**d2v_model(student, 2), **decoder, "_ema": d2v_model(teacher, 2)}
    cfg = {
        "_name": None,
        "model": {
            "_name": "data2vec_multi",
            "depth": 2,
            "layer_norm_first": False,
            "modalities": {"image": {"prenet_depth": 2, "num_extra_tokens": 1}},
        },
    }
    torch.save(
        {
            "args": None,
            "cfg": cfg,
            "model": model,
            "criterion": None,
            "optimizer_history": [
                {
                    "criterion_name": "ModelCriterion",
                    "optimizer_name": "FairseqCompositeOptimizer",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 375_300,
                }
            ],
            "task_state": {},
            "extra_state": {"metrics": {}, "previous_training_time": 123.0},
            "last_optimizer_state": {"state": {}, "param_groups": []},
        },
        path,
    )
    return want, sorted(decoder) if branch == "student" else []


def write_data2vec2_teacher(want: StateDict, other: StateDict, path: Path) -> Written:
    return write_data2vec2(want, other, path, branch="teacher")


# ---- MoCo v3 --------------------------------------------------------------------------------------------


def _moco_mlp(prefix: str, layers: int, dim_in: int, hidden: int, dim_out: int) -> StateDict:
    """moco/builder.py:36-55 `_build_mlp`: per layer a bias-free Linear, then BatchNorm1d + ReLU (inner) or a
    BatchNorm1d without affine (last); Sequential indices count the ReLUs."""
    out, index = {}, 0
    for layer in range(layers):
        d1, d2 = dim_in if layer == 0 else hidden, dim_out if layer == layers - 1 else hidden
        out[f"{prefix}.{index}.weight"] = _rand(d2, d1)
        bn = f"{prefix}.{index + 1}"
        if layer < layers - 1:
            out.update({f"{bn}.weight": _rand(d2), f"{bn}.bias": _rand(d2)})
        out.update(
            {
                f"{bn}.running_mean": _rand(d2),
                f"{bn}.running_var": _rand(d2).abs(),
                f"{bn}.num_batches_tracked": torch.tensor(7),
            }
        )
        index += 3 if layer < layers - 1 else 2
    return out


def write_mocov3(want: StateDict, other: StateDict, path: Path, branch: str = "base_encoder") -> Written:
    """MoCo v3 `vit-b-300ep.pth.tar`: main_moco.py:310-316 `save_checkpoint({'epoch', 'arch', 'state_dict':
    model.state_dict(), 'optimizer', 'scaler'})` of the DDP-wrapped `MoCo_ViT` (main_moco.py:208): timm
    0.4.9 ViTs `base_encoder` / `momentum_encoder` (builder.py:27-28, vits.py:25-69: timm names, fixed
    sin-cos `pos_embed` stored) whose `head` is a 3-layer projector, and a 2-layer `predictor`
    (builder.py:112-122)."""
    dim = want["cls_token"].shape[-1]
    base, momentum = (want, other) if branch == "base_encoder" else (other, want)
    head = {name: _moco_mlp("head", 3, dim, 64, 16) for name in ("base_encoder", "momentum_encoder")}
    state = {
        **{f"module.base_encoder.{k}": v for k, v in {**base, **head["base_encoder"]}.items()},
        **{f"module.momentum_encoder.{k}": v for k, v in {**momentum, **head["momentum_encoder"]}.items()},
        **{f"module.{k}": v for k, v in _moco_mlp("predictor", 2, 16, 64, 16).items()},
    }
    torch.save(
        {
            "epoch": 300,
            "arch": "vit_base",
            "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 65536.0},
        },
        path,
    )
    return want, sorted(f"module.{branch}.{k}" for k in head[branch])


def write_mocov3_momentum(want: StateDict, other: StateDict, path: Path) -> Written:
    return write_mocov3(want, other, path, branch="momentum_encoder")


def write_mocov3_lincls(want: StateDict, other: StateDict, path: Path) -> Written:
    """MoCo v3 `linear-vit-b-300ep.pth.tar`: main_lincls.py `save_checkpoint({'epoch', 'arch', 'state_dict',
    'best_acc1', 'optimizer'})` of the DDP-wrapped ViT with its trained classifier `head` (Linear)."""
    dim = want["cls_token"].shape[-1]
    head = {"head.weight": _rand(10, dim), "head.bias": _rand(10)}
    state = {f"module.{k}": v for k, v in {**want, **head}.items()}
    torch.save(
        {
            "epoch": 90,
            "arch": "vit_base",
            "state_dict": state,
            "best_acc1": torch.tensor(76.7),
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )
    return want, sorted(head)


# ---- DINOv2 ViT-g and registers -------------------------------------------------------------------------


def write_dinov2_official(want: StateDict, other: StateDict, path: Path) -> Written:
    """DINOv2 `dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` (loaded with strict=True by dinov2/hub/backbones.py:
    55-59, so the file is exactly `DinoVisionTransformer.state_dict()`): models/vision_transformer.py:110-115
    (`cls_token`, `pos_embed` (1, 1 + N, D) with the [cls] row, `register_tokens` (1, R, D)), :169
    (`mask_token` (1, D)); ViT-g's `SwiGLUFFNFused` is `mlp.w12` / `mlp.w3` (layers/swiglu_ffn.py:27-28).
    From a timm register model the [cls] position is split off again: the file's `cls_token` is
    timm's minus an arbitrary [cls] position, so the expected [cls] is recomputed as the remap must."""
    swiglu = want["blocks.0.mlp.fc1.weight"].shape[0] == 2 * want["blocks.0.mlp.fc2.weight"].shape[1]
    names = (("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3.")) if swiglu else ()
    sd = {}
    for key, value in want.items():
        for timm_name, dinov2_name in names:
            key = key.replace(timm_name, dinov2_name)
        sd[key] = value
    expected = dict(want)
    dim = want["cls_token"].shape[-1]
    if "reg_token" in sd:
        cls_pos = _rand(1, 1, dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = want["cls_token"] - cls_pos  # DINOv2's own [cls]; the remap adds cls_pos back
        sd["pos_embed"] = torch.cat([cls_pos, want["pos_embed"]], dim=1)
        expected["cls_token"] = sd["cls_token"] + cls_pos
    torch.save({**sd, "mask_token": _rand(1, dim)}, path)
    return expected, ["mask_token"]
