"""Where do in-LLM pruners keep their tokens? Kept-token share per image third (top / middle / bottom rows).

FastV's last-token criterion with RoPE favours the bottom rows (closest in position to the question);
FEATHER's RoPE-free criterion plus uniform grid should not (specs/methods/feather.md §2.2). Runs the reference VLM
(``vltok.reference.load()``) on the first ``n`` items of the balanced ``shapes`` test split and reports, per method,
the share of the final kept visual tokens that lie in each third of the 24x24 grid (uniform = 1/3 each).

    python -m vltok.eval.tools.kept_regions --n 24 --keep 0.16
"""
from __future__ import annotations

import argparse
import json
import time

import torch

METHODS = (("fastv", {}), ("feather", {}))


def thirds(rows: torch.Tensor, h: int) -> list[int]:
    """Counts of raster rows in the top / middle / bottom third of an h-row grid."""
    t = (rows * 3) // h
    return [int((t == i).sum()) for i in range(3)]


def kept_shares(model, processor, items, methods=METHODS, keep=0.16):
    import vltok
    from vltok.reference import prompt

    from ..shapes import render

    out = {}
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype
    for name, kw in methods:
        counts = torch.zeros(3, dtype=torch.long)
        per_cut = {}
        n_kept, secs, flops = 0, 0.0, []
        with vltok.patched(model, name, keep=keep, **kw) as h:
            for scene, rec in items:
                inp = processor(images=[render(scene)], text=[prompt(rec["question"])], return_tensors="pt")
                inp = {k: (v.to(dev, dt) if torch.is_floating_point(v) else v.to(dev)) for k, v in inp.items()}
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(**inp)
                secs += time.perf_counter() - t0
                ids = inp["input_ids"][0].cpu()
                img = (ids == processor.image_token_id).nonzero().flatten()
                g = int(round(img.numel() ** 0.5))
                kept = torch.isin(img, h.inllm_kept_columns[0].cpu()).nonzero().flatten()   # raster indices
                counts += torch.tensor(thirds(kept // g, g))
                n_kept += kept.numel()
                for layer in h.stats["prune_layers"]:   # the set entering each cut layer
                    k = torch.isin(img, h.inllm_prefill_columns[layer][0].cpu()).nonzero().flatten()
                    per_cut.setdefault(layer, torch.zeros(3, dtype=torch.long))
                    per_cut[layer] += torch.tensor(thirds(k // g, g))
                flops.append(h.stats["flops_keep"])
        label = name if not kw else f"{name} {json.dumps(kw)}"
        out[label] = dict(share_top_mid_bottom=[round(float(c) / max(n_kept, 1), 3) for c in counts],
                         share_per_cut={l: [round(float(x) / max(int(c.sum()), 1), 3) for x in c]
                                        for l, c in per_cut.items()},
                         kept_per_image=n_kept / len(items), flops_keep=sum(flops) / len(flops),
                         prune_layers=h.stats["prune_layers"], seconds_per_forward=secs / len(items))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="items of the shapes test split")
    ap.add_argument("--keep", type=float, default=0.16)
    ap.add_argument("--delta", default="auto", help="'auto' (the trained delta if present), 'none', or a path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", action="append", default=[], metavar="NAME[=JSON]",
                    help="a method and its keywords as a JSON object, e.g. 'feather={\"s2\": 1.0}' (repeatable; "
                         "default: fastv and feather with their defaults)")
    args = ap.parse_args(argv)
    methods = METHODS
    if args.method:
        methods = []
        for spec in args.method:
            name, _, kw = spec.partition("=")
            methods.append((name, json.loads(kw) if kw else {}))
    import vltok.reference as ref

    from ..shapes import test_item

    model, processor = ref.load(device=args.device, delta={"auto": True, "none": False}.get(args.delta, args.delta))
    print("trained delta:", ref.default_delta_path() if args.delta == "auto" else args.delta, flush=True)
    items = [test_item(i) for i in range(args.n)]
    results = kept_shares(model, processor, items, methods, keep=args.keep)
    print(json.dumps(dict(n=args.n, keep=args.keep, results=results), indent=1))


if __name__ == "__main__":
    main()
