"""Remaps of layouts whose keys are renamed or reshaped into timm's names: mmpretrain (MFF, MAE, MaskFeat,
PixMIM), Latent MIM, SimMIM and BEiT-v2 (BEiT-style keys for timm's `Beit`), data2vec 2.0.

Each is a pure function of the checkpoint's top-level mapping; the reference definitions and save code
each follows are cited, file and line, in docs/models.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vitprobe.errors import CheckpointError
from vitprobe.remap.common import (
    Remapped,
    check_branch,
    drop,
    model_entry,
    no_branch,
    rename,
    rename_key,
    strip_prefixes,
    take_prefix,
    tensors,
)

# mmpretrain `VisionTransformer` -> timm `VisionTransformer` (after `backbone.` is stripped); the first
# matching rule renames a key. mmcv's FFN is `layers.0.0` (Linear) + GELU + `layers.1` (Linear).
_MMPRETRAIN_RULES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    (r"^layers\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^ln1\.", "norm."),  # the final norm (`final_norm=True`)
    (r"^ln2\.", "fc_norm."),  # the norm after average pooling (`out_type='avg_featmap'`, fine-tuned files)
    (r"^pre_norm\.", "norm_pre."),
)
_MFF_FUSION = ("proj_layers.", "proj_weights")  # MFFViT's multi-level fusion, used only in pretraining


def remap_mmpretrain(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """mmpretrain / mmselfsup 1.x checkpoint of a ViT (MFF, MAE, MaskFeat, PixMIM; also classifiers).

    `{'meta', 'state_dict'}` (published files; training files add `optimizer`, `message_hub`, ...). Only
    `backbone.*` is the ViT: `neck.*` (the MAE decoder), `head.*` (loss or classifier head),
    `target_generator.*` (MaskFeat's HOG buffers) are dropped. MFF's fusion layers `proj_layers.*` and
    weights `proj_weights` are dropped and reported (the softmax fusion weights are in the notes): MFF
    fuses them only in pretraining, its evaluation builds a plain `VisionTransformer` from the backbone.
    MaskFeat's `mask_token` is dropped too.
    """
    import torch

    no_branch("mmpretrain", branch)
    sd = tensors(ckpt["state_dict"], "checkpoint['state_dict']")
    sd, outside = drop(sd, lambda k: not k.startswith("backbone."))
    sd, _ = strip_prefixes(sd, ("backbone.",))
    sd, extras = drop(sd, lambda k: k.startswith(_MFF_FUSION) or k == "mask_token")
    notes = []
    if "proj_weights" in extras:
        weights = torch.softmax(ckpt["state_dict"]["backbone.proj_weights"].float().flatten(), dim=0)  # (K,)
        blocks = _mff_out_indices(ckpt.get("meta"), len(weights))
        fused = ", ".join(f"block {b}: {w:.3f}" for b, w in zip(blocks, weights.tolist(), strict=True))
        notes.append(f"MFF fusion layers and weights not loaded (pretraining only); softmax weights {fused}")
    if outside:
        groups = sorted({k.split(".")[0] for k in outside})
        notes.append(f"modules outside the backbone dropped: {', '.join(g + '.*' for g in groups)}")
    sd, renamed = rename(sd, _MMPRETRAIN_RULES)
    dropped = tuple(sorted(outside + tuple(f"backbone.{k}" for k in extras)))
    return Remapped(sd, "mmpretrain", renamed=len(sd), dropped=dropped, notes=tuple(notes))


def _mff_out_indices(meta: Any, count: int) -> list[str]:
    """The blocks MFF fused (`out_indices` of the `MFFViT` config stored as text in `meta['cfg']`), or
    #1..#count when the file does not say (the released configs fuse blocks 0, 2, 4, 6, 8, 11)."""
    cfg = meta.get("cfg") if isinstance(meta, Mapping) else None
    start = cfg.find("MFFViT") if isinstance(cfg, str) else -1
    match = re.search(r"out_indices\s*=\s*\[([\d,\s]+)\]", cfg[start:]) if start >= 0 else None
    if match:
        blocks = [b.strip() for b in match.group(1).split(",") if b.strip()]
        if len(blocks) == count:
            return blocks
    return [f"#{i + 1}" for i in range(count)]


def remap_latentmim(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """Latent MIM checkpoint (yibingwei-1/LatentMIM `checkpoint_latest.pth` / `checkpoint_0800.pth`).

    `{'state_dict', 'optimizer', 'loss_scaler', 'epoch'}` written by `util/misc.py` `CheckpointManager`,
    the state dict of `LMIM` (DDP-wrapped: `module.`): `encoder.*` (online), `target_encoder.*` (EMA),
    `decoder.*`. Takes the online `encoder` by default (the one its k-NN evaluation uses);
    `branch='target_encoder'` gives the EMA encoder. Renames:

    - `embed.proj` is a Linear over patches flattened in (row, col, channel) order (`Patchify`:
      `einsum('nchpwq->nhwpqc')`): its weight (D, p*p*3) becomes the Conv2d weight (D, 3, p, p);
    - `pos_embed.pos_embeds` (1 + N, D), a frozen buffer whose [cls] row is zero, becomes `pos_embed`;
    - `head.*` (the projection MLP), the decoder and the other encoder are dropped.
    """
    sd = tensors(ckpt["state_dict"], "checkpoint['state_dict']")
    sd, _ = strip_prefixes(sd, ("module.",))
    branch = check_branch("latentmim", branch, ("encoder", "target_encoder"), "encoder")
    enc = take_prefix(sd, f"{branch}.")
    enc, projector = drop(enc, lambda k: k.startswith("head."))
    out: dict[str, Any] = {}
    for key, value in enc.items():
        if key == "embed.proj.weight":
            dim, fan_in = value.shape
            p = round((fan_in // 3) ** 0.5)
            if 3 * p * p != fan_in:
                raise CheckpointError(
                    f"{branch}.embed.proj.weight {tuple(value.shape)} is not a 3-channel patch embedding"
                )
            out["patch_embed.proj.weight"] = value.reshape(dim, p, p, 3).permute(0, 3, 1, 2).contiguous()
        elif key == "embed.proj.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "pos_embed.pos_embeds":
            out["pos_embed"] = value.unsqueeze(0)  # (1, 1 + N, D)
        else:
            out[key] = value
    decoder = tuple(k for k in sd if k.startswith("decoder."))
    online = branch == "encoder"
    note = f"took the {'online encoder (the one Latent MIM evaluates)' if online else 'EMA target encoder'}"
    notes = (note, "projection MLP (head.*) and decoder dropped; the other encoder is not loaded")
    dropped = tuple(sorted(tuple(f"{branch}.{k}" for k in projector) + decoder))
    return Remapped(out, "latentmim", renamed=len(out), dropped=dropped, notes=notes, branch=branch)


def remap_simmim(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """SimMIM ViT checkpoint (microsoft/SimMIM `simmim_pretrain__vit_base__img224__800ep.pth`).

    `{'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'[, 'amp']}` (`utils.py`
    `save_checkpoint`; `config` is a pickled yacs `CfgNode`, read as plain data by vitprobe's allow-list).
    `model` is `SimMIM`: `encoder.*`, a BEiT-style ViT already in timm's `Beit` names (shared
    `rel_pos_bias`, `attn.q_bias/v_bias`, layer scale `gamma_1/2`), and a 1x1-conv `decoder.*`. Dropped:
    the decoder, `mask_token`, and the `relative_position_index` buffers, which timm recomputes.
    """
    no_branch("simmim", branch)
    sd = tensors(model_entry(ckpt), "checkpoint['model']")
    decoder = tuple(k for k in sd if not k.startswith("encoder."))
    enc = take_prefix(sd, "encoder.")
    enc, dropped = drop(enc, lambda k: k == "mask_token" or k.endswith("relative_position_index"))
    dropped_all = tuple(sorted(decoder + tuple(f"encoder.{k}" for k in dropped)))
    notes = ("SimMIM decoder, mask token and relative_position_index buffers dropped",)
    return Remapped(enc, "simmim", renamed=len(enc), dropped=dropped_all, notes=notes)


_BEITV2_PRETRAIN_ONLY = ("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


def remap_beitv2_pretrain(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """BEiT-v2 pretraining checkpoint (microsoft/unilm beit2 `beitv2_{base,large}_patch16_224_pt1k.pth`).

    `{'model': ...}` whose backbone keys are already timm's `Beit` names: the shared relative position
    bias `rel_pos_bias.relative_position_bias_table`, layer scale `blocks.N.gamma_1/2`, and the separate
    `attn.q_bias` / `attn.v_bias`. Dropped: `mask_token`, the visual-token head `lm_head.*`, the [cls]
    pretraining blocks `cls_pt_layers.*` (and `cls_pt_norm.*` / `cls_pt_lm_head.*` when present), and the
    `relative_position_index` buffers, which timm recomputes (they are not parameters).
    """
    no_branch("beitv2_pretrain", branch)
    sd = tensors(model_entry(ckpt), "checkpoint['model']")
    sd, dropped = drop(
        sd,
        lambda k: (
            k == "mask_token" or k.startswith(_BEITV2_PRETRAIN_ONLY) or k.endswith("relative_position_index")
        ),
    )
    notes = ("BEiT-v2 pretraining heads (lm_head, cls_pt_layers) and mask token dropped",)
    return Remapped(sd, "beitv2_pretrain", dropped=dropped, notes=notes)


_D2V_IMAGE = "modality_encoders.IMAGE."
_D2V_RULES: tuple[tuple[str, str], ...] = (
    (rf"^{_D2V_IMAGE}local_encoder\.proj\.", "patch_embed.proj."),
    (rf"^{_D2V_IMAGE}fixed_positional_encoder\.positions$", "pos_embed"),
    (rf"^{_D2V_IMAGE}extra_tokens$", "cls_token"),
    (rf"^{_D2V_IMAGE}context_encoder\.norm\.", "norm_pre."),
)


def remap_data2vec2(ckpt: Mapping[str, Any], *, branch: str | None = None) -> Remapped:
    """data2vec 2.0 image checkpoint (facebookresearch/fairseq examples/data2vec, `base_imagenet.pt`).

    fairseq's `{'args', 'cfg', 'model', 'criterion', 'optimizer_history', 'task_state', 'extra_state',
    'last_optimizer_state'}`; `model` is `Data2VecMultiModel.state_dict()`: the student's tensors plus
    `_ema`, the EMA teacher's fp32 parameters (a dict under the same names, without the decoder). Takes
    the student by default, as data2vec's fine-tuning does (`load_state_dict(state['model'], strict=True)`);
    `branch='teacher'` takes `_ema`. The image encoder is `modality_encoders.IMAGE.*`: patch embedding
    `local_encoder.proj`, fixed sin-cos `fixed_positional_encoder.positions` (patches only, no [cls]),
    `extra_tokens` (the [cls] token, no position), `context_encoder.norm` (a LayerNorm before the blocks)
    and the first `context_encoder.blocks.*`; the shared `blocks.*` follow, renumbered after them. Blocks are
    post-LN (`layer_norm_first=False`), built by `vitprobe.architectures.PostNormBlock`. Dropped: the
    decoder `modality_encoders.IMAGE.decoder.*` and `_ema` (or the student, with `branch='teacher'`).
    """
    branch = check_branch("data2vec2", branch, ("student", "teacher"), "student")
    model = model_entry(ckpt)
    if not isinstance(model, Mapping):
        raise CheckpointError(f"checkpoint['model'] is a {type(model).__name__}, expected a state dict")
    source = model.get("_ema") if branch == "teacher" else {k: v for k, v in model.items() if k != "_ema"}
    if source is None:
        raise CheckpointError("this data2vec 2.0 file holds no EMA teacher (_ema)", "leave out --branch")
    sd = tensors(source, "checkpoint['model']" if branch == "student" else "checkpoint['model']['_ema']")
    sd, _ = strip_prefixes(sd, ("model.",))  # fine-tuned files wrap the pretrained model as `model.`
    pretraining_only = (f"{_D2V_IMAGE}decoder.", "shared_decoder.", "recon_proj.")
    sd, dropped = drop(sd, lambda k: k.startswith(pretraining_only))
    prenet = re.compile(rf"^{_D2V_IMAGE}context_encoder\.blocks\.(\d+)\.(.*)$")
    depth = len({m.group(1) for k in sd if (m := prenet.match(k))})
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if m := prenet.match(key):
            new = f"blocks.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^blocks\.(\d+)\.(.*)$", key):
            new = f"blocks.{int(m.group(1)) + depth}.{m.group(2)}"
        else:
            new = rename_key(key, _D2V_RULES)
        out[new] = value
    notes = [
        f"took the {'student (the network data2vec fine-tunes)' if branch == 'student' else 'EMA teacher'}; "
        f"{depth} context-encoder blocks and {len({k.split('.')[1] for k in sd if k.startswith('blocks.')})} "
        "shared blocks become blocks 0..N-1",
        "post-LN blocks: token outputs are already normalised (there is no final norm)",
    ]
    if branch == "student" and "_ema" in model:
        notes.append("the EMA teacher (_ema) is ignored (--branch teacher loads it)")
    return Remapped(out, "data2vec2", renamed=len(out), dropped=dropped, notes=tuple(notes), branch=branch)
