"""Train the reference VLM's delta: the LLaVA projector, LoRA on every LM linear, and the last DINOv2 layers that
feed the selected feature layer. Data is generated on the fly from the ``train`` split of shapes (never ``test``).

    python -m vltok.train_reference --device cuda --steps 1400 --out assets/vltok-ref-delta.safetensors

The committed delta was trained in three time-capped segments, each resuming from the last (``--resume``,
``--data-offset``); eval/results/archive/README.md has the exact commands and the accuracy after each.
Everything is seeded: scene ``i`` of step ``s`` is train seed ``offset + s * batch + i``, and LoRA / projector init use
``--seed``. (GPU kernels are not bit-deterministic, so a rerun matches to rounding, not bit for bit.)
The delta holds ``projector.*`` (fp32), ``lora.<LM linear>.A/.B`` (fp16; merged into the weights at load) and
``vision.<hub Dinov2 key>`` (fp16); see :func:`vltok.reference.apply_delta`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from functools import partial
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vltok import reference as R

from vltok.eval import runner, shapes

RECIPES = {
    # (a) produced the first delta (run 1); (b) was tried second and scored lower (run 2). Both put the questions
    # of an image in one chat as consecutive turns. (c) puts them side by side as independent first turns that share
    # the image prefix ("fanout", see FanoutSet), so every answer is supervised exactly as it is asked at test time.
    "a": {"warmup": 100, "max_q": 6, "schedule": "cosine", "standardize": False, "proj_out_scale": 1.0,
          "lm_bf16": False, "layout": "turns"},
    "b": {"warmup": 50, "max_q": 8, "schedule": "flat", "standardize": True, "proj_out_scale": 0.3,
          "lm_bf16": True, "layout": "turns"},
    "c": {"warmup": 30, "min_q": 4, "max_q": 10, "schedule": "flat", "standardize": False, "proj_out_scale": 1.0,
          "lm_bf16": False, "layout": "fanout"},
}
TYPE_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 2.0, "exist": 1.0, "position": 1.5, "relation": 1.5,
                "located_attribute": 1.5, "grounding": 2.0, "text": 2.5}


# ---------------------------------------------------------------------------------------------------------------
# LoRA (hand-written: y = W x + scale * B A x)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale


def add_lora(lm: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear of ``lm`` (the decoder, not lm_head) in place; returns name -> LoRALinear."""
    wrapped = {}
    for name, mod in list(lm.named_modules()):
        if isinstance(mod, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            lora = LoRALinear(mod, rank, alpha).to(mod.weight.device)
            setattr(parent, child, lora)
            wrapped[name] = lora
    return wrapped


class Standardize:
    """Forward pre-hook on the projector: (x - mean) / std per channel of the selected vision features, which
    conditions the projector's optimisation. :func:`fold_standardize` folds it into ``linear_1`` (a stock model)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def __call__(self, module, args):
        x = args[0]
        return ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype),) + tuple(args[1:])


@torch.no_grad()
def feature_stats(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean / std of the projector's input over some images."""
    seen = []
    h = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].float()))
    try:
        model.model.get_image_features(pixel_values=pixel_values)
    finally:
        h.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    return x.mean(0), x.std(0).clamp_min(1e-3)


