"""One small trainer for the learned variants: ``vltok train <method> ...``.

The model (any LLaVA-family ``LlavaForConditionalGeneration``) is frozen; the method's learned module is built at
its step-0 initialisation, the model is patched with it, and only the module trains on the LM loss of the
answer tokens (``labels``), through the patched ``forward`` (placeholder runs and labels shrink as at inference).

Learned variants (``LEARNED``):

* ``tokenshuffle``: the shuffle projector (vltok/methods/tokenshuffle.py), initialised from the model's
  Linear-act-Linear projector so that step 0 equals training-free pool-then-project.
* ``crossget``: the learned cross token's per-layer offsets (zero-initialised: step 0 equals the training-free
  CLS-guided mode when ``visible=False``) and, unless ``projector=False``, a trained copy of the model's projector
  (vltok/methods/crossget.py; no JS loss and a frozen LLM, unlike the paper).
* ``llavamini``: the LLaVA-Mini compressor (C x C queries; step 0 = C x C window mean pooling), P pre-fusion layers
  (copies of the LLM's first P layers) behind a zero-initialised gate (step 0 = ``mode="pool"``; ``gate=False``:
  the paper's direct hand-over) and, unless ``projector=False``, a copy of the projector
  (vltok/methods/llavamini_trained.py; frozen LLM, unlike the paper).

Data: ``batch_at(step) -> dict(input_ids, attention_mask, pixel_values, labels)``, deterministic by step so a resumed
run sees the same batches. :func:`shapes_batches` (the reference VLM's procedural training split, never ``test``)
and :func:`llava_json_batches` (a LLaVA-format JSON of {"image", "conversations"}) provide it.

Checkpoints: ``out/step-<n>/`` with the module (``module.safetensors``, loadable by the method) and ``state.pt``
(optimizer, step); ``out/latest`` names the newest; ``resume=True`` continues from it. ``eval_fn(model)`` (the
patched model) runs every ``eval_every`` steps and at the end; the log is ``out/log.jsonl``.

GPU commands (reference VLM, shapes): see ``vltok train --help`` and the README.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

import vltok

from . import compat, registry
from .methods.tokenshuffle import ShuffleProjector, load_projector, save_projector, window_for_keep


DEFAULT_TRAIN_KEEP = 0.25   # ``train(keep=None)`` / no --keep: this keep (tokenshuffle with a window: the window's)


# -- learned variants: (model, keep, opts) -> (module, patch kwargs, save(module, path), load(path)) ---------------
def _llava_projector(model):
    proj = getattr(getattr(model, "model", None), "multi_modal_projector", None)
    if proj is None or not all(hasattr(proj, n) for n in ("linear_1", "linear_2")):
        raise vltok.IncompatibleError(f"vltok train needs a LLaVA-family model with a Linear-act-Linear projector; "
                                      f"got {type(model).__name__}")
    return proj


def build_tokenshuffle(model, keep: float | None, window=None):
    stock = _llava_projector(model)
    if window is not None:   # the window fixes the budget: a keep must agree with it (as vltok.patch checks)
        from .api import resolve_keep

        resolve_keep("tokenshuffle", keep, window=tuple(window))
    window = tuple(window) if window else window_for_keep(DEFAULT_TRAIN_KEEP if keep is None else keep)
    act = getattr(model.config, "projector_hidden_act", "gelu")
    module = ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, act, window)
    encoder = getattr(model.config.vision_config, "_name_or_path", "") or model.config.vision_config.model_type
    return (module, dict(projector=module),
            lambda m, path: save_projector(m, path, encoder),
            lambda m, path: m.load_state_dict(load_projector(path, window).state_dict()))


def build_crossget(model, keep: float, visible: bool = False, projector: bool = True):
    from .methods.crossget import CrossTokens, load_cross_tokens, save_cross_tokens

    stock = _llava_projector(model)
    act = getattr(model.config, "projector_hidden_act", "gelu")
    proj = ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, act, (1, 1)) if projector else None
    facts = registry.sites_of(model).vision_facts()
    if facts.used_layers is None:
        raise vltok.IncompatibleError(f"vision-stage methods need one vision_feature_layer; this checkpoint has "
                                      f"vision_feature_layer={facts.feature_layer}; use a pre-LLM method (e.g. 'pool')")
    module = CrossTokens(facts.used_layers, facts.width, visible, proj, facts.encoder).to(device=stock.linear_1.weight.device,
                                                               dtype=stock.linear_1.weight.dtype)
    return (module, dict(cross_tokens=module),
            lambda m, path: save_cross_tokens(m, path, keep=keep),
            lambda m, path: m.load_state_dict(load_cross_tokens(path).state_dict()))


def build_llavamini(model, keep: float, prefusion_layers: int = 4, heads: int = 8, local: bool = True,
                    projector: bool = True, gate: bool = True):
    from .methods.llavamini_trained import build_module, load_module, save_module

    module = build_module(model, keep, heads, local, prefusion_layers, projector, gate)

    def load(m, path):
        ck = load_module(path)
        if (ck.c, ck.n_prefusion, ck.train_projector, ck.use_gate) != (m.c, m.n_prefusion, m.train_projector,
                                                                    m.use_gate):
            raise vltok.VltokError(f"{path}: checkpoint {ck.meta()} does not match the module being trained")
        m.load_state_dict(ck._pending)

    return module, dict(mode="trained", weights=module), save_module, load


LEARNED = {"tokenshuffle": build_tokenshuffle, "crossget": build_crossget, "llavamini": build_llavamini}


def train(model, method: str, keep: float | None, batch_at: Callable[[int], dict], *, steps: int, out: str | Path,
          lr: float = 1e-3, weight_decay: float = 0.0, warmup: int = 0, save_every: int = 100, eval_every: int = 0,
          eval_fn: Callable | None = None, resume: bool = False, grad_clip: float = 1.0, log=print, **opts) -> dict:
    """Train ``method``'s learned module on ``model`` (frozen); returns {"module", "losses", "evals", "path"}."""
    if method not in LEARNED:
        raise vltok.VltokError(f"method {method!r} has no trained variant in vltok train; trainable: "
                               f"{', '.join(LEARNED)}")
    family = registry.adapter_for(model).family
    if family != "llava":   # before anything is built or written
        raise vltok.IncompatibleError(
            f"vltok train {method}: the learned module replaces the projector (and, for crossget, rides in the vision "
            f"tower) of LLaVA-1.5-style models (LlavaForConditionalGeneration, any tower / LLM); vltok's {family} "
            f"adapter cannot run it ({type(model).__name__} packs, unpads or merges its grids around the projector); "
            "use the method's training-free mode on this model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if keep is None and not (method == "tokenshuffle" and opts.get("window")):
        keep = DEFAULT_TRAIN_KEEP
    module, patch_kw, save, load = LEARNED[method](model, keep, **opts)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    start = 0
    if resume and (out / "latest").exists():
        ck = out / (out / "latest").read_text().strip()
        load(module, str(ck / "module.safetensors"))
        st = torch.load(ck / "state.pt", weights_only=False)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start = st["step"]
        log(f"resumed from {ck} at step {start}")
    losses, evals = [], []
    logf = (out / "log.jsonl").open("a")

    def checkpoint(step):
        ck = out / f"step-{step}"
        ck.mkdir(exist_ok=True)
        save(module, str(ck / "module.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step}, ck / "state.pt")
        (out / "latest").write_text(ck.name)

    def run_eval(step):
        if eval_fn is None:
            return
        was = model.training
        model.eval()
        with torch.no_grad():
            res = eval_fn(model)
        model.train(was)
        evals.append({"step": step, **res})
        logf.write(json.dumps({"step": step, "eval": res}) + "\n")
        logf.flush()
        log(f"step {step}: eval {res}")

    # the learned module was built for keep (or its window) and fixes the budget itself where it does: keep not given
    fixed = registry.get(method).fixed_budget(patch_kw) is not None
    handle = vltok.patch(model, method, keep=None if fixed else keep, **patch_kw)
    try:
        if start == 0 and eval_every:
            run_eval(0)
        module.train()
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = batch_at(step)
            loss = model(**batch).loss
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            logf.write(json.dumps({"step": step + 1, "loss": losses[-1], "lr": sched.get_last_lr()[0],
                                   "seconds": time.perf_counter() - t0}) + "\n")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                checkpoint(step + 1)
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                run_eval(step + 1)
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        logf.close()
        module.eval()
    final = out / f"{method}.safetensors"
    save(module, str(final))
    return {"module": module, "losses": losses, "evals": evals, "path": final}


# -- data --------------------------------------------------------------------------------------------------------
def shapes_batches(processor, batch_size: int, device=None, offset: int = 0, workers: int = 0):
    """The reference VLM's training stream (shapes ``train`` split): step s uses scenes offset + s*batch + i.
    ``workers`` > 0 renders the next batches in that many forked processes (same batches, same order)."""
    from vltok.train_reference import TrainSet, collate

    ds = TrainSet(processor, n=1 << 62, offset=offset)
    pad = compat.tokenizer_of(processor).pad_token_id or 0

    def cpu_batch(step):
        ids, labels, mask, pix, _ = collate([ds[step * batch_size + i] for i in range(batch_size)], pad)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)

    make = Prefetched(cpu_batch, workers) if workers else cpu_batch

    def batch_at(step):
        b = make(step)
        return {k: v.to(device) for k, v in b.items()} if device is not None else b

    return batch_at


_PREFETCH: dict = {}


def _prefetch_call(step):
    return _PREFETCH["fn"](step)


def _prefetch_init():
    torch.set_num_threads(1)   # a forked child must not reuse the parent's intra-op thread pool (it can hang)


class Prefetched:
    """``fn(step)`` computed ahead in forked worker processes (at most ``2 * workers`` steps ahead) for steps
    s, s+1, ... in order; a call out of sequence restarts there. Results equal ``fn(step)`` (fn must be
    deterministic by step)."""

    def __init__(self, fn, workers: int):
        self.fn, self.workers = fn, workers
        self.pool = None
        self.pending: list = []   # [(step, AsyncResult)] in step order
        self.next = None

    def __call__(self, step: int):
        if self.pool is None or step != self.next:
            self.close()
            import multiprocessing as mp

            _PREFETCH["fn"] = self.fn
            self.pool = mp.get_context("fork").Pool(self.workers, initializer=_prefetch_init)
            self.pending, self.next = [], step
        end = self.pending[-1][0] + 1 if self.pending else step
        while len(self.pending) < 2 * self.workers:
            self.pending.append((end, self.pool.apply_async(_prefetch_call, (end,))))
            end += 1
        got, res = self.pending.pop(0)
        assert got == step
        self.next = step + 1
        return res.get()

    def close(self):
        if self.pool is None:
            return
        pool, pending = self.pool, self.pending
        self.pool, self.pending = None, []
        for _, r in pending:   # let the steps already handed out finish (at most 2 * workers, bounded wait):
            r.wait(30)         # terminating with tasks in flight can trip CPython's pool finaliser check
        try:
            pool.terminate()
        except AssertionError:   # "Cannot have cache with result_hander not alive": stop the workers directly
            for p in getattr(pool, "_pool", []):
                p.terminate()

    def __del__(self):
        self.close()


def llava_json_batches(processor, path: str, image_folder: str, batch_size: int, device=None):
    """LLaVA-format JSON ([{"image": file, "conversations": [{"from": "human"|"gpt", "value": ...}]}]): the
    processor builds each sample with the LLaVA-1.5 prompt ("USER: <image>\\n... ASSISTANT: ..."); only the
    answers are labelled. Step s uses records (s*batch + i) mod len."""
    from PIL import Image

    recs = [r for r in json.loads(Path(path).read_text()) if r.get("image")]
    if not recs:
        raise vltok.VltokError(f"{path}: no records with an image")
    tok = compat.tokenizer_of(processor)
    eos = tok.eos_token or ""

    def encode(rec):
        image = Image.open(Path(image_folder) / rec["image"]).convert("RGB")
        turns = rec["conversations"]
        first = turns[0]["value"]
        if "<image>" not in first:
            first = "<image>\n" + first
        pieces = []   # (text, labelled)
        for i, t in enumerate(turns):
            text = first if i == 0 else t["value"]
            if t["from"] == "human":
                pieces.append((("USER: " if i == 0 else " USER: ") + text + " ASSISTANT:", False))
            else:
                pieces.append((" " + text + eos, True))
        enc = processor(images=image, text=pieces[0][0], return_tensors="pt")
        ids, labels = [enc["input_ids"][0]], [torch.full_like(enc["input_ids"][0], -100)]
        for text, lab in pieces[1:]:
            t = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(t)
            labels.append(t if lab else torch.full_like(t, -100))
        return torch.cat(ids), torch.cat(labels), enc["pixel_values"][0]

    pad = tok.pad_token_id or 0

    def batch_at(step):
        items = [encode(recs[(step * batch_size + i) % len(recs)]) for i in range(batch_size)]
        n = max(len(x[0]) for x in items)
        ids = torch.full((batch_size, n), pad, dtype=torch.long)
        labels = torch.full((batch_size, n), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, n), dtype=torch.long)
        for i, (x, y, _) in enumerate(items):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
        b = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.stack([x[2] for x in items]), labels=labels)
        return {k: v.to(device) for k, v in b.items()} if device is not None else b

    return batch_at


