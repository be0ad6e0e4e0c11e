"""CrossGET: complete-graph soft matching (CGSM) with importance-weighted ensembling (vision stage).

Per merging layer, between the attention residual and the MLP (shapes: B batch, N tokens, d metric width):

1. S = m m^T with m the L2-normalised head-mean keys; the diagonal and protected rows/columns are -inf.
2. Rank-compare CGSM: rank_i = position of i when tokens are sorted by their row max of S (descending, stable on
   the index); edge i -> j is allowed only when rank_j > rank_i. masked_i = max over allowed j of S_ij.
3. score_i = imp_i - masked_i; the r smallest scores are sources (stable on the index); protected tokens and tokens
   with no allowed edge are never sources.
4. Each source's destination = argmax_j S_ij over non-source, non-protected j; exact ties go to the candidate with
   the lowest score, then the lowest index (the authors' reducer scans destinations in ascending score order).
5. Ensemble in size space: w = 2 softmax([imp_src, imp_dst]); u = x*size; u_dst += w0 u_src + (w1 - 1) u_dst;
   size_dst += size_src; the sources are dropped; x = u / size. Destinations keep their original order.

No N x N index scatter: the rank mask is one comparison ``rank[None, :] > rank[:, None]`` (vltok.kernels.cgsm).

Importance (training-free guidance, no extra token): ``"cls_attn"`` (default) = the head-mean attention the CLS
query pays each key in this layer (one query row, computed from the hooked q/k, with the proportional bias);
``"cls_query_cos"`` = cos(k_j, q_CLS) on the full width; ``"none"`` = 0. Encoders without CLS use ``"none"``.
The budget and the multi-round rule are ToMe's (vltok/methods/tome.py).

Trained variant (``cross_tokens=``): a learned cross token, as in the paper's LLaVA-1.5 code.

* The token is appended at the END of the encoder sequence before layer 0 as a copy of the CLS input plus a learned
  offset; at the start of every later layer l it is reset to stopgrad(its previous state) + offset[l] (offsets
  [L_used, C], zero-initialised, one per layer whose output reaches the projector; 0 after those). It is protected
  (never a source or destination) and stays last.
* It replaces CLS as the guidance: importance = the head-mean attention the cross token's query pays each real
  token (its own key excluded, proportional bias on), the same formula as ``"cls_attn"``.
* ``visible=False`` (vltok's default): the cross token only reads. Its key is masked (-inf) for every query, itself
  included, so the tower's real tokens compute exactly what they compute without it. With zero offsets its
  input equals CLS's and it sees the same keys, so it evolves exactly like CLS and step 0 equals the training-free
  ``"cls_attn"`` mode (up to float rounding of the masked attention; the merge decisions are identical; tested).
  ``visible=True`` is the paper's placement (every token attends to it). It then still evolves like CLS at step 0,
  but every real token sees CLS twice (the "double vote" of the spec's implicit training-free variant), so step 0
  differs from the training-free mode (tested).
* It is dropped before the projector (the paper keeps it as one extra visual token): the LLM gets exactly
  round(keep*N) visual tokens, the same placeholder count as the training-free mode.
* :class:`CrossTokens` holds the offsets and, optionally, a trained copy of the model's Linear-act-Linear projector
  (a 1x1 :class:`~vltok.methods.tokenshuffle.ShuffleProjector`), which then replaces the model's projector. One
  safetensors file (:func:`save_cross_tokens` / :func:`load_cross_tokens`) holds both, with metadata naming the
  encoder, its width, the number of layers and ``visible``; the adapter refuses a file that does not fit the model.

Deviation from the paper (training, vltok/train.py): the paper fine-tunes the whole LLaVA (LLM and projector) with
CE + a Jensen-Shannon loss pulling the image-side cross tokens towards learned text-side cross tokens inside the
LLM (at BOS). Here the LLM stays frozen and has no cross token: only the offsets (and by default the projector)
train, on the LM loss of the answers through the patched forward. With ``visible=False`` the offsets act only
through the importance-weighted ensemble weights (source selection is discrete), so most of the gain is expected
from the projector, which sees merged tokens off its training distribution.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import boolean, choice, file_or, optional, register
from ..errors import IncompatibleError
from ..stages import Method, VisionMerger, replace_projector
from ._checkpoint import checkpoint_meta
from .tome import SCHEDULES, round_sizes, spread_schedule

IMPORTANCES = ("cls_attn", "cls_query_cos", "none")
ENSEMBLES = ("importance", "size")


def cgsm_match(metric: torch.Tensor, imp: torch.Tensor, r: int, n_protected: int, impl: str = "auto"):
    """metric [B, N, d] (normalised), imp [B, N] -> (src [B, r], dst [B, r], is_src [B, N]).

    Steps 1-4 above, from vltok.kernels.cgsm (torch reference, or the Triton kernel on CUDA that never stores S;
    mutual nearest neighbours get one row max so fp rounding of S_ij vs S_ji cannot split their tie).
    Every sample gets exactly r sources; r must be at most (N - n_protected) // 2.
    """
    from vltok.kernels.cgsm import cgsm_match as match

    B, N, _ = metric.shape
    if r > (N - n_protected) // 2:
        raise ValueError(f"cgsm_match: r={r} exceeds half of the {N - n_protected} unprotected tokens")
    protected = (torch.arange(N, device=metric.device) < n_protected).expand(B, N)
    src, dst, _ = match(metric, imp, r, protected, impl)
    is_src = torch.zeros(B, N, dtype=torch.bool, device=metric.device).scatter_(1, src, True)
    return src, dst, is_src


def cgsm_merge(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, imp: torch.Tensor, src, dst, is_src,
               ensemble: str = "importance"):
    """Merge sources into destinations (step 5 above). Returns (x [B, N-r, C], size, pos). Inputs not modified."""
    B, N, C = x.shape
    r = src.shape[1]
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if ensemble == "importance":
        w = 2 * torch.softmax(torch.stack([imp.gather(1, src), imp.gather(1, dst)], -1).to(wdt), -1)
    else:
        w = torch.ones(B, r, 2, device=x.device)
    u = x.float() * size if x.dtype in (torch.float16, torch.bfloat16) else x * size
    u_src = u.gather(1, src[..., None].expand(-1, -1, C))
    u_dst = u.gather(1, dst[..., None].expand(-1, -1, C))
    delta = w[..., :1].to(u.dtype) * u_src + (w[..., 1:].to(u.dtype) - 1) * u_dst
    u = u.scatter_add(1, dst[..., None].expand(-1, -1, C), delta)
    size = size.scatter_add(1, dst[..., None], size.gather(1, src[..., None]))
    pos = pos.scatter_reduce(1, dst, pos.gather(1, src), reduce="amin")
    is_dst = torch.zeros_like(is_src).scatter_(1, dst, True)
    out = torch.where(is_dst[..., None], (u / size).to(x.dtype), x)     # untouched tokens stay bit-exact
    keep = ~is_src
    return out[keep].view(B, N - r, C), size[keep].view(B, N - r, 1), pos[keep].view(B, N - r)


def importance(kind: str, keys: torch.Tensor, query: torch.Tensor | None, size: torch.Tensor) -> torch.Tensor:
    """keys [B, N, H, d], query [B, H, d] (the CLS query) -> imp [B, N] (fp32)."""
    B, N = keys.shape[:2]
    if kind == "none" or query is None:
        return torch.zeros(B, N, device=keys.device)
    if kind == "cls_query_cos":
        return F.cosine_similarity(keys.flatten(2).float(), query.flatten(1).float()[:, None], dim=-1)
    d = keys.shape[-1]
    logits = torch.einsum("bhd,bnhd->bhn", query.float(), keys.float()) * d ** -0.5
    logits = logits + size.float().log().transpose(1, 2)                     # proportional attention
    return logits.softmax(-1).mean(1)


class CrossTokens(nn.Module):
    """The learned part of the trained variant: per-layer cross-token offsets [n_layers, width] (zero-initialised)
    and an optional projector (a 1x1 ShuffleProjector: Linear-act-Linear) that replaces the model's."""

    def __init__(self, n_layers: int, width: int, visible: bool = False, projector=None, encoder: str = ""):
        super().__init__()
        self.offsets = nn.Parameter(torch.zeros(n_layers, width))
        self.visible = bool(visible)
        self.encoder = encoder
        self.projector = projector

    def meta(self) -> dict:
        p = self.projector
        return {"method": "crossget", "n_layers": self.offsets.shape[0], "width": self.offsets.shape[1],
                "visible": self.visible, "encoder": self.encoder,
                "projector": None if p is None else {"in_dim": p.linear_1.in_features, "width": p.linear_1.out_features,
                                                     "out_dim": p.linear_2.out_features, "act": p.act_name}}


