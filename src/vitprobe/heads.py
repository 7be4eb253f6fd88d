"""Probe heads: read-outs that turn cached tokens into one feature vector, then BatchNorm → Linear.

A head never sees images or a backbone: it takes a `Tokens` batch (the [cls] token, register tokens and
patch tokens of one block, as stored in a token cache) and returns logits. Every read-out ends in the
linear-probe head of MAE (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners", §A.2) that
Beyond [cls] (Przewięźlikowski et al., 2024) also uses: `BatchNorm1d(affine=False, eps=1e-6) → Linear`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vitprobe.choices import ABMILP_ACTS, ABMILP_CONTENTS, POOLS
from vitprobe.errors import ProbeError
from vitprobe.tokens import Tokens

MULTI_BLOCK_POOLS = ("cls-cat", "cls-cat+mean", "fusion")  # read several stored blocks at once


@dataclass(frozen=True)
class HeadSpec:
    """A read-out and its options; the name a head is saved and reported under is `name`."""

    pool: str = "cls"  # one of POOLS
    abmilp_depth: int = (
        0  # extra Linear(D, D)+act layers before the score; 0 = the paper's D+1-parameter score
    )
    abmilp_act: str = "tanh"  # activation of those extra layers (Beyond [cls] tries tanh and relu)
    abmilp_content: str = "patch"  # "patch": patch tokens only (the paper's best); "all": [cls]/registers too
    queries: int = 4  # learnable queries of the attentive read-out
    n_last_blocks: int = 4  # cls-cat: [cls] of this many last stored blocks (DINOv2 linear eval uses 4)
    block: int | None = None  # per-layer sweep: the backbone block this read-out reads (named pool@block)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ProbeError(f"unknown read-out {self.pool!r}", f"use one of {', '.join(POOLS)}")
        if self.abmilp_act not in ABMILP_ACTS:
            raise ProbeError(
                f"unknown --abmilp-act {self.abmilp_act!r}", f"use one of {', '.join(ABMILP_ACTS)}"
            )
        if self.abmilp_content not in ABMILP_CONTENTS:
            raise ProbeError(
                f"unknown --abmilp-content {self.abmilp_content!r}",
                f"use one of {', '.join(ABMILP_CONTENTS)}",
            )
        if self.block is not None and self.pool in MULTI_BLOCK_POOLS:
            raise ProbeError(
                f"the {self.pool} read-out reads several blocks and cannot be pinned to block {self.block}",
                "drop the block from this read-out",
            )
        if self.abmilp_depth < 0 or self.queries < 1 or self.n_last_blocks < 1:
            raise ProbeError(
                "--abmilp-depth must be >= 0, --queries and --n-last-blocks >= 1", "fix the value"
            )

    @property
    def name(self) -> str:
        """`pool`, or `pool@block` for one block of a per-layer sweep (e.g. `cls@3`)."""
        return self.pool if self.block is None else f"{self.pool}@{self.block}"


    @property
    def needs_patches(self) -> bool:
        """Whether the read-out needs per-token patches (not a pooled cache)."""
        return self.pool in ("abmilp", "attentive")

    @property
    def needs_cls(self) -> bool:
        return self.pool in ("cls", "cls+mean", *MULTI_BLOCK_POOLS)

    @property
    def multi_block(self) -> bool:
        """Whether the read-out reads several stored blocks (tokens with a block axis)."""
        return self.pool in MULTI_BLOCK_POOLS

    @property
    def uses_mean(self) -> bool:
        """Whether the read-out reads the patch mean (from patches, or a pooled cache's stored mean)."""
        return self.pool in ("mean", "cls+mean", "cls-cat+mean")

    def options(self) -> dict[str, Any]:
        """The options that matter for this pool, for results and saved-head JSON."""
        if self.pool == "abmilp":
            return {k: v for k, v in asdict(self).items() if k.startswith("abmilp_")}
        if self.pool == "attentive":
            return {"queries": self.queries}
        if self.pool in ("cls-cat", "cls-cat+mean"):
            return {"n_last_blocks": self.n_last_blocks}
        return {}


class ClsReadout(nn.Module):
    """The [cls] token: the standard linear probe (MAE §A.2; DINO; Beyond [cls] baseline)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, None]:
        if tokens.cls is None:
            raise ProbeError(
                "the cls read-out needs a [cls] token, and this batch has none", "use --pool mean"
            )
        return tokens.cls, None


class MeanReadout(nn.Module):
    """Mean of the patch tokens ("global average pooling", MAE §A.2 / Beyond [cls] `pos` features)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, None]:
        return tokens.patch_mean(), None