# -- CLI: vltok train <method> ... --------------------------------------------------------------------------------
def register(sub):
    p = sub.add_parser("train", help=f"train a method's learned variant ({', '.join(sorted(LEARNED))}) on a frozen LLaVA model",
                       description="Train a learned variant. Model: 'reference' (vltok.reference.load) or a "
                       "LLaVA-family folder/hub id. Data: 'shapes' (reference VLM training split) or a LLaVA-format "
                       "JSON with --image-folder. Eval: shapes test folder every --eval-every steps.")
    p.add_argument("method", choices=sorted(LEARNED), help="the method whose learned part is trained")
    p.add_argument("--model", default="reference")
    p.add_argument("--keep", type=float, default=None,
                   help=f"the budget the module is trained for (default {DEFAULT_TRAIN_KEEP}; tokenshuffle with "
                        "--window: the window's 1/(s_h*s_w))")
    p.add_argument("--window", type=int, nargs=2, default=None, metavar=("S_H", "S_W"),
                   help="tokenshuffle: the shuffle window (default: the one --keep implies); a --keep must agree")
    p.add_argument("--cross-visible", action="store_true",
                   help="crossget: every token attends to the cross token (the paper); default: it only reads")
    p.add_argument("--no-projector", action="store_true", help="crossget: train the cross token only")
    p.add_argument("--prefusion-layers", type=int, default=4,
                   help="llavamini: pre-fusion layers (copies of the LLM's first ones); --no-projector keeps the "
                   "model's projector frozen")
    p.add_argument("--compressor-heads", type=int, default=8, help="llavamini: compressor attention heads")
    p.add_argument("--global-compressor", action="store_true",
                   help="llavamini: queries attend to the whole grid (the paper; step 0 = global mean) instead of "
                   "their C x C pooling window (step 0 = mode='pool')")
    p.add_argument("--no-gate", action="store_true",
                   help="llavamini: hand the fused rows to the LLM directly (the paper) instead of through a "
                   "zero-initialised tanh gate (step 0 = mode='pool')")
    p.add_argument("--data", default="shapes")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-data", default=None,
                   help="a shapes test folder (write one with: vltok shapes DIR)")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--workers", type=int, default=0, help="processes rendering shapes batches ahead")
    p.set_defaults(func=_cli)