@torch.no_grad()
def fold_standardize(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights of ``linear`` applied after standardisation, as one stock linear on the raw features."""
    w = linear.weight.float() / std.to(linear.weight.device)[None, :]
    b = linear.bias.float() - w @ mean.to(linear.weight.device)
    return {"weight": w, "bias": b}


def vision_layers_to_train(model, n: int) -> list[int]:
    """The last ``n`` DINOv2 layers whose output reaches hidden_states[vision_feature_layer]."""
    n_layers = model.config.vision_config.num_hidden_layers
    vfl = model.config.vision_feature_layer
    top = (vfl % (n_layers + 1)) - 1  # hidden_states[k] is the output of layer k-1
    return list(range(max(0, top - n + 1), top + 1))


# ---------------------------------------------------------------------------------------------------------------
# data


class Encoder:
    """Turns (image, [records]) into input ids / labels / pixel values exactly as the processor would."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = processor.image_token_id
        self.end = "<|im_end|>"

    def text(self, qs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        text, spans = "", []
        for i, q in enumerate(qs):
            text += "<|im_start|>user\n" + ("<image>\n" if i == 0 else "") + q["question"] + self.end + "\n"
            text += "<|im_start|>assistant\n"
            start = len(text)
            text += q["answer"] + self.end
            spans.append((start, len(text)))
            text += "\n"
        return text, spans

    def __call__(self, image, qs):
        text, spans = self.text(qs)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == self.image_id:
                ids.extend([self.image_id] * R.NUM_IMAGE_TOKENS)
                labels.extend([-100] * R.NUM_IMAGE_TOKENS)
                continue
            ids.append(tid)
            labels.append(tid if any(s <= a and b <= e and b > a for s, e in spans) else -100)
        pix = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return torch.tensor(ids), torch.tensor(labels), pix


class TrainSet(torch.utils.data.Dataset):
    """Index i -> train scene ``offset + i`` with 1-6 questions; types drawn with TYPE_WEIGHTS."""

    def __init__(self, processor, n: int, offset: int = 0, max_q: int = 6, min_q: int = 1):
        self.enc = Encoder(processor)
        self.n, self.offset, self.max_q, self.min_q = n, offset, max_q, min_q

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image, qs = shapes.train_sample(self.offset + i, "train", (self.min_q, self.max_q), TYPE_WEIGHTS)
        ids, labels, pix = self.enc(image, qs)
        return ids, labels, pix, [q["type"] for q in qs]


class FanoutSet(TrainSet):
    """Like :class:`TrainSet`, but the 1..max_q questions of an image become independent single-turn branches after
    ONE shared prefix (chat header + image tokens). Branch k holds ``\n<question><|im_end|>\n<|im_start|>assistant
    \n<answer><|im_end|>``, its positions continue from the prefix (as if it were the only question) and it sees the
    prefix and itself only (:func:`collate_fanout` builds the mask). Item: ids, labels, pix, types, segment ids
    (0 = prefix, k = branch k), position ids."""

    def __getitem__(self, i):
        image, qs = shapes.train_sample(self.offset + i, "train", (self.min_q, self.max_q), TYPE_WEIGHTS)
        ids, labels, pix = None, [], None
        segs, pos = [], []
        for k, q in enumerate(qs, 1):
            x, y, px = self.enc(image, [q])
            img_end = int((x == self.enc.image_id).nonzero().max()) + 1
            if ids is None:
                ids, labels, pix = [x[:img_end]], [y[:img_end]], px
                segs.append(torch.zeros(img_end, dtype=torch.long))
                pos.append(torch.arange(img_end))
            elif not torch.equal(x[:img_end], ids[0]):
                raise AssertionError("questions of one image must share the tokens up to the image's end")
            ids.append(x[img_end:])
            labels.append(y[img_end:])
            segs.append(torch.full((len(x) - img_end,), k, dtype=torch.long))
            pos.append(torch.arange(img_end, len(x)))
        return torch.cat(ids), torch.cat(labels), pix, [q["type"] for q in qs], torch.cat(segs), torch.cat(pos)


def fanout_mask(segs: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, L) segment ids (0 = shared prefix, k > 0 = branch k, -1 = padding) -> (B, 1, L, L) attention mask:
    query i sees key j <= i when j is in the prefix or in i's own branch; a padding row sees itself only.
    Boolean (True = attend) when ``dtype`` is None, else additive (0 / dtype's min) in ``dtype``."""
    n = segs.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segs.device).tril()
    qs, ks = segs[:, :, None], segs[:, None, :]
    allow = causal & ((ks == 0) | (ks == qs)) & (qs >= 0) & (ks >= 0)
    allow |= torch.eye(n, dtype=torch.bool, device=segs.device)
    allow = allow[:, None]
    if dtype is None:
        return allow
    return torch.zeros(allow.shape, dtype=dtype, device=segs.device).masked_fill(~allow, torch.finfo(dtype).min)


def setup_run(seed: int, device: str, bf16: bool | None) -> tuple[torch.device, bool]:
    """Seed torch and random, allow TF32 on CUDA; bf16 defaults to on for CUDA. Returns (device, bf16)."""
    torch.manual_seed(seed)
    random.seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, (bf16 if bf16 is not None else dev.type == "cuda")


def collate_fanout(batch, pad_id: int):
    """Right-padded batch of :class:`FanoutSet` items: ids, labels, segment ids (-1 on padding), position ids,
    pixel values, types."""
    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    segs = torch.full((len(batch), n), -1, dtype=torch.long)
    pos = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y, _, _, sg, ps) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], segs[i, :len(x)], pos[i, :len(x)] = x, y, sg, ps
    return ids, labels, segs, pos, torch.stack([b[2] for b in batch]), [b[3] for b in batch]


