"""Train the video reference VLM's delta (``vltok-ref-video``) on one GPU, then score it on the shapes-video test
split (per type) and run the single-frame check (the same model fed only the middle frame).

    python -m vltok.train_reference_video --out runs/ref-video            # ~6-8 min on one H100 / H200

Starts from the image reference (its trained delta merged; vltok.reference_video) and trains what the image
reference's training trains minus the vision layers: the projector and LoRA on every LM linear (on top of the
merged image weights). Data are generated on the fly from the shapes-video ``train`` split (never ``test``), frames
rendered in memory (no video codec, so PyAV is not needed). Each batch has one frame count: mostly 16 (the model's
default), some 8 and 4, so the frames x tokens trade-off tables compare frame counts the model has seen; never 1.
Everything is seeded (train item ``i`` is train seed ``--data-offset + i``); GPU kernels are not bit-deterministic.

Writes into ``--out``: ``vltok-ref-video-delta.safetensors`` (projector fp32, LoRA A/B fp16; merged at load by
vltok.reference.apply_delta), ``train_log.jsonl``, ``results.json`` / ``results.md`` (test accuracy per type with
16 frames and with the middle frame only, the best held-out guess from one middle-frame cue without a model
(``shapes_video.single_frame_baseline``), chance per type, and the single-frame verdict). ``--max-minutes`` caps the training loop (the LR schedule
then follows the clock); the whole run including model conversion, data and evaluation stays within ~8 minutes
with the defaults. Copy the delta to ``assets/`` to make it the committed one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

from vltok import reference as R
from vltok import reference_video as RV

from vltok.eval import quality_video as Q
from vltok.eval import shapes_video as S
from .train_reference import add_lora, load_trainable, save_delta, setup_run, train_loop
from .train_reference import collate as image_collate

FRAME_MIX = ((16, 0.7), (8, 0.15), (4, 0.15))


def batch_frames(b: int, seed: int = 0) -> int:
    """Frame count of batch b (deterministic by seed): 16 mostly, else 8 or 4."""
    r = random.Random(f"frames/{seed}/{b}").random()
    acc = 0.0
    for f, p in FRAME_MIX:
        acc += p
        if r < acc:
            return f
    return FRAME_MIX[0][0]


class TrainClips(torch.utils.data.Dataset):
    """Item i -> (ids, labels, uint8 frames [T, 3, 336, 336], type) of train seed ``offset + i``; T from the batch."""

    def __init__(self, tokenizer, n: int, batch_size: int, offset: int = 0, seed: int = 0, frames: int | None = None,
                 types: tuple[str, ...] = S.TYPES):
        self.tok, self.n, self.bs, self.offset, self.seed, self.frames = tokenizer, n, batch_size, offset, seed, frames
        self.types = types

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        scene, q = S.train_sample(self.offset + i, types=self.types)
        t = self.frames or batch_frames(i // self.bs, self.seed)
        rec = {"scene": scene, "n_frames": scene["n_frames"]}
        u8 = Q._clip_pixels(rec, t, "rendered")
        ids, labels = RV.encode(self.tok, q["question"], t, q["answer"])
        return torch.tensor(ids), torch.tensor(labels), u8, q["type"]


def weighted_types(spec: str | None) -> tuple[str, ...]:
    """``"word=3,word_state=2"`` -> the question types with each repeated by its integer weight (others 1), the
    ``types`` that :func:`shapes_video.train_sample` draws from uniformly; None / "" -> ``S.TYPES`` unchanged (the
    same draws as a run without weights)."""
    if not spec:
        return S.TYPES
    weights = {}
    for part in spec.split(","):
        name, sep, w = part.strip().partition("=")
        if not sep or name not in S.TYPES or not w.isdigit() or int(w) < 1:
            raise ValueError(f"--type-weights {part.strip()!r}: write TYPE=N with N a positive integer and TYPE one "
                             f"of {', '.join(S.TYPES)}")
        weights[name] = int(w)
    return tuple(t for t in S.TYPES for _ in range(weights.get(t, 1)))


def collate(batch, pad_id: int):
    """The image training's collate; each sample's type as a one-element list (the per-type accuracy of the log)."""
    *tensors, types = image_collate(batch, pad_id)
    return (*tensors, [[t] for t in types])


def test_records(n: int, seed: int = 0) -> list[dict]:
    """The first n items of the balanced test split as records (scene descriptions; no files)."""
    out = []
    for i in range(n):
        scene, q = S.test_item(i, seed)
        out.append({"id": f"test-{seed}-{i:06d}", "question": q["question"], "answer": q["answer"], "type": q["type"],
                    "span": q["span"], "n_frames": scene["n_frames"], "scene": scene})
    return out


def results_markdown(res: dict) -> str:
    types = list(S.TYPES)
    lines = ["| input | overall | temporal | single-frame types | " + " | ".join(types) + " |",
             "|" + "---|" * (len(types) + 4)]
    for key, label in (("clip", f"{res['frames']} frames"), ("single_frame", "middle frame only")):
        s = res[key]
        lines.append(f"| {label} | {100 * s['overall']:.1f} | {100 * s['temporal']:.1f} | "
                     f"{100 * s['single_frame_types']:.1f} | " +
                     " | ".join(f"{100 * s['by_type'][t]['acc']:.1f}" for t in types) + " |")
    cues = res.get("single_frame_cues")
    if cues:
        lines.append("| middle frame, best cue, no model | | | | " +
                     " | ".join(f"{100 * cues[t]['acc']:.0f}" if t in cues else "-" for t in types) + " |")
    lines.append("| chance | | | | " + " | ".join(f"{100 * S.chance(t):.0f}" for t in types) + " |")
    lines += ["", single_frame_verdict(res["single_frame"])]
    return "\n".join(lines) + "\n"


SINGLE_FRAME_MARGIN = 0.15


def single_frame_verdict(score: dict, margin: float = SINGLE_FRAME_MARGIN) -> str:
    """One line: the temporal types the model answers from the middle frame alone above chance + the larger of
    ``margin`` and 2.5 binomial standard errors (n per type is small: 40 gives 8 points at chance 50 %)."""
    over = []
    for t in S.TEMPORAL:
        if t not in score["by_type"]:
            continue
        acc, n, c = score["by_type"][t]["acc"], score["by_type"][t]["n"], S.chance(t)
        if acc > c + max(margin, 2.5 * (c * (1 - c) / n) ** 0.5):
            over.append(f"{t} {100 * acc:.0f} % (chance {100 * c:.0f}, n {n})")
    rule = f"chance + max({100 * margin:.0f} points, 2.5 standard errors)"
    if over:
        return f"Single-frame check: FAILS on {', '.join(over)}: above {rule} from the middle frame alone."
    return f"Single-frame check: every temporal type within {rule} from the middle frame alone."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (delta, log, results)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4, help="LoRA learning rate")
    ap.add_argument("--lr-projector", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--frames", type=int, default=None, help="one frame count for every batch (default: FRAME_MIX)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-offset", type=int, default=0,
                    help="first train item (a --resume run continues where its parent stopped: steps x batch size)")
    ap.add_argument("--resume", metavar="DELTA", type=Path, default=None,
                    help="start from this saved video delta (projector + LoRA) instead of the fresh init: training "
                    "in time-capped segments")
    ap.add_argument("--type-weights", default=None, metavar="TYPE=N,...",
                    help="integer sampling weights per question type (others 1), e.g. word=3")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="autocast (default on cuda)")
    ap.add_argument("--max-minutes", type=float, default=4.5, help="cap on the training loop")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=560, help="test questions (balanced over the 14 types)")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--eval-frames", type=int, default=RV.NUM_FRAMES)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-only", metavar="DELTA", type=Path, default=None,
                    help="no training: score this delta (e.g. one an earlier --no-eval run saved) into --out")
    args = ap.parse_args(argv)
    if args.eval_only is not None and args.no_eval:
        ap.error("--eval-only and --no-eval exclude each other (one scores a delta, the other skips scoring)")
    if args.eval_only is not None and (args.resume is not None or args.type_weights):
        ap.error("--eval-only scores a delta without training: --resume / --type-weights do not apply")
    if args.resume is not None and not args.resume.is_file():
        ap.error(f"--resume {args.resume}: no such file (give a vltok-ref-video-delta.safetensors to continue from)")
    try:
        args.types = weighted_types(args.type_weights)
    except ValueError as e:
        ap.error(str(e))
    if args.eval_only is not None and not args.eval_only.is_file():
        ap.error(f"--eval-only {args.eval_only}: no such file (give the vltok-ref-video-delta.safetensors to score)")
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev, bf16 = setup_run(args.seed, args.device, args.bf16)
    if args.eval_only is not None:
        delta_path = args.eval_only
        step, train_s = trained_for(delta_path)
    else:
        delta_path, step, train_s = train(args, argv, out, dev, bf16, t_start)
        if args.no_eval:
            return 0
    evaluate(args, argv, out, dev, delta_path, step, train_s, t_start)
    return 0


def trained_for(delta_path: Path) -> tuple[int | None, float | None]:
    """(steps, training seconds) of a saved delta's last training segment: steps from its metadata, seconds from the
    train_log.jsonl that the training wrote beside it (None where unknown)."""
    steps = R.delta_metadata(delta_path).get("steps")
    seconds = None
    log = Path(delta_path).parent / "train_log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("done"):
                seconds = rec.get("train_seconds")
    return (int(steps) if steps is not None else None), seconds


def train(args, argv, out: Path, dev: torch.device, bf16: bool, t_start: float):
    """The training loop; saves the delta into ``out`` and returns (its path, steps, training seconds)."""

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the untrained-init warning: this is the run that trains it
        model, processor = R.load("vltok-ref-video", device=dev, delta=False)
    t_loaded = time.time()
    torch.manual_seed(args.seed)
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    proj_params = list(inner.multi_modal_projector.parameters())
    for p in proj_params:
        p.requires_grad_(True)
    loras = add_lora(inner.language_model, args.rank, args.alpha)
    lora_params = [p for l in loras.values() for p in (l.A, l.B)]
    parent = None
    if args.resume is not None:
        load_trainable(model, loras, args.resume)
        parent = R.delta_metadata(args.resume)
    groups = [{"params": proj_params, "lr": args.lr_projector}, {"params": lora_params, "lr": args.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98), fused=dev.type == "cuda")
    n_train = sum(p.numel() for g in groups for p in g["params"])
    tok = processor.tokenizer
    data = TrainClips(tok, args.steps * args.batch_size, args.batch_size, args.data_offset, args.seed, args.frames,
                      args.types)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        collate_fn=partial(collate, pad_id=tok.pad_token_id), pin_memory=dev.type == "cuda", drop_last=True,
        prefetch_factor=4 if args.workers else None)
    log = open(out / "train_log.jsonl", "w")
    import transformers

    config = dict({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "types"},
                  frame_mix=FRAME_MIX, torch=torch.__version__, transformers=transformers.__version__,
                  device_name=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", trainable_params=n_train,
                  load_seconds=round(t_loaded - t_start, 1))
    log.write(json.dumps({"config": config}) + "\n")
    print(json.dumps({"config": config}), flush=True)
    model.train()

    def prepare(batch):
        ids, labels, mask, u8, types = batch
        ids, labels, mask = ids.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), mask.to(dev)
        px = Q.normalize(u8.to(dev, non_blocking=True), torch.float32)
        return dict(input_ids=ids, pixel_values_videos=px, attention_mask=mask), labels, types, {"frames": int(u8.shape[1])}

    step, stopped_early, train_s = train_loop(
        model, loader, opt, prepare=prepare, steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
        schedule="cosine", bf16=bf16, device=dev, log=log, log_every=args.log_every, max_minutes=args.max_minutes,
        rate_key="videos_per_s", digits=(4, 4, 3))
    import hashlib

    img_delta = R.default_delta_path()
    meta = {"format": "vltok-ref-video-delta/1", "base": "vltok-ref", "lora_scale": args.alpha / args.rank,
            "lora_rank": args.rank, "steps": step, "seed": args.seed, "batch_size": args.batch_size,
            "frame_mix": json.dumps(FRAME_MIX if args.frames is None else [[args.frames, 1.0]]),
            "image_delta_sha256": hashlib.sha256(img_delta.read_bytes()).hexdigest() if img_delta else "",
            "data_offset": args.data_offset, "type_weights": args.type_weights or "",
            "generator_version": S.VERSION,
            "total_steps": step + (int(parent.get("total_steps", parent.get("steps", 0))) if parent else 0)}
    if parent is not None:
        meta.update(resumed_from=args.resume.name,
                    resumed_from_sha256=hashlib.sha256(args.resume.read_bytes()).hexdigest())
    delta_path = out / RV.DELTA_NAME
    size = save_delta(model, loras, [], delta_path, meta)
    done = {"done": True, "steps": step, "stopped_early_at": stopped_early, "train_seconds": round(train_s, 1),
            "delta_bytes": size, "delta": str(delta_path)}
    log.write(json.dumps(done) + "\n")
    log.close()
    print(json.dumps(done), flush=True)
    return delta_path, step, train_s


def evaluate(args, argv, out: Path, dev: torch.device, delta_path: Path, step, train_s, t_start: float) -> None:
    """Score ``delta_path`` on the test split (all frames, then the middle frame) into results.json / results.md."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model, processor = R.load("vltok-ref-video", device=dev, delta=delta_path)   # what users load (merged, fp32)
    records = test_records(args.eval_n)
    res = {"frames": args.eval_frames, "n": len(records)}
    for key, single in (("clip", False), ("single_frame", True)):
        clips = Q.clips_tensor(records, args.eval_frames, "rendered", single, args.workers)
        preds = Q.predict(model, processor, records, clips, batch_size=args.eval_batch)
        res[key] = S.score(records, preds)
        res[key + "_predictions"] = [{"id": r["id"], "type": r["type"], "answer": r["answer"], "pred": p}
                                     for r, p in zip(records, preds)]
    res["chance"] = {t: S.chance(t) for t in S.TYPES}
    res["single_frame_cues"] = S.single_frame_baseline(n_train=300, n_test=max(1, len(records) // len(S.TYPES)))
    res["dataset_version"] = S.VERSION
    meta = R.delta_metadata(delta_path)
    res["training"] = {"steps": step, "train_seconds": None if train_s is None else round(train_s, 1),
                       "resumed_from": meta.get("resumed_from"), "type_weights": meta.get("type_weights") or None,
                       "total_seconds": round(time.time() - t_start, 1),
                       "command": "python -m vltok.train_reference_video " +
                       " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = results_markdown(res)
    (out / "results.md").write_text(f"# vltok-ref-video on the shapes-video test split (n = {len(records)})\n\n" + md +
                                    "\n" + training_line(step, train_s, res["training"]["total_seconds"],
                                                          args.eval_only, meta) + "\n")
    print(md, flush=True)


def training_line(step, train_s, total_s: float, eval_only, meta: dict | None = None) -> str:
    meta = meta or {}
    done = (f"{step if step is not None else '?'} steps in "
            f"{f'{train_s:.0f} s' if train_s is not None else 'unknown time'}")
    if meta.get("resumed_from"):
        weights = f", type weights {meta['type_weights']}" if meta.get("type_weights") else ""
        done += (f" (the last segment{weights}; resumed from {meta['resumed_from']}: "
                 f"{meta.get('total_steps', '?')} steps in all)")
    if eval_only is not None:
        return f"Training: {done} (an earlier run; this one only scored {Path(eval_only).name}, {total_s:.0f} s)."
    return f"Training: {done}; total {total_s:.0f} s."


if __name__ == "__main__":
    raise SystemExit(main())
