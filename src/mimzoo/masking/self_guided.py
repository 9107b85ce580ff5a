"""Self-guided informed masking (Self-Guided MAE, Shin et al. NeurIPS 2024): Normalized Cut on the
model's own patch features, then mask the object part first (see docs/sgmae.md in the mimzoo repository).

No official code exists: the graph, the object rule, the similarity score and the hint rules are
reconstructions, each a parameter. The strategy reads nothing from the model; the caller passes the
patch features ``[B, N, D]`` (or a cosine-similarity matrix ``[B, N, N]``):

    strategy(batch_size, grid_size, generator=None, features=f)  ->  bool [B, N], True = masked
    strategy.build(grid_size, generator, features=f)             ->  InformedMask (mask + diagnostics)

Every row has exactly ``round(ratio * N)`` masked patches, so the MAE path is unchanged. Called
without features (the registry's plain call), there is nothing to inform the mask: every row is a
random mask, counted as a fallback, so the strategy honours the contract every strategy does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .registry import MaskStrategy, num_masked, register_mask, to_device

GRAPHS = ("binary", "soft", "raw")
OBJECT_RULES = ("seed", "low_mean_sim", "smaller")
FILLS = ("rank", "object_then_random")
HINT_SELECTS = ("random", "low_score", "high_score")
HINT_REMASKS = ("random", "next_rank")


class Bipartition(NamedTuple):
    part: torch.Tensor  # bool [B, N]: y > mean(y) (which side is the object is decided later)
    fiedler: torch.Tensor  # [B, N]: y = D^-1/2 u2, the generalised eigenvector of (D - W) y = l D y
    eigenvalue: torch.Tensor  # [B]: the second-smallest eigenvalue of the normalised Laplacian
    valid: torch.Tensor  # bool [B]: False for a degenerate graph (constant weights, empty part, non-finite)


def affinity(similarity: torch.Tensor, graph: str = "binary", tau: float = 0.2, eps: float = 1e-5) -> torch.Tensor:
    """Edge weights from similarities: TokenCut's ``binary`` (1 above ``tau``, else ``eps``), ``soft``
    (the similarity above ``tau``, else ``eps``) or ``raw`` (the matrix as given, must be >= 0)."""
    if graph == "binary":
        return torch.where(similarity > tau, torch.ones_like(similarity), torch.full_like(similarity, eps))
    if graph == "soft":
        return torch.where(similarity > tau, similarity, torch.full_like(similarity, eps))
    if graph == "raw":
        return similarity
    raise ValueError(f"unknown graph {graph!r}; choose one of {GRAPHS}")


def ncut_bipartition(
    similarity: torch.Tensor, graph: str = "binary", tau: float = 0.2, eps: float = 1e-5
) -> Bipartition:
    """Batched Normalized Cut of ``[B, N, N]`` (or ``[N, N]``) similarities, on any device, in fp32.

    ``u2`` of ``I - D^-1/2 W D^-1/2`` (``torch.linalg.eigh``, ascending) gives ``y = D^-1/2 u2``, the
    solution of ``(D - W) y = l D y`` that TokenCut gets from ``scipy.linalg.eigh(D - W, D)``; the split
    is ``y > mean(y)``.
    """
    squeeze = similarity.ndim == 2
    s = similarity.unsqueeze(0) if squeeze else similarity
    no_autocast = (
        torch.autocast(device_type=s.device.type, enabled=False)
        if torch.amp.is_autocast_available(s.device.type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        s = s.float()
        finite = torch.isfinite(s).flatten(1).all(1)
        w = affinity(torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0), graph, tau, eps)
        w = 0.5 * (w + w.mT)
        flat = (w.amax((1, 2)) - w.amin((1, 2))) <= 1e-5 * w.abs().amax((1, 2)).clamp_min(1e-12)
        d = w.sum(-1)
        positive = (d > 0).all(1)
        d_isqrt = d.clamp_min(1e-12).rsqrt()
        eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype)
        lap = eye - d_isqrt.unsqueeze(-1) * w * d_isqrt.unsqueeze(-2)
        evals, evecs = torch.linalg.eigh(0.5 * (lap + lap.mT))
        y = d_isqrt * evecs[..., 1]
        part = y > y.mean(-1, keepdim=True)
        empty = ~part.any(-1) | part.all(-1)
        valid = finite & positive & ~flat & ~empty & torch.isfinite(y).all(-1)
    out = Bipartition(part, y, evals[..., 1], valid)
    return Bipartition(*(t.squeeze(0) for t in out)) if squeeze else out


def corner_indices(grid_size: tuple[int, int]) -> list[int]:
    h, w = grid_size
    return [0, w - 1, (h - 1) * w, h * w - 1]


def choose_object(
    similarity: torch.Tensor, bip: Bipartition, rule: str, grid_size: tuple[int, int], corner_check: bool = True
) -> torch.Tensor:
    """Which side of the cut is the object (bool ``[B, N]``).

    ``seed`` (TokenCut): the side holding ``argmax |y|``; ``low_mean_sim``: the side less similar to the
    mean patch (background dominates that mean; ``mean_j S_ij`` ranks patches as ``<E_i, mean E>`` does);
    ``smaller``: the smaller side. ``corner_check`` (MaskCut) swaps a side that holds >= 2 of the 4 corners.
    """
    part = bip.part
    if rule == "seed":
        seed = bip.fiedler.abs().argmax(-1, keepdim=True)
        obj = torch.where(part.gather(1, seed), part, ~part)
    elif rule == "low_mean_sim":
        to_mean = similarity.float().mean(-1)
        mean_in = (to_mean * part).sum(-1) / part.sum(-1).clamp_min(1)
        mean_out = (to_mean * ~part).sum(-1) / (~part).sum(-1).clamp_min(1)
        obj = torch.where((mean_in <= mean_out).unsqueeze(-1), part, ~part)
    elif rule == "smaller":
        obj = torch.where((part.sum(-1) <= part.shape[-1] / 2).unsqueeze(-1), part, ~part)
    else:
        raise ValueError(f"unknown object_rule {rule!r}; choose one of {OBJECT_RULES}")
    if corner_check:
        corners = obj[:, corner_indices(grid_size)].sum(-1) >= 2
        obj = torch.where(corners.unsqueeze(-1), ~obj, obj)
    return obj


@dataclass
class InformedMask:
    """A batch of informed masks and what they were made from (for logging and pictures)."""

    mask: torch.Tensor  # bool [B, N], True = masked, exactly round(ratio * N) per row
    object_part: torch.Tensor  # bool [B, N], the side of the cut chosen as the object
    score: torch.Tensor  # [B, N], similarity to the object centroid
    hints: torch.Tensor  # bool [B, N], object-ranked patches revealed as hints
    fallback: torch.Tensor  # bool [B], degenerate graph -> random mask

    @property
    def fallback_rate(self) -> float:
        return float(self.fallback.float().mean())


def _top(score: torch.Tensor, allowed: torch.Tensor, n: int) -> torch.Tensor:
    """Bool ``[B, N]`` of the ``n`` highest-scoring allowed entries per row (``n`` may vary per row)."""
    order = torch.argsort(torch.where(allowed, score, torch.full_like(score, -float("inf"))), 1, descending=True)
    if isinstance(n, torch.Tensor):
        n = n.to(score.device).expand(score.shape[0]).unsqueeze(-1)
    else:  # a number: filled on the device (torch.as_tensor(n, device=cuda) is a blocking copy)
        n = torch.full((score.shape[0], 1), int(n), device=score.device)
    ranked = torch.arange(score.shape[1], device=score.device).expand_as(score) < n
    return torch.zeros_like(allowed).scatter(1, order, ranked) & allowed


@register_mask("self_guided")
class SelfGuidedMask(MaskStrategy):
    """Informed mask from Ncut on given patch features (the caller picks which features; SG-MAE passes
    one encoder block's output on the unmasked image)."""

    def __init__(
        self,
        ratio: float = 0.75,
        graph: str = "binary",
        tau: float = 0.2,
        eps: float = 1e-5,
        object_rule: str = "seed",
        corner_check: bool = True,
        fill: str = "rank",
        hint_ratio: float = 0.1,
        hint_select: str = "random",
        hint_remask: str = "random",
    ):
        super().__init__(ratio)
        for key, value, allowed in (
            ("graph", graph, GRAPHS),
            ("object_rule", object_rule, OBJECT_RULES),
            ("fill", fill, FILLS),
            ("hint_select", hint_select, HINT_SELECTS),
            ("hint_remask", hint_remask, HINT_REMASKS),
        ):
            if value not in allowed:
                raise ValueError(f"self_guided mask: unknown {key} {value!r}; choose one of {allowed}")
        if not 0.0 <= hint_ratio <= 1.0:
            raise ValueError(f"self_guided mask: hint_ratio must lie in [0, 1], got {hint_ratio}")
        self.graph, self.tau, self.eps = graph, float(tau), float(eps)
        self.object_rule, self.corner_check, self.fill = object_rule, bool(corner_check), fill
        self.hint_ratio, self.hint_select, self.hint_remask = float(hint_ratio), hint_select, hint_remask

    def __call__(self, batch_size, grid_size, generator=None, features=None, similarity=None):
        """The registry's call with the features (or similarities) as a keyword: returns the bool mask."""
        mask = self.build(grid_size, generator, features=features, similarity=similarity, batch_size=batch_size).mask
        if mask.shape[0] != batch_size:
            raise ValueError(f"self_guided mask: batch_size {batch_size} but features for {mask.shape[0]} images")
        return mask

    def build(
        self,
        grid_size,
        generator=None,
        features=None,
        similarity=None,
        batch_size: int | None = None,
        hint_ratio: float | None = None,
    ) -> InformedMask:
        """The masks and their diagnostics; ``hint_ratio`` overrides the configured one (a schedule)."""
        if features is not None and similarity is not None:
            raise ValueError("the self_guided mask takes patch features=[B, N, D] or similarity=[B, N, N], not both")
        if features is None and similarity is None:
            return self._uninformed(batch_size, grid_size, generator)
        if similarity is None:
            e = F.normalize(features.detach().float(), dim=-1)
            similarity = e @ e.mT
        similarity = similarity.detach().float()
        b, n = similarity.shape[:2]
        if n != grid_size[0] * grid_size[1]:
            raise ValueError(f"self_guided mask: {n} patch features for a {grid_size} grid")
        k = self._count(n)
        device = similarity.device
        # CPU generator (seeds reproduce), copied without a host sync
        rand = lambda: to_device(torch.rand(b, n, generator=generator), device)  # noqa: E731
        bip = ncut_bipartition(similarity, self.graph, self.tau, self.eps)
        obj = choose_object(similarity, bip, self.object_rule, grid_size, self.corner_check)
        # Similarity score: cosine to the object centroid, <E_i, mean_{j in obj} E_j> up to a positive factor.
        score = (similarity * obj.unsqueeze(1)).sum(-1) / obj.sum(-1, keepdim=True).clamp_min(1)
        everything = torch.ones_like(obj)
        if self.fill == "rank":
            mask = _top(score, everything, k)
        else:
            mask = _top(score, obj, k)
            mask |= _top(rand(), ~mask, k - mask.sum(-1))
        hints = torch.zeros_like(mask)
        n_hint = min(int(round((self.hint_ratio if hint_ratio is None else hint_ratio) * k)), n - k)
        if n_hint:
            pick = {"random": rand(), "low_score": -score, "high_score": score}[self.hint_select]
            hints = _top(pick, mask, n_hint)
            remask_score = rand() if self.hint_remask == "random" else score
            remask = _top(remask_score, ~mask, n_hint)
            mask = (mask & ~hints) | remask
        fallback = ~bip.valid
        random = to_device(self._uninformed(b, grid_size, generator).mask, device)
        mask = torch.where(fallback.unsqueeze(-1), random, mask)
        hints &= ~fallback.unsqueeze(-1)
        torch._assert_async((mask.sum(-1) == k).all(), "self_guided mask lost the exact masked count")
        return InformedMask(mask, obj, score, hints, fallback)

    def _uninformed(self, batch_size: int | None, grid_size, generator) -> InformedMask:
        """Random masks with the exact count, every row a fallback (no features, or a degenerate graph)."""
        if batch_size is None:
            raise ValueError("the self_guided mask needs features=, similarity= or a batch_size")
        n = grid_size[0] * grid_size[1]
        mask = _top(
            torch.rand(batch_size, n, generator=generator), torch.ones(batch_size, n, dtype=torch.bool), self._count(n)
        )
        none = torch.zeros_like(mask)
        return InformedMask(mask, none, torch.zeros(batch_size, n), none, torch.ones(batch_size, dtype=torch.bool))

    def _count(self, n: int) -> int:
        k = num_masked(self.ratio, n)
        if k == 0 or k == n:
            raise ValueError(f"mask ratio {self.ratio} masks {k} of {n} patches; leave one visible and one masked")
        return k
