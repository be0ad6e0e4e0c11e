"""The eval runner: a model (+ an optional vltok patch) over a dataset folder in the shapes format.

    from vltok.eval import runner
    res = runner.evaluate(model, processor, "data/shapes-test", patch={"method": "fourier", "keep": 0.16})
    print(runner.markdown([res]))

Batches are left-padded and decoded greedily. The patch is applied with ``vltok.patch(model, method, keep=keep,
**kwargs)`` and removed with ``vltok.unpatch(model)`` afterwards, also on errors. ``handle.stats`` (which describes
the last call carrying images) is summed over the batches.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import shapes

QTYPES = shapes.TYPES
REGIONS = shapes.REGIONS


def build_prompt(processor, question: str) -> str:
    """The processor's chat template with one image and the question; the llava-1.5 format without a template."""
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def predict(model, processor, records: list[dict], *, batch_size: int = 16, max_new_tokens: int = 24,
            progress: bool = True, on_batch=None) -> list[str]:
    """Greedy answers for ``records`` (each with ``image_path`` and ``question``), in order."""
    from PIL import Image

    tok = _tokenizer(processor)
    old_side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    preds: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), desc="eval", unit="q", dynamic_ncols=True)
    try:
        for i in range(0, len(records), batch_size):
            batch = records[i:i + batch_size]
            images = []
            for r in batch:
                with Image.open(r["image_path"]) as im:
                    images.append(im.convert("RGB"))
            prompts = [build_prompt(processor, r["question"]) for r in batch]
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
            inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                      for k, v in inputs.items()}
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            preds.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
            if on_batch is not None:
                on_batch()
            if bar is not None:
                bar.update(len(batch))
    finally:
        tok.padding_side = old_side
        if bar is not None:
            bar.close()
    return preds


def _versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        v["vltok"] = version("vltok")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        v["vltok"] = None
    return v


def evaluate(model, processor, data: str | Path | list[dict], patch: dict | None = None, *, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 24, progress: bool = True, model_name: str = "vltok-ref",
             keep_predictions: bool = True) -> dict:
    """Score ``model`` on a dataset folder (or a list of loaded records) with an optional patch config
    ``{"method": str, "keep": float, **kwargs}``. Returns the result dict (see :func:`write`)."""
    records = shapes.load_dataset(data, limit) if not isinstance(data, list) else data[:limit]
    patch = dict(patch) if patch else None
    agg = {"tokens_in": 0, "tokens_out": 0, "seconds": 0.0, "flops_weighted": 0.0, "calls": 0}
    last_stats: dict = {}
    handle = None
    resized = None
    if patch and patch.get("method") == "resize":   # processor-side: the model stays unpatched (vltok.resize)
        from vltok.resize import resize_processor

        cfg = dict(patch)
        resized = processor = resize_processor(processor, float(cfg.pop("keep", 1.0)), model=model)
        cfg.pop("method")
        if cfg:
            raise ValueError(f"resize takes no options, got {sorted(cfg)}")
    elif patch and patch.get("method"):
        import vltok

        cfg = dict(patch)
        method, keep = cfg.pop("method"), float(cfg.pop("keep", 1.0))
        handle = vltok.patch(model, method, keep=keep, **cfg)

    def on_batch():
        nonlocal last_stats
        st = dict(getattr(handle, "stats", None) or {})
        if not st:
            return
        last_stats = st
        agg["calls"] += 1
        agg["tokens_in"] += int(st.get("tokens_in", 0))
        agg["tokens_out"] += int(st.get("tokens_out", 0))
        agg["seconds"] += float(st.get("seconds", 0.0))
        agg["flops_weighted"] += float(st.get("flops_keep", 1.0)) * int(st.get("tokens_in", 0))

    t0 = time.perf_counter()
    try:
        preds = predict(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        progress=progress, on_batch=on_batch if handle is not None else None)
    finally:
        if handle is not None:
            import vltok

            vltok.unpatch(model)
    wall = time.perf_counter() - t0
    result = {
        "model": model_name,
        "patch": patch,
        "dataset": str(data) if not isinstance(data, list) else None,
        "n": len(records),
        "score": shapes.score(records, preds),
        "seconds": wall,
        "questions_per_second": len(records) / wall if wall > 0 else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and
        next(model.parameters()).is_cuda else None,
        "versions": _versions(),
    }
    if handle is not None:
        tin = max(agg["tokens_in"], 1)
        result["stats"] = {"tokens_in": agg["tokens_in"], "tokens_out": agg["tokens_out"],
                           "keep_achieved": agg["tokens_out"] / tin, "flops_keep": agg["flops_weighted"] / tin,
                           "seconds": agg["seconds"], "calls": agg["calls"], "last": last_stats}
    if resized is not None:   # the same share for every image (one crop size)
        k = resized.stats.get("keep_achieved", 1.0)
        result["stats"] = {"keep_achieved": k, "flops_keep": k, "grid_out": resized.stats.get("grid_out"),
                           "seconds": 0.0}
    if keep_predictions:
        result["predictions"] = [{"id": r["id"], "type": r["type"], "region": r.get("region"), "answer": r["answer"],
                                  "pred": p, "correct": shapes.is_correct(p, r)} for r, p in zip(records, preds)]
    return result


def _label(res: dict) -> tuple[str, str]:
    p = res.get("patch") or {}
    if not p.get("method"):
        return "full", "1.0"
    extra = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("method", "keep"))
    return p["method"] + (f" ({extra})" if extra else ""), f"{float(p.get('keep', 1.0)):g}"


def markdown(results: list[dict], baseline: dict | None = None) -> str:
    """One row per result: overall, per type, per region (percent), FLOPs-equivalent keep, retention."""
    if not results:
        return ""
    types = [t for t in QTYPES if any(t in r["score"]["by_type"] for r in results)]
    types += sorted({t for r in results for t in r["score"]["by_type"]} - set(types))
    regions = [g for g in REGIONS if any(g in r["score"]["by_region"] for r in results)]
    head = ["method", "keep", "keep_eq", "n", "overall", *types, *[f"@{g}" for g in regions], "retention"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = baseline["score"]["overall"] if baseline else None
    for r in results:
        s = r["score"]
        method, keep = _label(r)
        keq = r.get("stats", {}).get("flops_keep", 1.0 if method == "full" else None)
        row = [method, keep, f"{keq:.3f}" if keq is not None else "-", str(s["n"]), f"{100 * s['overall']:.1f}"]
        row += [f"{100 * s['by_type'][t]['acc']:.1f}" if t in s["by_type"] else "-" for t in types]
        row += [f"{100 * s['by_region'][g]['acc']:.1f}" if g in s["by_region"] else "-" for g in regions]
        row.append(f"{100 * s['overall'] / base:.1f}%" if base else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict | list[dict], json_path: str | Path, md_path: str | Path | None = None) -> None:
    """Write the result(s) as JSON and the Markdown table beside it (``.md``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    results = result if isinstance(result, list) else [result]
    md_path = Path(md_path) if md_path else json_path.with_suffix(".md")
    full = next((r for r in results if not (r.get("patch") or {}).get("method")), None)
    md_path.write_text(markdown(results, baseline=full))
