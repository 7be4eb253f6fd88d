"""Head banks: K probe heads of one read-out as stacked tensors with a leading head axis, run as one.

A bank holds K copies of `vitprobe.heads.ProbeHead` for one `HeadSpec` (they differ in learning rate, and
may differ in initial weights); `bank(tokens)` gives all K heads' logits (K, B, C) with batched ops:

- pooled read-outs (`cls`, `mean`, `cls+mean`): the feature (B, F) and its BatchNorm are the same for every
  head (BatchNorm(affine=False) has no parameters and every head sees the same batches), so they are
  computed once; the K linear layers are one (B, F) × (F, K·C) matmul.
- `abmilp`: the K scores are one (B, T, D) · (D, K) product, the K pooled vectors one batched weighted sum.
- `attentive`: the K × Q queries attend in one product; the value projection is applied after pooling
  (Σ_i a_i (x_i W) = (Σ_i a_i x_i) W), so no (K, B, N, D) tensor is made.

Per-head BatchNorm runs as one `F.batch_norm` over (B, K·F). `head_state(k)` returns head k in
`ProbeHead`'s state-dict layout (the saved-head format), `load_heads` stacks ProbeHeads into a bank; the
parity with K separate ProbeHeads is tested in tests/test_probe_bank.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitprobe.errors import ProbeError
from vitprobe.heads import ClsCatReadout, HeadSpec, ProbeHead, block_cls
from vitprobe.tokens import Tokens

BN_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1  # torch's default, as ProbeHead's BatchNorm1d uses


class HeadBank(nn.Module):
    """K heads of one read-out; subclasses define `features`, which returns normalised features.

    Attributes:
        spec: the read-out.
        num_heads: K.
        num_classes: C.
        feat_dim: F, the width of the read-out's vector (D, or 2D for cls+mean).
    """

    shared_features = False  # True: features (B, F) are the same for every head

    def __init__(self, spec: HeadSpec, num_heads: int, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.num_heads = num_heads
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(num_heads, num_classes, feat_dim))  # (K, C, F)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))  # (K, C)
        bn_shape = (feat_dim,) if self.shared_features else (num_heads, feat_dim)
        self.register_buffer("running_mean", torch.zeros(bn_shape))
        self.register_buffer("running_var", torch.ones(bn_shape))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    # --- the forward pass ------------------------------------------------------------------------------
    def readout(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read-out vectors, (B, F) shared or (K, B, F), and per-patch scores (K, B, ...) or None."""
        raise NotImplementedError

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d(affine=False) of each head's features: (B, F) shared or (K, B, F) per head."""
        if self.training:
            self.num_batches_tracked.add_(1)
        x = x.to(self.running_mean.dtype)  # BatchNorm in the statistics' precision (fp32 under autocast)
        if self.shared_features:
            return F.batch_norm(
                x, self.running_mean, self.running_var, None, None, self.training, BN_MOMENTUM, BN_EPS
            )
        k, b, f = x.shape
        flat = x.permute(1, 0, 2).reshape(b, k * f)  # (K, B, F) -> (B, K·F)
        out = F.batch_norm(
            flat,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            None,
            None,
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )
        return out.view(b, k, f).permute(1, 0, 2)  # (K, B, F)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The K linear layers on normalised features: logits (K, B, C)."""
        if x.ndim == 2:  # shared (B, F): one matmul for every head
            b = x.shape[0]
            logits = x @ self.weight.reshape(-1, self.feat_dim).T  # (B, K·C)
            return logits.view(b, self.num_heads, self.num_classes).permute(1, 0, 2) + self.bias[:, None]
        return torch.baddbmm(self.bias[:, None], x, self.weight.transpose(1, 2))  # (K, B, C)

    def forward_with_scores(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (K, B, C) and per-patch scores ((K, B, N) abmilp, (K, B, Q, N) attentive, else None)."""
        features, scores = self.readout(tokens)
        return self.classify(self.normalise(features)), scores

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.forward_with_scores(tokens)[0]

    # --- optimisation and the saved-head layout --------------------------------------------------------
    def optim_params(self) -> list[tuple[nn.Parameter, bool]]:
        """(parameter, is_matrix) for the batched optimiser: whether one head's slice is a matrix."""
        return [(p, p.ndim > 2) for p in self.parameters()]

    def readout_state(self, k: int) -> dict[str, torch.Tensor]:
        """Head k's read-out parameters under ProbeHead's `readout.*` names."""
        return {}

    def load_readout_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Set head k's read-out parameters from ProbeHead's `readout.*` entries."""

    def head_state(self, k: int) -> dict[str, torch.Tensor]:
        """Head k as a `ProbeHead` state dict (read-out, BatchNorm statistics, Linear), detached copies."""
        stats = (
            (self.running_mean, self.running_var)
            if self.shared_features
            else (self.running_mean[k], self.running_var[k])
        )
        state = {
            **self.readout_state(k),
            "norm.running_mean": stats[0],
            "norm.running_var": stats[1],
            "norm.num_batches_tracked": self.num_batches_tracked,
            "linear.weight": self.weight[k],
            "linear.bias": self.bias[k],
        }
        return {name: t.detach().clone() for name, t in state.items()}

    @torch.no_grad()
    def load_head(self, k: int, head: ProbeHead) -> None:
        """Copy a ProbeHead's parameters and BatchNorm statistics into slot k."""
        state = head.state_dict()
        self.load_readout_state(k, state)
        self.weight[k].copy_(state["linear.weight"])
        self.bias[k].copy_(state["linear.bias"])
        if self.shared_features:
            self.running_mean.copy_(state["norm.running_mean"])
            self.running_var.copy_(state["norm.running_var"])
        else:
            self.running_mean[k].copy_(state["norm.running_mean"])
            self.running_var[k].copy_(state["norm.running_var"])
        self.num_batches_tracked.copy_(state["norm.num_batches_tracked"])


class PooledBank(HeadBank):
    """Parameter-free read-outs (`cls`, `mean`, `cls+mean`, `cls-cat`, `cls-cat+mean`): one shared feature
    and BatchNorm, K linear layers."""

    shared_features = True

    def readout(self, tokens: Tokens) -> tuple[torch.Tensor, None]:
        pool = self.spec.pool
        if pool in ("cls-cat", "cls-cat+mean"):
            cat = ClsCatReadout(
                tokens.cls.shape[-1] if tokens.cls is not None else 0,
                n=self.spec.n_last_blocks,
                with_mean=pool == "cls-cat+mean",
            )
            return cat(tokens)
        if pool == "cls":
            return _require_cls(tokens, pool), None
        if pool == "mean":
            return tokens.patch_mean(), None
        return torch.cat([_require_cls(tokens, pool), tokens.patch_mean()], dim=-1), None  # (B, 2D)


class FusionBank(HeadBank):
    """Fusion heads (MFF's softmax-weighted average of the blocks' [cls]; `vitprobe.heads.FusionReadout`)."""

    def __init__(self, spec: HeadSpec, num_heads: int, dim: int, num_classes: int, *, blocks: int) -> None:
        super().__init__(spec, num_heads, dim, num_classes)
        self.weights = nn.Parameter(torch.zeros(num_heads, blocks))  # (K, L): one head's (L,) vector

    def readout(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        cls = block_cls(tokens, "fusion", self.weights.shape[1])  # (B, L, D)
        w = self.weights.softmax(dim=1)  # (K, L)
        return torch.einsum("kl,bld->kbd", w, cls), w  # (K, B, D), (K, L)

    def readout_state(self, k: int) -> dict[str, torch.Tensor]:
        return {"readout.weights": self.weights[k]}

    def load_readout_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        self.weights[k].copy_(state["readout.weights"])


class AbmilpBank(HeadBank):
    """AbMILP heads (Beyond [cls]; see `vitprobe.heads.AbMILPReadout`): K score functions in one product."""

    def __init__(self, spec: HeadSpec, num_heads: int, dim: int, num_classes: int) -> None:
        super().__init__(spec, num_heads, dim, num_classes)
        self.hidden_weight = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_heads, dim, dim)) for _ in range(spec.abmilp_depth)]  # (K, D, D)
        )
        self.hidden_bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_heads, dim)) for _ in range(spec.abmilp_depth)]  # (K, D)
        )
        self.score_weight = nn.Parameter(torch.zeros(num_heads, 1, dim))  # (K, 1, D): one head's (1, D)
        self.score_bias = nn.Parameter(torch.zeros(num_heads, 1))  # (K, 1)

    def readout(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.patches is None:
            raise ProbeError("the abmilp read-out needs patch tokens", "extract the cache with --tokens all")
        bag = tokens.patches
        prefix = tokens.prefix
        if self.spec.abmilp_content == "all" and prefix is not None:
            bag = torch.cat([prefix, bag], dim=1)  # (B, P + N, D)
        if self.spec.abmilp_depth == 0:
            logits = torch.matmul(self.score_weight[:, 0], bag.transpose(1, 2)) + self.score_bias  # (B, K, T)
            scores = logits.softmax(dim=2)  # (B, K, T)
            pooled = torch.bmm(scores, bag).transpose(0, 1)  # (B, K, D) -> (K, B, D)
            scores = scores.transpose(0, 1)  # (K, B, T)
        else:
            act = torch.tanh if self.spec.abmilp_act == "tanh" else torch.relu
            h = act(
                torch.einsum("btd,ked->kbte", bag, self.hidden_weight[0]) + self.hidden_bias[0][:, None, None]
            )
            for w, b in zip(self.hidden_weight[1:], self.hidden_bias[1:], strict=True):
                h = act(torch.einsum("kbtd,ked->kbte", h, w) + b[:, None, None])  # (K, B, T, D)
            logits = (
                torch.einsum("kbtd,kd->kbt", h, self.score_weight[:, 0]) + self.score_bias[:, :, None]
            )  # (K, B, T)
            scores = logits.softmax(dim=2)  # (K, B, T)
            pooled = torch.einsum("kbt,btd->kbd", scores, bag)  # (K, B, D)
        num_patches = tokens.patches.shape[1]
        return pooled, scores[:, :, -num_patches:]  # scores over the patch grid (K, B, N)

    def readout_state(self, k: int) -> dict[str, torch.Tensor]:
        state = {}
        for i, (w, b) in enumerate(zip(self.hidden_weight, self.hidden_bias, strict=True)):
            state[f"readout.score.{2 * i}.weight"] = w[k]
            state[f"readout.score.{2 * i}.bias"] = b[k]
        last = 2 * self.spec.abmilp_depth
        state[f"readout.score.{last}.weight"] = self.score_weight[k]
        state[f"readout.score.{last}.bias"] = self.score_bias[k]
        return state

    def load_readout_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.readout_state(k).items():
            t.copy_(state[name])  # views into the stacked parameters


class AttentiveBank(HeadBank):
    """Attentive heads (efficient probing; see `vitprobe.heads.AttentiveReadout`), batched over K."""

    def __init__(self, spec: HeadSpec, num_heads: int, dim: int, num_classes: int) -> None:
        super().__init__(spec, num_heads, dim, num_classes)
        self.queries = nn.Parameter(torch.zeros(num_heads, spec.queries, dim))  # (K, Q, D)
        self.value = nn.Parameter(torch.zeros(num_heads, dim, dim))  # (K, D_out, D_in) as nn.Linear

    def readout(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.patches is None:
            raise ProbeError(
                "the attentive read-out needs patch tokens", "extract the cache with --tokens all"
            )
        x = tokens.patches  # (B, N, D)
        b, _, d = x.shape
        k, q = self.num_heads, self.spec.queries
        attn = (torch.einsum("kqd,bnd->kbqn", self.queries, x) * d**-0.5).softmax(dim=-1)  # (K, B, Q, N)
        summed = torch.einsum("kbqn,bnd->kbqd", attn, x)  # (K, B, Q, D): attention-weighted tokens
        chunks = self.value.view(k, q, d // q, d)  # (K, D, D) -> (K, Q, D/Q, D): the rows of chunk j
        pooled = torch.einsum("kbqd,kqcd->kbqc", summed, chunks).reshape(
            k, b, d
        )  # (K, B, Q, D/Q) -> (K, B, D)
        return pooled, attn

    def readout_state(self, k: int) -> dict[str, torch.Tensor]:
        return {"readout.queries": self.queries[k], "readout.value.weight": self.value[k]}

    def load_readout_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.readout_state(k).items():
            t.copy_(state[name])


def _require_cls(tokens: Tokens, pool: str) -> torch.Tensor:
    if tokens.cls is None:
        raise ProbeError(
            f"the {pool} read-out needs a [cls] token, and this batch has none", "use --pool mean"
        )
    return tokens.cls


def build_bank(spec: HeadSpec, num_heads: int, dim: int, num_classes: int, *, blocks: int = 1) -> HeadBank:
    """An empty bank (zeros) of `num_heads` heads for `spec` on D-dimensional tokens of `blocks` stored
    blocks; see `load_heads`."""
    if spec.pool in ("cls", "mean"):
        return PooledBank(spec, num_heads, dim, num_classes)
    if spec.pool == "cls+mean":
        return PooledBank(spec, num_heads, 2 * dim, num_classes)
    if spec.pool in ("cls-cat", "cls-cat+mean"):
        width = (spec.n_last_blocks + int(spec.pool == "cls-cat+mean")) * dim
        return PooledBank(spec, num_heads, width, num_classes)
    if spec.pool == "fusion":
        return FusionBank(spec, num_heads, dim, num_classes, blocks=blocks)
    if spec.pool == "abmilp":
        return AbmilpBank(spec, num_heads, dim, num_classes)
    return AttentiveBank(spec, num_heads, dim, num_classes)


def load_heads(
    spec: HeadSpec, heads: Sequence[ProbeHead], dim: int, num_classes: int, *, blocks: int = 1
) -> HeadBank:
    """A bank whose slot k starts as `heads[k]` (same parameters and BatchNorm statistics)."""
    bank = build_bank(spec, len(heads), dim, num_classes, blocks=blocks)
    for k, head in enumerate(heads):
        bank.load_head(k, head)
    return bank
