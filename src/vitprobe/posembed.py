"""Position encodings for another patch grid: DINOv2's own run-time rule, and timm's resampling of absolute
position embeddings and BEiT's relative position bias tables (used when the user asks for another size).

Pure functions of tensors; `vitprobe.models` decides when to call them and says so in the load report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vitprobe.errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor, nn

PosEmbedRule = Callable[["Tensor", tuple[int, int], int], "Tensor"]  # (pos_embed, grid, num_prefix) -> ...


def _square_side(n: int, what: str) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointError(f"{what} holds {n} patch positions, not a square grid", "check the checkpoint")
    return side


def _dinov2_interpolate(
    pos_embed: Tensor, grid: tuple[int, int], num_prefix: int, *, offset: float, antialias: bool
) -> Tensor:
    """facebookresearch/dinov2 `dinov2/models/vision_transformer.py` `interpolate_pos_encoding`: the prefix
    rows are kept, the square M x M patch grid is resized bicubically in float32, with scale factor
    (h + offset) / M, (w + offset) / M when `offset` is non-zero, else to the size (h, w)."""
    import torch
    from torch.nn import functional as F

    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:].float()  # (1, P, D), (1, M*M, D)
    side = _square_side(patches.shape[1], "pos_embed")
    dim = patches.shape[-1]
    scale = ((grid[0] + offset) / side, (grid[1] + offset) / side)
    size = {"scale_factor": scale} if offset else {"size": grid}
    resized = F.interpolate(
        patches.reshape(1, side, side, dim).permute(0, 3, 1, 2),  # (1, D, M, M)
        mode="bicubic",
        antialias=antialias,
        **size,
    )  # (1, D, h, w)
    assert tuple(resized.shape[-2:]) == tuple(grid), (resized.shape, grid)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, h*w, D)
    return torch.cat([prefix, resized.to(pos_embed.dtype)], dim=1)


def resample_pos_embed_dinov2(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """DINOv2's position embeddings for another patch grid, as its released models compute them at run time
    (`interpolate_offset=0.1`, `interpolate_antialias=False`: dinov2/hub/backbones.py `_make_dinov2_model`
    defaults). Loading these once equals what the official model adds to the tokens of an image of that size.

    Args:
        pos_embed: (1, P + M * M, D) as stored in the file.
        grid: the target patch grid (h, w).
        num_prefix: prefix rows (the [cls] position) copied unchanged.
    """
    return _dinov2_interpolate(pos_embed, grid, num_prefix, offset=0.1, antialias=False)


def resample_pos_embed_dinov2_reg(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """As `resample_pos_embed_dinov2` for the models with registers, which dinov2/hub/backbones.py builds
    with `interpolate_antialias=True, interpolate_offset=0.0` (resize to the size (h, w), antialiased).
    In timm's layout their `pos_embed` holds the patches only (the [cls] position is folded into [cls])."""
    return _dinov2_interpolate(pos_embed, grid, num_prefix, offset=0.0, antialias=True)


def resample_pos_embed_timm(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """timm's resampling (`timm.layers.resample_abs_pos_embed`: bicubic, antialiased; the prefix rows kept),
    which is also what timm's `dynamic_img_size=True` applies to every forward of another image size."""
    from timm.layers import resample_abs_pos_embed

    side = _square_side(pos_embed.shape[1] - num_prefix, "pos_embed")
    return resample_abs_pos_embed(pos_embed, list(grid), [side, side], num_prefix_tokens=num_prefix)


def resize_rel_pos_bias_table(table: Tensor, window: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """timm's resizing of a BEiT relative position bias table ((2w-1)^2 + 3 rows, one column per head) to
    another window (`timm.layers.resize_rel_pos_bias_table`, what timm's BEiT checkpoint filter applies)."""
    import warnings

    from timm.layers import resize_rel_pos_bias_table as timm_resize

    with warnings.catch_warnings():  # torch's performance / indexing chatter from inside timm's interpolation
        warnings.simplefilter("ignore", UserWarning)
        return timm_resize(table, new_window_size=window, new_bias_shape=shape)


def fit_positions(
    state_dict: Mapping[str, Tensor], model: nn.Module, rule: PosEmbedRule | None, *, resample_any: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Adapt a file's position encodings to the model's patch grid where the method or the user asks.

    `pos_embed` of another grid (only the number of positions differs) is resampled with the method's own
    `rule` (DINOv2), else, when the user asked for another image size (`resample_any`), with timm's;
    BEiT-style relative position bias tables are then resized with timm's rule too. Anything else is left
    for strict loading to report.

    Returns:
        The state dict to load and one note per change, for the load report.
    """
    expected = model.state_dict()
    out, notes = dict(state_dict), []
    have, want = out.get("pos_embed"), expected.get("pos_embed")
    grid = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
    other_grid = have is not None and want is not None and have.shape != want.shape
    if other_grid and have.shape[-1] == want.shape[-1]:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        side = math.isqrt(max(have.shape[1] - prefix, 0))
        how = rule or (resample_pos_embed_timm if resample_any else None)
        if how is not None and side * side == have.shape[1] - prefix:
            out["pos_embed"] = how(have, grid, prefix)
            said = "as the method's own model does for this image size" if rule else (
                "with timm's resample_abs_pos_embed (bicubic, antialiased), as timm's dynamic_img_size does"
            )
            notes.append(f"pos_embed resampled from {side}x{side} to {grid[0]}x{grid[1]} patches, {said}")
    if resample_any:
        resized = [
            key
            for key, table in out.items()
            if key.endswith("relative_position_bias_table")
            and key in expected
            and table.shape != expected[key].shape
        ]
        for key in resized:
            out[key] = resize_rel_pos_bias_table(out[key], grid, tuple(expected[key].shape))
        if resized:
            notes.append(
                f"{len(resized)} relative position bias table(s) resized to a {grid[0]}x{grid[1]} window "
                "with timm's resize_rel_pos_bias_table (as timm's BEiT checkpoint filter does)"
            )
    return out, notes
