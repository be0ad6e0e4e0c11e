"""Can the video reference VLM's language model see which word a frame shows? A probe on what the LM receives.

    python -P -m vltok.eval.tools.video_word_probe [--delta DELTA] [--n 1000] [--scale 7] [--out probe.json]

For ``--n`` training-split ``word`` scenes (shapes_video, seeds 50000...), the middle frame goes through the video
reference's tower, 2 x 2 pooling and trained projector (``model.model.get_video_features``: the 144 vectors per
frame that replace the ``<video>`` tokens). A small attention-pooling probe (4 learned queries over the 144 vectors,
then a linear layer; Adam, full batch) is fitted on the first 75 % and scored on the rest: its held-out accuracy
says whether the word identity is in the LM's input at all (chance 1/8). ``--scale`` redraws every word with that
many pixels per font cell (generator v3 draws 6 or 7, v2 drew 4 or 5): the same probe at a larger size says whether
resolution is what limits it. CPU is enough (~0.15 s a frame).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vltok import reference_video as RV
from vltok.eval import shapes_video as S


def features(model, n: int, scale: int | None = None, offset: int = 50000) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, 144, D] projector outputs of the middle frame, [n] word index) for n training ``word`` scenes."""
    words = S.TARGETS["word"]
    xs, ys = [], []
    with torch.no_grad():
        for i in range(n):
            scene, q = S.train_sample(offset + i, types=("word",))
            if scale:
                scene = dict(scene, objects=[dict(o, scale=scale) if S.is_text(o) else o for o in scene["objects"]])
            middle = S.render_frame(scene, scene["n_frames"] // 2)
            px = RV.frames_to_pixels([middle])[None].to(model.device, model.dtype)
            out = model.model.get_video_features(px)   # positional: the keyword was renamed across versions
            f = getattr(out, "pooler_output", out)
            f = f[0] if isinstance(f, (list, tuple)) else f
            xs.append(f.reshape(-1, f.shape[-1]).float().cpu())
            ys.append(words.index(q["answer"]))
    return torch.stack(xs), torch.tensor(ys)


def attention_probe(x: torch.Tensor, y: torch.Tensor, n_fit: int, classes: int, heads: int = 4, steps: int = 600,
                    lr: float = 3e-3, seed: int = 0) -> tuple[float, float]:
    """Fit the probe on x[:n_fit] (standardised per channel with the fitted part's statistics); (fit, held-out)
    accuracy."""
    g = torch.Generator().manual_seed(seed)
    flat = x[:n_fit].reshape(-1, x.shape[-1])
    x = (x - flat.mean(0)) / (flat.std(0) + 1e-5)
    d = x.shape[-1]
    q = (0.02 * torch.randn(heads, d, generator=g)).requires_grad_()
    w = torch.zeros(heads * d, classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([q, w, b], lr=lr)

    def logits(z):
        a = torch.softmax(z @ q.T / d ** 0.5, dim=1)                      # [B, T, heads]
        return torch.einsum("bth,btd->bhd", a, z).reshape(len(z), -1) @ w + b

    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(logits(x[:n_fit]), y[:n_fit]) + 1e-4 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fit = (logits(x[:n_fit]).argmax(1) == y[:n_fit]).float().mean().item()
        held = (logits(x[n_fit:]).argmax(1) == y[n_fit:]).float().mean().item() if n_fit < len(x) else float("nan")
    return fit, held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", default=None, help="video delta (default: the committed one)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--scale", type=int, default=None, help="redraw the words at this many px per font cell")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=None, help="JSON file for the result")
    args = ap.parse_args(argv)
    if args.n < 8:
        ap.error("--n must be at least 8 (a quarter is held out)")
    t0 = time.time()
    model, _ = RV.load(device="cpu", dtype=torch.float32, delta=args.delta if args.delta else True)
    model.eval()
    x, y = features(model, args.n, args.scale)
    n_fit = int(0.75 * args.n)
    fit, held = attention_probe(x, y, n_fit, len(S.TARGETS["word"]), steps=args.steps)
    res = {"n": args.n, "n_fit": n_fit, "scale": args.scale or f"generator's {S.TEXT_SCALES}", "fit_acc": fit,
           "held_out_acc": held, "chance": 1 / len(S.TARGETS["word"]), "seconds": round(time.time() - t0, 1),
           "delta": args.delta or "committed"}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
