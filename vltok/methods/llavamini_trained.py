"""LLaVA-Mini, trained adapter (``vltok.patch(model, "llavamini", keep=..., mode="trained", weights=...)``).

Two learned parts (specs/methods/llava_mini.md §2.1-2.3), both in :class:`MiniModule`:

* **Compressor** (:class:`Compressor`): C x C learned queries cross-attend over one image's grid in vision-encoder
  space (before the projector): Q = ln_q(query) + P_q, K = ln_kv(V) + P_k, values = V, multi-head attention with
  q/k/v/o projections (width = the vision hidden size, ``heads`` heads). P_q is a fixed 2-D sin-cos table for the
  C x C grid (half the channels encode the row, half the column, base 10000), P_k the same table bicubically
  resized to the input grid. The compressed tokens then go through the (stock or trained) projector.
  C = max(1, round(sqrt(keep * N))) (:func:`compressor_size`); a checkpoint is tied to its C.
* **Pre-fusion** (:meth:`MiniModule.fuse`): P decoder layers shaped like the LLM's (copies of its layers 0..P-1 at
  initialisation) run over [all projected visual tokens of the sample's images, the compressed tokens, the text
  tokens] with a causal mask and the LLM's rotary embeddings; positions count the valid keys from 0. Keys that are
  padding, answer tokens (``labels != -100``) or generated tokens are masked and their rows keep their raw
  embedding. The LLM then gets the fused text rows and the fused compressed rows in the sequence's own order
  (compressed rows where the image placeholders were), so its input has C^2 + L columns.

Gate (not from the paper; ``gate=True`` default): the LLM gets raw + tanh(g) * (fused - raw) per channel, g = 0 at
step 0, so at step 0 the pre-fusion changes nothing and the whole model equals ``mode="pool"`` on a C x C grid (the
copied layers' outputs would otherwise re-enter LLM layer 0, a shift a short frozen-LLM run cannot absorb).
``gate=False`` hands the fused rows over as the reference does.

Step-0 initialisation (not from the paper): the K in-projection is zero (every logit is 0: uniform attention), the
V and output projections are the identity, and values skip the LayerNorm. With ``local=True`` (default) each
query only attends to its own adaptive-pooling window of the grid (PyTorch's ``adaptive_avg_pool2d`` bins), so
step 0 equals ``mode="pool"`` with a C x C grid (``pool_grid(x, h, w, C, C)``) up to float rounding; the
compressed tokens still see the whole image through pre-fusion (they follow all visual tokens there).
``local=False`` is the paper's global cross-attention; its step 0 gives every query the mean over all tokens.
Deviations from the reference: values are not LayerNorm'ed (exact step 0), the optional window restriction,
pre-fusion initialised from the LLM rather than at random.

The method installs all of it itself (:meth:`MiniTrainedReducer.install`, on the adapter's sites of
vltok.stages.Sites: projector, llm, decoder_layers): ``MiniModule.bind(decoder_layers, projector)`` copies the
LLM's first P layers and the projector when it is trained, then loads pending checkpoint weights; the trained
projector replaces the model's; ``fuse(...)`` runs on the LLM input at prefill. No adapter knows LLaVA-Mini.
"""
from __future__ import annotations

import copy
import json
import time
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import IncompatibleError
from ..stages import GridPlan, GridReducer
from ._checkpoint import checkpoint_meta


def compressor_size(keep: float, n: int) -> int:
    """C for a grid of n tokens: max(1, round(sqrt(keep * n)))."""
    return max(1, round(math.sqrt(keep * n)))


