"""A DPP selection in the style of CDPruner (Zhang et al., arXiv 2506.10967, "Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs"): keep the subset of visual tokens that maximises the
determinant of a kernel of their similarities, conditioned on the instruction. Pre-LLM, training-free.

Checked against the authors' LLaVA code (Theia-4869/CDPruner, ``LlavaMetaForCausalLM.encode_images``, commit
ed9c12d; read through the code search, no copy):

* similarity S = cosine of the projected visual features (the projector's output);
* relevance r_i = mean over the instruction's tokens of the cosine between token i and the text, min-max
  normalised to [0, 1] (``(r - min + 1e-6) / (max - min)``); kernel L = diag(r) S diag(r);
* greedy MAP inference (Chen, Zhang & Zhou, NeurIPS'18, incremental Cholesky): k times pick argmax of the
  remaining marginal gains d_i^2 (ties to the lower index), update the Cholesky rows, set the picked gain to -inf;
  kept indices sorted.

Where vltok differs, and why:
* text: the authors use CLIP's text encoder on the instruction against CLIP's image embeddings, and for LLaVA-1.5
  they NEGATE that similarity (``(-relevance).mean``). vltok has no CLIP text tower for every model; it uses the
  LLM input embeddings of the prompt's non-image tokens (side input ``text_embeds``) against the projected
  features, the same space, with the sign of the paper's formula (``negate=True`` flips it as the authors' LLaVA
  code does).
* the min-max normalisation is per sample (the authors' runs over the whole batch, so a sample's selection would
  depend on its batch); a constant relevance gives r = 1.
* where the model gives no text embeddings (other families, or ``condition="none"``), L = S: plain diversity.
* a picked token whose gain is at most 1e-12 (duplicate tokens: flat backgrounds; or every token left already in the
  span of the picked ones, k beyond the kernel's numerical rank) gets a zero Cholesky vector (the limit in exact
  arithmetic, where its residual row is 0 too) instead of its rounding noise divided by ~0, which blew the gains up
  to inf / NaN and picked tokens twice; picked tokens are re-masked after every update. The loop always returns k
  distinct tokens (also for NaN in L).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IncompatibleError
from ..registry import boolean, choice, register
from ..stages import GridPlan, GridReducer, Method, selection_plan
from ..kernels import dpp as _kernel
from .dart import POSITIONS

CONDITIONS = ("auto", "text", "none")
EPS = 1e-12


def relevance(x: torch.Tensor, text_embeds, negate: bool = False) -> torch.Tensor:
    """x [B, N, C], text_embeds: list of B tensors [T_i, C] -> r [B, N] in [0, 1] (per-sample min-max of the mean
    cosine to the text tokens; 1 where the sample has no text or constant relevance)."""
    xn = F.normalize(x.float(), dim=-1)
    out = []
    for b, t in enumerate(text_embeds):
        if t is None or t.shape[0] == 0:
            out.append(torch.ones(x.shape[1], device=x.device))
            continue
        r = (xn[b] @ F.normalize(t.float().to(x.device), dim=-1).T).mean(-1)
        if negate:
            r = -r
        lo, hi = r.min(), r.max()
        span = hi - lo
        out.append(torch.where(span > 0, (r - lo + 1e-6) / span.clamp(min=1e-30), torch.ones_like(r)))
    return torch.stack(out)


def dpp_kernel(x: torch.Tensor, rel: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, C] -> L [B, N, N] = diag(r) S diag(r), S the cosine similarities (fp32); r None: L = S."""
    xn = F.normalize(x.float(), dim=-1)
    L = xn @ xn.transpose(1, 2)
    if rel is not None:
        L = rel[:, :, None] * L * rel[:, None, :]
    return L


IMPLS = ("auto", "torch", "triton")