class ClsMeanReadout(nn.Module):
    """[cls] concatenated with the patch mean (Beyond [cls] `both` features; DINOv2 linear eval)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = 2 * dim

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, None]:
        if tokens.cls is None:
            raise ProbeError("the cls+mean read-out needs a [cls] token", "use --pool mean")
        return torch.cat([tokens.cls, tokens.patch_mean()], dim=-1), None  # (B, 2D)


def block_cls(tokens: Tokens, pool: str, need: int = 1) -> torch.Tensor:
    """The [cls] tokens of every stored block (B, L, D), checking there is a block axis with `need` blocks."""
    if tokens.cls is None:
        raise ProbeError(
            f"the {pool} read-out needs a [cls] token, and this batch has none", "use --pool mean"
        )
    if tokens.cls.ndim != 3 or tokens.cls.shape[1] < need:
        have = 1 if tokens.cls.ndim == 2 else tokens.cls.shape[1]
        raise ProbeError(
            f"the {pool} read-out needs {need} or more stored blocks, and the cache holds {have}",
            "extract the cache with several --layers (e.g. --layers -4,-3,-2,-1)",
        )
    return tokens.cls


class ClsCatReadout(nn.Module):
    """[cls] of the last n stored blocks, concatenated in block order (DINOv2 linear evaluation,
    `create_linear_input` with `n_last_blocks`); with `with_mean`, also the mean of the last block's patch
    tokens (DINOv2's `use_avgpool`)."""

    def __init__(self, dim: int, *, n: int, with_mean: bool) -> None:
        super().__init__()
        self.n, self.with_mean = n, with_mean
        self.out_dim = (n + int(with_mean)) * dim

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, None]:
        cls = block_cls(tokens, "cls-cat", self.n)[:, -self.n :]  # (B, n, D)
        parts = [cls.reshape(len(cls), -1)]  # (B, n·D), earlier blocks first
        if self.with_mean:
            parts.append(tokens.patch_mean()[:, -1])  # (B, L, D) -> the last block's (B, D)
        return torch.cat(parts, dim=-1), None