def sincos_2d(c_h: int, c_w: int, dim: int) -> torch.Tensor:
    """[c_h * c_w, dim] fixed 2-D sin-cos table (raster): channels [0, dim/2) encode the row, the rest the column."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)

    def axis(n):
        a = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)   # [n, dim/2]

    rows = axis(c_h)[:, None].expand(c_h, c_w, 2 * q)
    cols = axis(c_w)[None].expand(c_h, c_w, 2 * q)
    return torch.cat([rows, cols], dim=-1).reshape(c_h * c_w, dim).float()


def pool_windows(h: int, w: int, r_h: int, r_w: int) -> torch.Tensor:
    """[r_h * r_w, h * w] bool: output cell (i, j) covers the input cells of adaptive_avg_pool2d's bin (i, j)."""
    def bins(n, r):
        i = torch.arange(r)
        start, end = (i * n) // r, -((-(i + 1) * n) // r)
        a = torch.arange(n)
        return (a[None] >= start[:, None]) & (a[None] < end[:, None])   # [r, n]

    rb, cb = bins(h, r_h), bins(w, r_w)
    return (rb[:, None, :, None] & cb[None, :, None, :]).reshape(r_h * r_w, h * w)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy without the original's forward hooks (an adapter's hooks on the projector must not follow)."""
    c = copy.deepcopy(module)
    for m in c.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(m, name, {}).clear()
    return c


class Compressor(nn.Module):
    """C x C learned queries cross-attending over one grid [B, h*w, width] -> [B, C*C, width] (see module doc)."""

    def __init__(self, width: int, c: int, heads: int = 8, local: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"compressor width {width} is not divisible by heads={heads}")
        self.width, self.c, self.heads, self.local = width, c, heads, local
        self.query = nn.Parameter(torch.randn(c * c, width) * 0.02)
        self.register_buffer("pe_q", sincos_2d(c, c, width), persistent=False)
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.o_proj = nn.Linear(width, width), nn.Linear(width, width)
        with torch.no_grad():   # step 0: uniform attention (zero keys), identity values / output
            self.k_proj.weight.zero_()
            self.k_proj.bias.zero_()
            for lin in (self.v_proj, self.o_proj):
                lin.weight.copy_(torch.eye(width))
                lin.bias.zero_()

    def key_pe(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.c, self.c):
            return self.pe_q
        t = self.pe_q.T.reshape(1, self.width, self.c, self.c)
        return F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)[0].flatten(1).T

    def forward(self, x: torch.Tensor, h: int, w: int, return_attention: bool = False):
        B, n, D = x.shape
        if n != h * w or D != self.width:
            raise ValueError(f"compressor: expected [B, {h}*{w}, {self.width}], got {list(x.shape)}")
        hd = D // self.heads
        q = self.q_proj(self.ln_q(self.query) + self.pe_q.to(x.dtype))              # [C^2, D]
        k = self.k_proj(self.ln_kv(x) + self.key_pe(h, w).to(x.dtype))              # [B, n, D]
        v = self.v_proj(x)
        q = q.view(1, -1, self.heads, hd).transpose(1, 2)                           # [1, H, C^2, hd]
        k = k.view(B, n, self.heads, hd).transpose(1, 2)
        v = v.view(B, n, self.heads, hd).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(hd)                 # [B, H, C^2, n]
        if self.local:
            win = pool_windows(h, w, self.c, self.c).to(x.device)
            logits = logits.masked_fill(~win, float("-inf"))
        attn = logits.softmax(-1)
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, -1, D)
        out = self.o_proj(out)
        return (out, attn) if return_attention else out


class MiniModule(nn.Module):
    """The trained LLaVA-Mini parts: ``compressor``, ``prefusion`` (P LLM-shaped decoder layers) and, when trained,
    ``projector`` (a copy of the model's). ``prefusion`` / ``projector`` exist once :meth:`bind` ran."""

    def __init__(self, width: int, c: int, heads: int = 8, local: bool = True, prefusion_layers: int = 4,
                 train_projector: bool = True, grid: tuple[int, int] | None = None, encoder: str = "",
                 gate: bool = True):
        super().__init__()
        self.compressor = Compressor(width, c, heads, local)
        self.n_prefusion, self.train_projector = int(prefusion_layers), bool(train_projector)
        self.grid, self.encoder = tuple(grid) if grid else None, encoder
        self.use_gate = bool(gate)
        self.gate = None   # [D] per-channel tanh gate on the fused rows (zero at step 0), created by bind()
        self.prefusion = None
        self.projector = None
        self.llm_hidden = None
        self._pending: dict | None = None   # checkpoint tensors waiting for bind()

    @property
    def c(self) -> int:
        return self.compressor.c

    @property
    def bound(self) -> bool:
        return self.prefusion is not None

    def bind(self, decoder_layers, projector) -> None:
        """Build the pre-fusion layers as copies of the LLM's first P decoder layers (and the projector copy when it
        is trained), on their device / dtype; then load pending checkpoint weights. Already bound: check the shapes."""
        ref = next(iter(decoder_layers[0].parameters()))
        hidden = getattr(getattr(getattr(decoder_layers[0], "self_attn", None), "config", None), "hidden_size", None)
        if self.bound:
            if self.llm_hidden is not None and hidden is not None and hidden != self.llm_hidden:
                raise IncompatibleError(f"llavamini: these pre-fusion layers were built for an LLM of width "
                                        f"{self.llm_hidden}, not {hidden}")
            return
        if self.n_prefusion > len(decoder_layers):
            raise IncompatibleError(f"llavamini: {self.n_prefusion} pre-fusion layers requested but the LLM has "
                                    f"only {len(decoder_layers)}")
        self.prefusion = nn.ModuleList([fresh_copy(decoder_layers[i]) for i in range(self.n_prefusion)])
        if self.train_projector:
            self.projector = fresh_copy(projector)
        if self.use_gate:
            self.gate = nn.Parameter(torch.zeros(hidden if hidden is not None else ref.shape[-1]))
        self.llm_hidden = hidden
        self.to(device=ref.device, dtype=ref.dtype)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self.load_state_dict(pending, strict=True)
            except RuntimeError as e:
                raise IncompatibleError(f"llavamini: the checkpoint does not fit this model's LLM / projector "
                                        f"({str(e).splitlines()[0]} ...); use a checkpoint trained on this model") from e

    def fuse(self, embeds, visual, image_cols, fuse_cols, rope):
        """Pre-fusion of one LLM input.

        embeds [B, S, D]: the LLM input (text embeddings, compressed rows at the image columns); visual: per sample
        a [M_b, D] tensor of the projected full visual tokens of its images (in order); image_cols [B, S] bool;
        fuse_cols [B, S] bool: the text columns to fuse (valid, not answer / generated); rope(x, position_ids) ->
        (cos, sin). Returns the new LLM input [B, S, D]: fused rows at image and fused columns, raw rows elsewhere.
        """
        B, S, D = embeds.shape
        dev = embeds.device
        m_max = max(int(v.shape[0]) for v in visual)
        vis = embeds.new_zeros(B, m_max, D)
        vis_valid = torch.zeros(B, m_max, dtype=torch.bool, device=dev)
        for b, v in enumerate(visual):
            vis[b, :v.shape[0]] = v
            vis_valid[b, :v.shape[0]] = True
        perm = (~image_cols).long().argsort(dim=1, stable=True)                  # image columns first, then text
        seq_t = embeds.gather(1, perm[..., None].expand(B, S, D))
        valid_t = (image_cols | fuse_cols).gather(1, perm)
        x = torch.cat([vis, seq_t], dim=1)                                        # [B, T, D]
        valid = torch.cat([vis_valid, valid_t], dim=1)
        T = x.shape[1]
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        i = torch.arange(T, device=dev)
        allowed = (i[None, :, None] >= i[None, None, :]) & (valid[:, None, :] | (i[:, None] == i[None, :])[None])
        mask = torch.zeros(B, 1, T, T, dtype=x.dtype, device=dev).masked_fill(~allowed[:, None],
                                                                             torch.finfo(x.dtype).min)
        pe = rope(x, pos)
        for layer in self.prefusion:
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            x = out[0] if isinstance(out, tuple) else out
        fused_t = x[:, m_max:]
        fused = torch.empty_like(embeds).scatter_(1, perm[..., None].expand(B, S, D), fused_t)
        if self.gate is not None:   # zero-initialised gate: step 0 leaves the LLM input unchanged
            fused = embeds + self.gate.tanh().to(embeds.dtype) * (fused - embeds)
        return torch.where((image_cols | fuse_cols)[..., None], fused, embeds)

    def meta(self) -> dict:
        c = self.compressor
        return {"method": "llavamini", "c": c.c, "width": c.width, "heads": c.heads, "local": c.local,
                "prefusion_layers": self.n_prefusion, "train_projector": self.train_projector,
                "grid": list(self.grid) if self.grid else None, "encoder": self.encoder, "llm_hidden": self.llm_hidden,
                "gate": self.use_gate}


def build_module(model, keep: float, heads: int = 8, local: bool = True, prefusion_layers: int = 4,
                 train_projector: bool = True, gate: bool = True) -> MiniModule:
    """Step-0 module for a model whose adapter exposes the projector, decoder-layer and vision sites (the LLaVA-1.5
    family; bound: pre-fusion = copies of the LLM's first layers). The model is reached through its sites only."""
    from ..registry import adapter_classes, sites_of

    sites = sites_of(model)
    missing = [s for s in FUSION_SITES if s not in sites.sites]
    if missing:
        fits = [name for name, a in adapter_classes().items() if all(s in a.sites for s in FUSION_SITES)]
        raise IncompatibleError(f"the trained LLaVA-Mini adapter needs a model whose grids feed the projector "
                                f"({', '.join(fits)}); got {type(model).__name__}, whose adapter has no "
                                f"{', '.join(missing)} site")
    facts = sites.vision_facts()
    n = getattr(model.config, "image_seq_length", None)   # the processor's grid (the reference VLM: a DINOv2 config
    side = math.isqrt(n) if n else 0                       # of 518 px fed 336 px crops, so 24x24, not 37x37)
    h, w = (side, side) if side and side * side == n else facts.grid
    m = MiniModule(facts.width, compressor_size(keep, h * w), heads, local, prefusion_layers, train_projector,
                   (h, w), facts.encoder, gate)
    m.bind(sites.decoder_layers(), sites.projector())
    return m


def save_module(module: MiniModule, path: str) -> None:
    from safetensors.torch import save_file

    from .. import __version__

    meta = {**module.meta(), "vltok": __version__}
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path,
              metadata={"vltok": json.dumps(meta)})