def save_cross_tokens(cross: CrossTokens, path: str, **extra) -> None:
    """One safetensors: ``offsets`` and ``projector.*``; metadata ``vltok`` = meta() + extra (e.g. keep)."""
    from safetensors.torch import save_file

    from .. import __version__

    meta = {**cross.meta(), **extra, "vltok": __version__}
    save_file({k: v.detach().contiguous().cpu() for k, v in cross.state_dict().items()}, path,
              metadata={"vltok": json.dumps(meta)})


def load_cross_tokens(path: str) -> CrossTokens:
    from safetensors.torch import load_file

    from .tokenshuffle import ShuffleProjector

    try:
        meta = checkpoint_meta(path)
    except Exception as e:   # missing file, not a safetensors file
        raise ValueError(f"crossget: cannot read cross_tokens={path!r} ({e}); pass a file saved by "
                         "vltok train crossget (out/crossget.safetensors)") from None
    if meta.get("method") != "crossget":
        raise ValueError(f"crossget: {path} is not a vltok crossget cross-token checkpoint (its metadata names "
                         f"{meta.get('method')!r}); pass a file saved by vltok train crossget")
    pm = meta.get("projector")
    proj = ShuffleProjector((1, 1), pm["in_dim"], pm["width"], pm["out_dim"], pm["act"]) if pm else None
    cross = CrossTokens(meta["n_layers"], meta["width"], meta.get("visible", False), proj, meta.get("encoder", ""))
    state = load_file(path)
    missing = set(cross.state_dict()) - set(state)
    if missing:
        raise ValueError(f"crossget: {path} lacks the tensors {sorted(missing)} its metadata announces")
    cross.load_state_dict(state)
    return cross.eval()