def dpp_greedy(L: torch.Tensor, k: int, impl: str = "auto") -> torch.Tensor:
    """Greedy MAP of a DPP with kernel L [B, N, N] (Chen et al. 2018): [B, k] indices, ascending. ``impl``:
    ``torch`` (the loop below, the definition), ``triton`` (vltok.kernels.dpp: the whole loop in one launch, one
    program per sample; the same picks up to fp32 rounding of near-equal gains), ``auto`` (Triton where it runs:
    CUDA with triton installed, or TRITON_INTERPRET=1 on CPU, and N <= vltok.kernels.dpp.MAX_N; else torch)."""
    if impl not in IMPLS:
        raise ValueError(f"dpp_greedy: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return dpp_greedy_torch(L, k)
    if impl == "triton" or _kernel.fits(L):
        return _kernel.dpp_greedy_triton(L, k)
    return dpp_greedy_torch(L, k)


def dpp_greedy_torch(L: torch.Tensor, k: int, order: bool = False):
    """The definition: k steps of batched torch ops, no host sync; O(k^2 N) per sample. ``order=True``: (ascending
    indices, the picks in pick order)."""
    B, N, _ = L.shape
    if not 1 <= k <= N:
        raise ValueError(f"dpp: k={k} must be in [1, {N}]")
    L = L.float()
    ar = torch.arange(B, device=L.device)
    cis = torch.zeros(k, B, N, device=L.device)
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()
    taken = torch.zeros(B, N, dtype=torch.bool, device=L.device)
    sel = torch.empty(k, B, dtype=torch.long, device=L.device)
    for i in range(k):
        j = d2.argmax(dim=1)
        sel[i] = j
        row = L[ar, j]                                                            # [B, N]
        if i:
            row = row - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])
        dj = d2[ar, j]
        e = row / torch.where(dj > EPS, dj.clamp(min=EPS).sqrt(), float("inf"))[:, None]   # gain <= EPS: e = 0
        cis[i] = e
        taken[ar, j] = True
        d2 = (d2 - e.square()).masked_fill(taken, float("-inf"))
    out = sel.T.sort(dim=1).values
    return (out, sel.T) if order else out


class DppReducer(GridReducer):
    """Pre-LLM stage object: ``plan`` / ``select`` on the features the LLM receives
    (``after_projector``: LLaVA-1.5 reduces the projector's output for this reducer)."""

    after_projector = True

    def __init__(self, keep: float, condition: str, negate: bool, positions: str):
        self.keep, self.condition, self.negate, self.positions = keep, condition, negate, positions
        self.needs = ("text_embeds",) if condition == "text" else ()
        self.wants = ("text_embeds",) if condition == "auto" else ()

    def plan(self, h: int, w: int) -> GridPlan:
        return selection_plan(h, w, self.keep)

    def select(self, x, plan, text_embeds=None, **side):
        if plan.count == x.shape[1]:
            return torch.arange(plan.count, device=x.device).expand(x.shape[0], -1), x
        if self.condition == "text" and text_embeds is None:
            raise IncompatibleError("dpp with condition='text' needs the prompt's text embeddings (side input "
                                    "text_embeds); pass input_ids, or use condition='auto' / 'none'")
        rel = None
        if self.condition != "none" and text_embeds is not None:
            if len(text_embeds) != x.shape[0] or any(t.shape[-1] != x.shape[-1] for t in text_embeds):
                raise IncompatibleError(f"dpp: text_embeds ({len(text_embeds)} samples) do not match the "
                                        f"{x.shape[0]} images of width {x.shape[-1]}")
            rel = relevance(x, text_embeds, self.negate)
        idx = dpp_greedy(dpp_kernel(x, rel), plan.count)
        return idx, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@register("dpp", "CDPruner-style DPP: the most diverse tokens (greedy MAP of a similarity kernel), conditioned on "
          "the prompt's text embeddings where the model gives them; on the features the LLM receives",
          ("pre_llm",), options=dict(condition=choice(*CONDITIONS), negate=boolean(), positions=choice(*POSITIONS)))
def make_dpp(keep: float, condition: str = "auto", negate: bool = False, positions: str = "contiguous") -> Method:
    return Method("dpp", keep, dict(condition=condition, negate=negate, positions=positions),
                  pre_llm=DppReducer(keep, condition, bool(negate), positions))