def load_module(path: str) -> MiniModule:
    """An unbound module with the checkpoint's compressor loaded; pre-fusion / projector load at bind()."""
    from safetensors.torch import load_file

    meta = checkpoint_meta(path)
    if meta.get("method") != "llavamini":
        raise ValueError(f"{path} is not a vltok llavamini checkpoint (no vltok metadata with method 'llavamini')")
    m = MiniModule(meta["width"], meta["c"], meta["heads"], meta["local"], meta["prefusion_layers"],
                   meta["train_projector"], meta.get("grid"), meta.get("encoder", ""), meta.get("gate", False))
    sd = load_file(path)
    m.compressor.load_state_dict({k[len("compressor."):]: v for k, v in sd.items() if k.startswith("compressor.")})
    m._pending = sd
    m.llm_hidden = meta.get("llm_hidden")
    return m.eval()


FUSION_SITES = ("projector", "llm", "decoder_layers")
FUSION_REASON = ("brings LLM-input fusion layers (trained LLaVA-Mini), which vltok's {family} adapter cannot run "
                 "(LLaVA-1.5 only); use a training-free mode (mode='pool')")


class MiniTrainedReducer(GridReducer):
    """Pre-LLM stage of the trained mode: C x C compressed tokens per grid, a trained projector (optional) and the
    pre-fusion, which :meth:`install` runs on the LLM input."""

    def __init__(self, keep: float, module: MiniModule):
        self.keep, self.module = keep, module

    @property
    def projector(self):
        return self.module.projector

    def plan(self, h: int, w: int) -> GridPlan:
        c = self.module.c
        if c * c >= h * w:
            raise IncompatibleError(f"llavamini: C={c} gives {c * c} tokens for a {h}x{w} grid: nothing to compress")
        return GridPlan(h, w, c * c, (c, c))

    def reduce(self, x: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        return self.module.compressor(x, plan.h, plan.w)

    def needed_sites(self) -> dict[str, str]:
        out = super().needed_sites()
        for s in FUSION_SITES:
            out.setdefault(s, FUSION_REASON)
        return out

    def install(self, sites, undo: list) -> None:
        """LLM-input fusion: bind the pre-fusion (copies of the LLM's first layers, and of the projector when it is
        trained), run the trained projector in place of the model's, keep each image call's full grid (a pre-hook
        on the projector, installed before the adapter's reduction) and, at prefill, replace the LLM's
        ``inputs_embeds`` by ``module.fuse(embeds, per-sample projected full visual tokens, image columns, columns
        to fuse, rope)``; columns to fuse = real tokens that are neither answers (labels != -100) nor generated.
        Decode steps (filled cache) pass through."""
        module, stock, lm, rotary = self.module, sites.projector(), sites.llm(), sites.rotary()
        facts = sites.vision_facts()
        if (facts is not None and facts.prefix) or rotary is None:
            raise IncompatibleError("LLM-input fusion needs vision_feature_select_strategy='default' (no CLS token in "
                                    "the grid) and an LLM with a rotary_emb module (Llama-style)")
        module.bind(sites.decoder_layers(), stock)
        super().install(sites, undo)   # the trained projector (bound above), if any
        img_id = sites.image_token_id()
        state = {"visual": None}

        def keep_grid(mod, args, kwargs):   # the full grid of this image call (before the reduction)
            state["visual"] = args[0] if args else kwargs["image_features"]

        def lm_pre_hook(mod, args, kwargs):
            emb, vis = kwargs.get("inputs_embeds"), state["visual"]
            call = sites.current_call()
            ids, labels = call.input_ids, call.labels
            if ids is None and call.images:
                raise IncompatibleError("llavamini's LLM-input fusion reads the image and answer columns from "
                                        "input_ids; pass input_ids instead of inputs_embeds")
            if emb is None or vis is None or ids is None or sites.past_length(kwargs) > 0:
                return None   # no image call, or a decode step (fusion ran at prefill)
            if ids.shape[1] != emb.shape[1]:
                raise IncompatibleError("LLM-input fusion needs the whole prompt in one prefill; chunked prefill "
                                        "(prefill_chunk_size) is not supported")
            image_cols = ids.to(emb.device) == img_id
            per_row = image_cols.sum(1).tolist()
            if not sum(per_row):
                return None
            per_image, rem = divmod(sum(per_row), vis.shape[0])
            if rem or any(n % max(per_image, 1) for n in per_row):
                raise IncompatibleError(f"LLM-input fusion: {sum(per_row)} image columns for {vis.shape[0]} images")
            t0 = time.perf_counter()
            hv = stock.forward(vis)   # the stock projector, or the method's (installed as its forward)
            visual = [g.flatten(0, 1) for g in hv.to(emb.dtype).split([n // per_image for n in per_row])]
            am = kwargs.get("attention_mask")
            fuse = am.to(emb.device).bool() if am is not None and am.dim() == 2 else torch.ones_like(image_cols)
            fuse = fuse[:, -emb.shape[1]:] & ~image_cols
            if labels is not None and labels.shape == ids.shape:
                fuse &= labels.to(emb.device) == -100
            if call.prompt is not None:
                fuse[:, call.prompt:] = False
            new = module.fuse(emb, visual, image_cols, fuse, rotary)
            sites.record.seconds(time.perf_counter() - t0)
            return args, {**kwargs, "inputs_embeds": new}

        hooks = [stock.register_forward_pre_hook(keep_grid, with_kwargs=True),
                 lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True)]
        undo.extend(h.remove for h in hooks)
        undo.append(lambda: state.update(visual=None))


def trained_reducer(keep: float, weights) -> MiniTrainedReducer:
    """``weights``: a :class:`MiniModule` or a checkpoint path; its C must be the one keep gives on its grid."""
    if isinstance(weights, str):
        module = load_module(weights)
    elif isinstance(weights, MiniModule):
        module = weights
    else:
        raise ValueError("llavamini: mode='trained' needs weights= a checkpoint path (vltok train llavamini ...) "
                         "or a MiniModule")
    if module.grid is not None:
        h, w = module.grid
        want = compressor_size(keep, h * w)
        if want != module.c:
            raise ValueError(f"llavamini: the weights have C={module.c} ({module.c ** 2} tokens, keep "
                             f"{module.c ** 2 / (h * w):.4g} on {h}x{w}), but keep={keep} gives C={want}; pass "
                             f"keep={module.c ** 2 / (h * w):.4g} or weights trained for this keep")
    return MiniTrainedReducer(keep, module)