def cross_input(x: torch.Tensor, layer: int, offsets: torch.Tensor, appended: bool) -> torch.Tensor:
    """The cross token entering ``layer``: appended after the last token as CLS's input + offsets[0] at layer 0,
    else reset to stopgrad(its state) + offsets[layer] (0 past the offsets). x is not modified."""
    off = offsets[layer].to(x.dtype) if layer < offsets.shape[0] else None
    if not appended:
        tok = x[:, :1] if off is None else x[:, :1] + off
        return torch.cat([x, tok], 1)
    tok = x[:, -1:].detach()
    return torch.cat([x[:, :-1], tok if off is None else tok + off], 1)


class CrossGetMerger(VisionMerger):
    def __init__(self, keep: float, importance: str, ensemble: str, prop_attn: bool, cross: CrossTokens | None = None,
                 late: bool = False, post=None, early: bool = False):
        self.keep, self.importance, self.ensemble, self.prop_attn = keep, importance, ensemble, prop_attn
        self.late, self.early = late, early
        self.post = post   # schedule="auto": the pre-LLM reducer that stands in where the family has no vision stage
        self.needs_query = importance != "none"
        self.cross = cross
        self.trailing = 0 if cross is None else 1   # tokens the vision stage appends (vltok/vision.py)
        self.query_index = 0 if cross is None else -1
        self.visible = cross is not None and cross.visible
        self.projector = None if cross is None else cross.projector

    def schedule(self, n_patches: int, n_layers: int) -> list[int]:
        return spread_schedule(n_patches, self.keep, n_layers, self.late, self.early)

    def needed_sites(self) -> dict[str, str]:
        return {}   # learned cross tokens: install() checks the family (a vision stage that strips them)

    def install(self, sites, undo: list) -> None:
        """Learned cross tokens: refuse tokens that do not fit this model before anything is installed, place them
        on the tower's device and, when a trained projector comes with them, run it in place of the model's (only
        when something merges: keep=1.0 leaves the model unchanged)."""
        if not self.trailing:
            return
        facts, stock, layers = sites.vision_facts(), sites.projector(), sites.vision_layers()
        if facts is None or stock is None or not layers:
            raise IncompatibleError("this method appends a learned token to the vision encoder (CrossGET's "
                                    "cross_tokens), which this family's adapter cannot strip before the projector "
                                    "(LLaVA-1.5 only); use the training-free mode (no cross_tokens=)")
        cross, fix = self.cross, "train cross tokens for this model (vltok train crossget) or use the training-free mode"
        if facts.n_special == 0:
            raise IncompatibleError(f"cross_tokens start as a copy of CLS; the {facts.model_type} tower has no CLS "
                                    f"token; {fix}")
        if cross.encoder and cross.encoder != facts.encoder:
            raise IncompatibleError(f"cross_tokens were trained on the vision encoder {cross.encoder!r}, this model "
                                    f"has {facts.encoder!r}; {fix}")
        if cross.offsets.shape[1] != facts.width:
            raise IncompatibleError(f"cross_tokens have width {cross.offsets.shape[1]}, the vision encoder "
                                    f"{facts.width}; {fix}")
        if facts.used_layers is None:
            raise IncompatibleError(f"vision-stage methods need one vision_feature_layer; this checkpoint has "
                                    f"vision_feature_layer={facts.feature_layer}; use a pre-LLM method (e.g. 'pool')")
        schedule = self.schedule(facts.grid[0] * facts.grid[1], facts.used_layers)
        if cross.offsets.shape[0] != len(schedule):
            raise IncompatibleError(f"cross_tokens have offsets for {cross.offsets.shape[0]} encoder layers, this "
                                    f"model feeds the projector from {len(schedule)} (vision_feature_layer="
                                    f"{facts.feature_layer}); {fix}")
        p = cross.projector
        if p is not None:
            want = (stock.linear_1.in_features, stock.linear_1.out_features, stock.linear_2.out_features,
                    facts.projector_act)
            got = (p.linear_1.in_features, p.linear_1.out_features, p.linear_2.out_features, p.act_name)
            if got != want:
                raise IncompatibleError(f"the cross_tokens checkpoint's projector (in, width, out, act) = {got} does "
                                        f"not fit this model's {want}; {fix}")
        cross.to(device=next(layers[0].parameters()).device)   # (as a method projector is moved)
        if p is not None and any(schedule):
            replace_projector(sites, p, undo, per_token=True)   # per-token projector: a kept CLS is fine

    def enter(self, layer: int, x: torch.Tensor, appended: bool) -> torch.Tensor:
        return cross_input(x, layer, self.cross.offsets, appended)

    def merge(self, x, size, pos, keys, query, r, n_protected, extra=None, anchor=None):
        """``extra`` [B, N, E] (optional): channels merged alongside x with the same weights, never matched on
        (vltok.vision's group tracer); then (x, size, pos, extra) is returned. ``anchor`` [B, N] (optional): a
        value each output token takes from the token standing there (a merged group's destination; the Qwen
        tower keeps that unit's rotary position); then (x, size, pos, anchor) is returned (not with ``extra``)."""
        if extra is not None:   # x is only averaged (the matching reads keys and importance): carry extra along
            if anchor is not None:
                raise ValueError("merge: pass extra or anchor, not both")
            C = x.shape[-1]
            y, size, pos = self.merge(torch.cat([x.float(), extra.float()], -1), size, pos, keys, query, r,
                                      n_protected)
            return y[..., :C].to(x.dtype), size, pos, y[..., C:]
        if self.trailing:   # the cross token (last) is protected: merge the others, then put it back
            if anchor is not None:
                raise ValueError("merge: anchor is not supported with a cross token")
            t = self.trailing
            y, s, p = self._merge(x[:, :-t], size[:, :-t], pos[:, :-t], keys[:, :-t], query, r, n_protected)
            return torch.cat([y, x[:, -t:]], 1), torch.cat([s, size[:, -t:]], 1), torch.cat([p, pos[:, -t:]], 1)
        return self._merge(x, size, pos, keys, query, r, n_protected, anchor)

    def _merge(self, x, size, pos, keys, query, r, n_protected, anchor=None):
        kind = self.importance if (n_protected > 0 or self.trailing) else "none"
        C = x.shape[-1]
        kmean = keys.float().mean(2)
        imp = importance(kind, keys, query, size)
        rounds = round_sizes(x.shape[1], n_protected, r)
        B = x.shape[0]
        if len(rounds) == 1:
            src, dst, is_src = cgsm_match(F.normalize(kmean, dim=-1), imp, r, n_protected)
            out = cgsm_merge(x, size, pos, imp, src, dst, is_src, self.ensemble)
            return out if anchor is None else (*out, anchor[~is_src].view(B, -1))
        # several rounds in one layer: keys and importances of merged tokens are carried along
        both = torch.cat([x.float(), kmean, imp[..., None]], -1)
        for step in rounds:
            imp_t = both[..., -1]
            src, dst, is_src = cgsm_match(F.normalize(both[..., C:-1], dim=-1), imp_t, step, n_protected)
            both, size, pos = cgsm_merge(both, size, pos, imp_t, src, dst, is_src, self.ensemble)
            anchor = None if anchor is None else anchor[~is_src].view(B, -1)
        y = both[..., :C].to(x.dtype)
        return (y, size, pos) if anchor is None else (y, size, pos, anchor)