class FusionReadout(nn.Module):
    """A learned softmax-weighted average of the stored blocks' [cls] tokens: MFF's multi-level feature
    fusion (Liu et al., ICCV 2023; mmpretrain `MFFViT`: softmax over per-level weights, initialised equal)
    used as a probe. No projection layers (MFF's are part of its pre-training)."""

    def __init__(self, dim: int, *, blocks: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.weights = nn.Parameter(torch.zeros(blocks))  # softmax(0) = equal weights, as MFF's ones

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused [cls] (B, D) and the block weights (L,)."""
        cls = block_cls(tokens, "fusion", len(self.weights))  # (B, L, D)
        w = self.weights.softmax(dim=0)  # (L,)
        return torch.einsum("l,bld->bd", w, cls), w


class AbMILPReadout(nn.Module):
    """Attention-based MIL pooling as in Beyond [cls] (Przewięźlikowski et al., 2024, arXiv:2412.03215, §4).

    After Ilse et al., 2018 ("Attention-based Deep Multiple Instance Learning"). Each token z_i of the bag
    gets a score s_i = softmax_i(f(z_i)) with f(z) = w·z + b at depth 0 (D + 1 parameters), and the bag is
    z = Σ_i s_i z_i. `depth` adds Linear(D, D)+act layers before the score (the paper's `--abmilp_depth`
    counts the score layer too, so its depth 1 is our depth 0). The bag is the patch tokens ("patch", the
    paper's setting for MAE) or the prefix tokens and patches ("all").
    """

    def __init__(self, dim: int, *, depth: int = 0, act: str = "tanh", content: str = "patch") -> None:
        super().__init__()
        self.out_dim = dim
        self.content = content
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(dim, dim), nn.Tanh() if act == "tanh" else nn.ReLU()]
        layers.append(nn.Linear(dim, 1))
        self.score = nn.Sequential(*layers)

    def bag(self, tokens: Tokens) -> torch.Tensor:
        """The tokens to pool (B, T, D): patches, or prefix tokens then patches."""
        if tokens.patches is None:
            raise ProbeError("the abmilp read-out needs patch tokens", "extract the cache with --tokens all")
        prefix = tokens.prefix
        if self.content == "all" and prefix is not None:
            return torch.cat([prefix, tokens.patches], dim=1)  # (B, P + N, D)
        return tokens.patches

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, D) and the scores over the patch tokens (B, N) (prefix scores dropped)."""
        bag = self.bag(tokens)
        scores = self.score(bag).squeeze(-1).softmax(dim=1)  # (B, T)
        pooled = torch.einsum("bt,btd->bd", scores, bag)  # (B, D)
        num_patches = tokens.patches.shape[1]
        return pooled, scores[:, -num_patches:]  # (B, N)


class AttentiveReadout(nn.Module):
    """Multi-query cross-attention pooling: efficient probing (EP) of Psomas et al., 2025, arXiv:2506.10178.

    Q learnable queries q_j attend over the patch tokens with the tokens themselves as keys (no key
    projection): a_j = softmax_i(q_j·x_i / √D). The values V = x W_v (D → D) are split into Q chunks of
    D/Q channels; chunk j of the output is Σ_i a_j,i V_i[chunk j], and the Q chunks concatenate back to D.
    """

    def __init__(self, dim: int, *, queries: int = 4) -> None:
        super().__init__()
        if dim % queries:
            raise ProbeError(
                f"the attentive read-out needs dim {dim} divisible by --queries {queries}",
                "pick a number of queries that divides the token dimension",
            )
        self.out_dim = dim
        self.num_queries = queries
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (B, D) and the attention of each query over the patches (B, Q, N)."""
        if tokens.patches is None:
            raise ProbeError(
                "the attentive read-out needs patch tokens", "extract the cache with --tokens all"
            )
        x = tokens.patches  # (B, N, D)
        b, n, d = x.shape
        attn = (torch.einsum("qd,bnd->bqn", self.queries, x) * d**-0.5).softmax(dim=-1)  # (B, Q, N)
        values = self.value(x).reshape(b, n, self.num_queries, d // self.num_queries)  # (B, N, Q, D/Q)
        pooled = torch.einsum("bqn,bnqc->bqc", attn, values).reshape(b, d)  # (B, Q, D/Q) -> (B, D)
        return pooled, attn


class ProbeHead(nn.Module):
    """A read-out, then the MAE linear-probe head BatchNorm1d(affine=False, eps=1e-6) → Linear.

    The Linear starts as in MAE's `main_linprobe.py`: weights from a truncated normal with std 0.01, bias 0.
    """

    def __init__(self, readout: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.readout = readout
        self.norm = nn.BatchNorm1d(readout.out_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(readout.out_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """Logits (B, C)."""
        return self.forward_with_scores(tokens)[0]

    def forward_with_scores(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and per-patch scores ((B, N) abmilp, (B, Q, N) attentive, else None)."""
        features, scores = self.readout(tokens)
        return self.linear(self.norm(features)), scores


def build_head(spec: HeadSpec, dim: int, num_classes: int, *, blocks: int = 1) -> ProbeHead:
    """A fresh head for `spec` on D-dimensional tokens of `blocks` stored blocks (multi-block read-outs);
    parameters come from torch's global RNG."""
    if spec.pool in ("cls-cat", "cls-cat+mean"):
        readout: nn.Module = ClsCatReadout(dim, n=spec.n_last_blocks, with_mean=spec.pool == "cls-cat+mean")
    elif spec.pool == "fusion":
        readout = FusionReadout(dim, blocks=blocks)
    elif spec.pool == "cls":
        readout = ClsReadout(dim)
    elif spec.pool == "mean":
        readout = MeanReadout(dim)
    elif spec.pool == "cls+mean":
        readout = ClsMeanReadout(dim)
    elif spec.pool == "abmilp":
        readout = AbMILPReadout(
            dim, depth=spec.abmilp_depth, act=spec.abmilp_act, content=spec.abmilp_content
        )
    else:
        readout = AttentiveReadout(dim, queries=spec.queries)
    return ProbeHead(readout, num_classes)