def collate(batch, pad_id: int):
    n = max(len(b[0]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y, _, _) in enumerate(batch):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    return ids, labels, mask, torch.stack([b[2] for b in batch]), [b[3] for b in batch]


# ---------------------------------------------------------------------------------------------------------------
# training


def answer_accuracy(pred_ok: torch.Tensor, labels: torch.Tensor, types: list[list[str]]) -> dict[str, list[int]]:
    """Teacher-forced exact match per answer: all tokens of an answer span predicted right."""
    out: dict[str, list[int]] = {}
    lab = labels[:, 1:]
    for b in range(lab.shape[0]):
        pos = (lab[b] != -100).nonzero().flatten().tolist()
        spans, cur = [], []
        for p in pos:
            if cur and p != cur[-1] + 1:
                spans.append(cur)
                cur = []
            cur.append(p)
        if cur:
            spans.append(cur)
        for t, sp in zip(types[b], spans):
            out.setdefault(t, []).append(int(bool(pred_ok[b, sp].all())))
    return out


def train_loop(model, loader, opt, *, prepare, steps: int, batch_size: int, warmup: int, schedule: str, bf16: bool,
               device: torch.device, log, log_every: int, max_minutes: float | None = None,
               cap_start: float | None = None, rate_key: str = "images_per_s",
               digits: tuple[int | None, int | None, int] = (None, None, 4)) -> tuple[int, int | None, float]:
    """The training step of both reference VLMs (this module's image delta and :mod:`vltok.train_reference_video`):
    per batch, the LR schedule (linear warm-up, then ``schedule`` "cosine" from 1 to 0.1 or "flat" with a linear
    drop to 0.1 over the last quarter; with ``max_minutes`` the schedule follows the clock when that is further
    along), the LLaVA model's inner forward under bf16 autocast, cross-entropy on the answer tokens only, clipped
    AdamW step, and every ``log_every`` steps one JSON line of window means (loss, token accuracy, teacher-forced
    answer accuracy per type) to ``log`` and stdout.

    ``prepare(batch)`` returns ``(inputs, labels, types, extra)``: the keyword arguments of ``model.model``, the
    labels (-100 off the answers), the question types per sample and extra fields for the log record. The time cap
    counts from ``cap_start`` (default: the loop's start). ``digits`` rounds loss / token_acc / answer_acc in the log
    (None: unrounded). Returns (last step, step of an early stop or None, training seconds)."""
    inner = model.model
    params = [p for g in opt.param_groups for p in g["params"]]
    base_lrs = [g["lr"] for g in opt.param_groups]
    win = {"loss": [], "tok": [], "types": {}}
    t_train = time.time()
    cap_start = t_train if cap_start is None else cap_start
    step, stopped_early = 0, None

    def rnd(x, d):
        return x if d is None else round(x, d)

    for step, batch in enumerate(loader, 1):
        inputs, labels, types, extra = prepare(batch)
        frac = step / steps
        if max_minutes is not None:  # a time-capped run still reaches the end of its schedule
            budget = 60 * max_minutes - (t_train - cap_start)
            frac = max(frac, (time.time() - t_train) / max(1.0, budget))
        warm = min(1.0, step / max(1, warmup))
        if schedule == "cosine":  # cosine from 1 to 0.1
            decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        else:  # constant, then linear to 0.1 over the last quarter
            decay = 1.0 - 0.9 * max(0.0, frac - 0.75) / 0.25
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * warm * decay
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = inner(**inputs).last_hidden_state
            tgt = labels[:, 1:]
            sel = tgt != -100
            logits = model.lm_head(hidden[:, :-1][sel]).float()
        loss = F.cross_entropy(logits, tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            ok_flat = logits.argmax(-1) == tgt[sel]
            ok = torch.zeros_like(tgt, dtype=torch.bool)
            ok[sel] = ok_flat
            win["loss"].append(loss.item())
            win["tok"].append(ok_flat.float().mean().item())
            for t, v in answer_accuracy(ok.cpu(), labels.cpu(), types).items():
                win["types"].setdefault(t, []).extend(v)
        if step % log_every == 0 or step == steps:
            el = time.time() - t_train
            rec = {"step": step, **extra, "loss": rnd(sum(win["loss"]) / len(win["loss"]), digits[0]),
                   "token_acc": rnd(sum(win["tok"]) / len(win["tok"]), digits[1]),
                   "answer_acc": {t: round(sum(v) / len(v), digits[2]) for t, v in sorted(win["types"].items())},
                   "lr": opt.param_groups[1]["lr"], "elapsed_s": round(el, 1),
                   rate_key: round(step * batch_size / el, 1)}
            if device.type == "cuda":
                rec["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            win = {"loss": [], "tok": [], "types": {}}
        if max_minutes is not None and time.time() - cap_start > 60 * max_minutes:
            stopped_early = step
            break
        if step >= steps:
            break
    return step, stopped_early, time.time() - t_train


def save_delta(model, loras: dict[str, LoRALinear], vision_layers: list[int], path: Path, meta: dict,
               standardize: Standardize | None = None) -> int:
    from safetensors.torch import save_file

    inner = model.model
    tensors = {f"projector.{k}": v.detach().float().cpu().contiguous()
               for k, v in inner.multi_modal_projector.state_dict().items()}
    if standardize is not None:
        for k, v in fold_standardize(inner.multi_modal_projector.linear_1, standardize.mean, standardize.std).items():
            tensors[f"projector.linear_1.{k}"] = v.cpu().contiguous()
    for name, l in loras.items():
        tensors[f"lora.{name}.A"] = l.A.detach().half().cpu().contiguous()
        tensors[f"lora.{name}.B"] = l.B.detach().half().cpu().contiguous()
    inv = {v: k for k, v in R.dinov2_key_map(inner.vision_tower).items()}
    for k, v in inner.vision_tower.state_dict().items():
        if any(k.startswith(f"encoder.layer.{i}.") for i in vision_layers):
            tensors[f"vision.{inv[k]}"] = v.detach().half().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path.stat().st_size


def load_trainable(model, loras: dict[str, LoRALinear], path) -> int:
    """Copy a saved delta's projector, LoRA A/B (unmerged) and vision weights into a model being trained."""
    from safetensors import safe_open

    inner = model.model
    proj = inner.multi_modal_projector.state_dict()
    vis_map = R.dinov2_key_map(inner.vision_tower)
    vis = inner.vision_tower.state_dict()
    n = 0
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        meta = f.metadata() or {}
        for k in f.keys():
            kind, rest = k.split(".", 1)
            v = f.get_tensor(k)
            if kind == "projector":
                dst = proj[rest]
            elif kind == "vision":
                dst = vis[vis_map[rest]]
            elif kind == "lora":
                name, ab = rest.rsplit(".", 1)
                if name not in loras:
                    raise KeyError(f"{path}: LoRA for {name!r}, which this model does not have")
                dst = getattr(loras[name], ab)
                if dst.shape != v.shape:
                    raise ValueError(f"{path}: LoRA {name}.{ab} has shape {tuple(v.shape)}, this run "
                                     f"{tuple(dst.shape)}; resume with --rank {meta.get('lora_rank')}")
            else:
                raise KeyError(f"{path}: unknown key {k!r}")
            dst.copy_(v.to(dst.dtype))
            n += 1
    scale = float(meta.get("lora_scale", "nan"))
    if loras and abs(scale - next(iter(loras.values())).scale) > 1e-9:
        raise ValueError(f"{path} was trained with LoRA scale {scale}; pass --rank/--alpha to match it")
    return n


def _make_test(folder: str, n: int) -> None:
    tmp = Path(str(folder) + ".partial")
    shapes.generate(tmp, n=n, seed=0, split="test")
    tmp.rename(folder)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4, help="LoRA learning rate")
    ap.add_argument("--lr-projector", type=float, default=1e-3)
    ap.add_argument("--lr-vision", type=float, default=5e-5)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--vision-layers", type=int, default=3, help="last DINOv2 layers to fine-tune (0 = frozen)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="c",
                    help="a / b: the first two runs (consecutive chat turns); c: fan-out branches (see RECIPES)")
    ap.add_argument("--resume", default=None,
                    help="start from this delta (projector, LoRA A/B, vision layers) instead of a fresh init")
    ap.add_argument("--warmup", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--max-q", type=int, default=None, help="questions per training image: 1..max-q turns")
    ap.add_argument("--type-weight", action="append", default=[], metavar="TYPE=W",
                    help="sampling weight of a question type (repeatable), e.g. --type-weight count=3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-offset", type=int, default=0,
                    help="first train scene (a resumed run should continue where its parent stopped)")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="autocast (default on cuda)")
    ap.add_argument("--out", default="assets/" + R.DELTA_NAME)
    ap.add_argument("--log", default="eval/results/train_log.jsonl")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--max-minutes", type=float, default=None, help="safety stop (recorded in the log)")
    ap.add_argument("--eval-dir", default=None, help="after training: eval on this shapes folder (made if absent)")
    ap.add_argument("--eval-n", type=int, default=2268)
    ap.add_argument("--eval-json", default="eval/results/reference_full.json")
    ap.add_argument("--eval-batch", type=int, default=64)
    args = ap.parse_args(argv)
    recipe = RECIPES[args.recipe]
    for tw in args.type_weight:
        name, _, w = tw.partition("=")
        if name not in TYPE_WEIGHTS or not w:
            ap.error(f"--type-weight {tw!r}: expected TYPE=W with TYPE one of {sorted(TYPE_WEIGHTS)}")
        TYPE_WEIGHTS[name] = float(w)
    args.warmup = recipe["warmup"] if args.warmup is None else args.warmup
    args.max_q = recipe["max_q"] if args.max_q is None else args.max_q

    t_start = time.time()
    gen = None
    if args.eval_dir and not (Path(args.eval_dir) / "questions.jsonl").exists():
        # the test split is rendered on the side while the model trains (fixed seeds; the same files every time)
        import multiprocessing as mp

        gen = mp.get_context("fork").Process(target=_make_test, args=(args.eval_dir, args.eval_n))
        gen.start()
    dev, bf16 = setup_run(args.seed, args.device, args.bf16)

    model, processor = R.load(device=dev, delta=False)
    torch.manual_seed(args.seed)
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    for m in inner.multi_modal_projector.modules():  # re-init the projector from --seed
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    with torch.no_grad():  # (b) start the image tokens near the scale of SmolLM2's embeddings
        inner.multi_modal_projector.linear_2.weight.mul_(recipe["proj_out_scale"])
    if bf16 and recipe["lm_bf16"]:  # (b) the frozen LM in bf16 (speed); the rest stays fp32
        inner.language_model.to(torch.bfloat16)
    proj_params = list(inner.multi_modal_projector.parameters())
    for p in proj_params:
        p.requires_grad_(True)
    loras = add_lora(inner.language_model, args.rank, args.alpha)
    if args.resume:
        resumed = load_trainable(model, loras, args.resume)
        print(f"resumed from {args.resume}: {resumed} tensors", flush=True)
    lora_params = [p for l in loras.values() for p in (l.A, l.B)]
    vis_layers = vision_layers_to_train(model, args.vision_layers) if args.vision_layers > 0 else []
    for i in vis_layers:
        inner.vision_tower.encoder.layer[i].float()
    vis_params = [p for i in vis_layers for p in inner.vision_tower.encoder.layer[i].parameters()]
    for p in vis_params:
        p.requires_grad_(True)
    groups = [{"params": proj_params, "lr": args.lr_projector}, {"params": lora_params, "lr": args.lr}]
    if vis_params:
        groups.append({"params": vis_params, "lr": args.lr_vision})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98), fused=dev.type == "cuda")
    n_train = sum(p.numel() for g in groups for p in g["params"])
    print(f"trainable params: {n_train / 1e6:.2f} M (projector {sum(p.numel() for p in proj_params)}, "
          f"LoRA r={args.rank} on {len(loras)} linears, vision layers {vis_layers})", flush=True)

    fanout = recipe["layout"] == "fanout"
    data = (FanoutSet if fanout else TrainSet)(processor, args.steps * args.batch_size, offset=args.data_offset,
                                               max_q=args.max_q, min_q=min(args.max_q, recipe.get("min_q", 1)))
    std_hook = None
    if recipe["standardize"]:  # (b) per-channel feature standardisation before the projector (held-apart seeds)
        stats_set = TrainSet(processor, 64, offset=10**8, max_q=1)
        stats_pix = torch.stack([stats_set[i][2] for i in range(min(64, args.batch_size))]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            std_hook = Standardize(*feature_stats(model, stats_pix))
        inner.multi_modal_projector.register_forward_pre_hook(std_hook)
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        collate_fn=partial(collate_fanout if fanout else collate, pad_id=pad_id), pin_memory=dev.type == "cuda",
        drop_last=True,
        persistent_workers=False, prefetch_factor=4 if args.workers else None)

    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    config = {k: v for k, v in vars(args).items()}
    config.update(type_weights=dict(TYPE_WEIGHTS), torch=torch.__version__,
                  device_name=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                  trainable_params=n_train, vision_layers_trained=vis_layers,
                  vision_feature_layer=model.config.vision_feature_layer)
    import transformers

    config["transformers"] = transformers.__version__
    log.write(json.dumps({"config": config}) + "\n")
    model.train()
    sdpa = getattr(model.config.text_config, "_attn_implementation", None) == "sdpa"

    def prepare(batch):
        if fanout:
            ids, labels, segs, pos, pix, types = batch
            segs, pos = segs.to(dev, non_blocking=True), pos.to(dev, non_blocking=True)
            mask = fanout_mask(segs, None if sdpa else torch.float32)
        else:
            ids, labels, mask, pix, types = batch
            pos = None
            mask = mask.to(dev)
        ids, labels = ids.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        pix = pix.to(dev, non_blocking=True)
        return dict(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=pos), labels, types, {}

    # (a) cosine schedule; (b) / (c) flat
    step, stopped_early, train_s = train_loop(
        model, loader, opt, prepare=prepare, steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
        schedule=recipe["schedule"], bf16=bf16, device=dev, log=log, log_every=args.log_every,
        max_minutes=args.max_minutes, cap_start=t_start)
    meta = {"format": "vltok-ref-delta/1", "lora_scale": args.alpha / args.rank, "lora_rank": args.rank,
            "vision_feature_layer": model.config.vision_feature_layer, "steps": step, "seed": args.seed,
            "batch_size": args.batch_size, "vision_layers": ",".join(map(str, vis_layers)),
            "recipe": args.recipe, "resumed_from": args.resume or "", "data_offset": args.data_offset}
    size = save_delta(model, loras, vis_layers, Path(args.out), meta, standardize=std_hook)
    done = {"done": True, "steps": step, "stopped_early_at": stopped_early, "train_seconds": round(train_s, 1),
            "delta_bytes": size, "delta": str(args.out)}
    log.write(json.dumps(done) + "\n")
    log.close()
    print(json.dumps(done), flush=True)

    if args.eval_dir:
        del model, opt, loras
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ed = Path(args.eval_dir)
        if gen is not None:
            gen.join()
            if gen.exitcode != 0:
                raise RuntimeError(f"generating the test split into {ed} failed")
        model, processor = R.load(device=dev, delta=args.out)  # exactly what users load (merged, fp32)
        res = runner.evaluate(model, processor, ed, batch_size=args.eval_batch, progress=False)
        res["training"] = {"steps": step, "train_seconds": round(train_s, 1), "total_seconds":
                           round(time.time() - t_start, 1), "command": "python -m vltok.train_reference " +
                           " ".join(argv if argv is not None else sys.argv[1:])}
        runner.write(res, args.eval_json)
        print(runner.markdown([res]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