@register("crossget", "CrossGET: complete-graph soft matching inside the vision encoder, CLS-attention guidance "
          "(or a learned cross token: cross_tokens=...), importance-weighted merges, proportional attention; "
          "round(keep*N) tokens leave the encoder (schedule='post': merged after the encoder instead, where the "
          "family has no vision stage)", ("vision",), trained_variant=True,
          variants=(("schedule=post", {"schedule": "post"}),),
          options=dict(importance=choice(*IMPORTANCES), ensemble=choice(*ENSEMBLES), prop_attn=boolean(),
                       cross_tokens=optional(file_or(lambda: (CrossTokens,), "a CrossTokens module")),
                       schedule=choice(*SCHEDULES)))
def make_crossget(keep: float, importance: str = "cls_attn", ensemble: str = "importance",
                  prop_attn: bool = True, cross_tokens=None, schedule: str = "auto") -> Method:
    from .postmerge import PostMergeReducer

    if cross_tokens is not None and not isinstance(cross_tokens, CrossTokens):   # a checkpoint path
        cross_tokens = load_cross_tokens(cross_tokens)
    if cross_tokens is not None and importance == "none":
        raise ValueError("crossget: cross_tokens give the importance; importance='none' would ignore them "
                         "(use 'cls_attn' or 'cls_query_cos', computed from the cross token's query)")
    if cross_tokens is not None and schedule == "post":
        raise ValueError("crossget: cross_tokens live inside the vision encoder; schedule='post' merges after it "
                         "(drop cross_tokens, or use schedule='constant')")
    post = PostMergeReducer(keep, "cgsm")
    if schedule == "post":
        return Method("crossget", keep, dict(schedule="post"), pre_llm=post)
    params = dict(importance=importance, ensemble=ensemble, prop_attn=prop_attn, trained=cross_tokens is not None,
                  schedule=schedule)
    if cross_tokens is not None:
        params.update(visible=cross_tokens.visible, trained_projector=cross_tokens.projector is not None)
    fallback = post if schedule == "auto" and cross_tokens is None else None
    return Method("crossget", keep, params, vision=CrossGetMerger(keep, importance, ensemble, prop_attn, cross_tokens,
                                                                  schedule == "late", fallback, schedule == "early"))