def _cli(args):
    dtype = getattr(torch, args.dtype)
    if args.model == "reference":
        from vltok import reference

        model, processor = reference.load(device=args.device, dtype=dtype)
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device)
        processor = AutoProcessor.from_pretrained(args.model)
    if str(args.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.data == "shapes":
        batch_at = shapes_batches(processor, args.batch_size, args.device, workers=args.workers)
    else:
        batch_at = llava_json_batches(processor, args.data, args.image_folder, args.batch_size, args.device)
    eval_fn = None
    if args.eval_data:
        from vltok.eval import runner

        def eval_fn(m):
            r = runner.evaluate(m, processor, args.eval_data, None, limit=args.eval_limit, progress=False,
                                keep_predictions=False)
            return {"score": r["score"]}
    opts = {"window": args.window} if args.window else {}
    if args.method == "crossget":
        opts = {"visible": args.cross_visible, "projector": not args.no_projector}
    if args.method == "llavamini":
        opts = {"prefusion_layers": args.prefusion_layers, "heads": args.compressor_heads,
                "local": not args.global_compressor, "projector": not args.no_projector, "gate": not args.no_gate}
    res = train(model, args.method, args.keep, batch_at, steps=args.steps, out=args.out, lr=args.lr,
                warmup=args.warmup, save_every=args.save_every, eval_every=args.eval_every, eval_fn=eval_fn,
                resume=args.resume, **opts)
    print(json.dumps({"path": str(res["path"]), "first_loss": res["losses"][:1], "last_loss": res["losses"][-1:],
                      "evals": res["evals"]}, default=str))
    return 0
