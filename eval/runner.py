"""The eval runner: a model (+ an optional vltok patch) over a benchmark folder (vltok.eval.datasets: the shapes
format or an official VQAv2 / GQA / POPE / TextVQA / MME / ScienceQA / Video-MME / MVBench layout).

    from vltok.eval import runner
    res = runner.evaluate(model, processor, "data/shapes-test", patch={"method": "fourier", "keep": 0.16})
    res = runner.evaluate(model, processor, "/data/pope", fmt="pope", save="out/pope.json", resume=True)
    print(runner.markdown([res]))

Batches are left-padded and decoded greedily; a bad image / video is an error row, not an abort; with ``save``
every finished batch is on disk at once (``--resume`` continues from there). The patch is applied with ``vltok.patch(model, method, keep=keep,
**kwargs)`` and removed with ``vltok.unpatch(model)`` afterwards, also on errors. ``handle.stats`` (which describes
the last call carrying images) is summed over the batches.
"""
from __future__ import annotations

import json
import platform
import threading
import time
from pathlib import Path

import torch

from . import shapes

QTYPES = shapes.TYPES
REGIONS = shapes.REGIONS


def build_prompt(processor, question: str, kind: str = "image") -> str:
    """The processor's chat template with one image (or video) and the question; the llava-1.5 format without a
    template."""
    visual = [] if kind == "text" else [{"type": kind}]
    if getattr(processor, "chat_template", None):
        msgs = [{"role": "user", "content": [*visual, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(msgs, add_generation_prompt=True)
    return f"USER: {'' if kind == 'text' else f'<{kind}>' + chr(10)}{question} ASSISTANT:"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


_PIL_LOCK = threading.Lock()


class ItemError(Exception):
    """One item could not be prepared (missing / truncated / empty image or video): recorded as an error row."""


def load_image(path: str):
    """The image as RGB, fully decoded (a truncated file fails here, not inside the processor)."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    try:
        # some packages (lmms-eval's task module) set PIL's global LOAD_TRUNCATED_IMAGES, which turns a truncated
        # file into a silently grey-filled image: a truncated file is an error here, whoever imported what
        with _PIL_LOCK:
            old, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                with Image.open(path) as im:
                    return im.convert("RGB")
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = old
    except FileNotFoundError:
        raise ItemError(f"image not found: {path}") from None
    except UnidentifiedImageError:
        raise ItemError(f"not a readable image (empty or corrupt file): {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ItemError(f"cannot decode image {path}: {e}") from None


def load_video(path: str, frames: int = 8, bound: tuple[float, float] | None = None) -> list:
    """``frames`` RGB frames sampled uniformly (segment centres) from a video file (PyAV) or a folder of frame
    images; ``bound`` = (start, end) seconds restricts a file to that clip."""
    from pathlib import Path as _P

    p = _P(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise ItemError(f"frame folder holds no images: {path}")
        idx = [min(len(files) - 1, int((k + 0.5) * len(files) / frames)) for k in range(frames)]
        return [load_image(str(files[i])) for i in idx]
    if not p.exists():
        raise ItemError(f"video not found: {path}")
    try:
        import av
    except ImportError:
        raise ItemError("reading videos needs PyAV: pip install 'vltok[video]'") from None
    try:
        with av.open(str(p)) as c:
            stream = c.streams.video[0]
            decoded = []
            for fr in c.decode(stream):
                t = float(fr.pts * stream.time_base) if fr.pts is not None else None
                if bound is not None and t is not None and not (bound[0] <= t <= bound[1]):
                    continue
                decoded.append(fr.to_image().convert("RGB"))
    except Exception as e:  # noqa: BLE001 - av raises many types for broken files
        raise ItemError(f"cannot decode video {path}: {e}") from None
    if not decoded:
        raise ItemError(f"video has no frames{' in the clip ' + str(bound) if bound else ''}: {path}")
    idx = [min(len(decoded) - 1, int((k + 0.5) * len(decoded) / frames)) for k in range(frames)]
    return [decoded[i] for i in idx]


def generate(model, processor, texts: list[str], visuals: list, kind: str = "image", *, max_new_tokens: int = 24,
             stop: list[str] | None = None) -> list[str]:
    """Greedy answers for one left-padded batch: ``texts`` (user turns without placeholder) and one visual each
    (a PIL image, or a list of frames for ``kind="video"``). Answers are cut at the first ``stop`` string."""
    tok = _tokenizer(processor)
    old_side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    try:
        prompts = [build_prompt(processor, t, kind) for t in texts]
        vis = {} if kind == "text" else {"images" if kind == "image" else "videos": list(visuals)}
        inputs = processor(**vis, text=prompts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = old_side
    new = out[:, inputs["input_ids"].shape[1]:]
    answers = []
    for t in tok.batch_decode(new, skip_special_tokens=True):
        for s in stop or ():
            if s and s in t:
                t = t.split(s)[0]
        answers.append(t.strip())
    return answers


def prepare(item, frames: int = 8):
    """(kind, visual) of a dataset item; raises ItemError for a bad file."""
    if item.video is not None:
        return "video", load_video(item.video, frames, item.meta.get("bound"))
    if item.image is not None:
        return "image", load_image(item.image)
    raise ItemError(f"item {item.id} has neither an image nor a video")


def run_items(model, processor, items: list, *, batch_size: int = 16, max_new_tokens: int = 24, frames: int = 8,
              progress: bool = True, on_batch=None, on_rows=None) -> list[dict]:
    """Rows ``{"id", "pred", "error"}`` for ``items`` in order; a bad item becomes an error row (pred None) and the
    rest of its batch still runs. ``on_rows(rows)`` is called after every batch (incremental saving)."""
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="eval", unit="q", dynamic_ncols=True)
    try:
        for i in range(0, len(items), batch_size):
            batch = items[i:i + batch_size]
            out = {}
            ready: dict[str, list] = {}
            for it in batch:
                try:
                    kind, vis = prepare(it, frames)
                    ready.setdefault(kind, []).append((it, vis))
                except ItemError as e:
                    out[it.id] = {"id": it.id, "pred": None, "error": str(e)}
            for kind, group in ready.items():
                preds = generate(model, processor, [it.prompt for it, _ in group], [v for _, v in group], kind,
                                 max_new_tokens=max_new_tokens)
                for (it, _), p in zip(group, preds):
                    out[it.id] = {"id": it.id, "pred": p, "error": None}
                if on_batch is not None:
                    on_batch()
            new_rows = [out[it.id] for it in batch]
            rows.extend(new_rows)
            if on_rows is not None:
                on_rows(new_rows)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return rows


def predict(model, processor, records: list[dict], *, batch_size: int = 16, max_new_tokens: int = 24,
            progress: bool = True, on_batch=None) -> list[str]:
    """Greedy answers for shapes ``records`` (each with ``image_path`` and ``question``), in order; a bad image
    raises :class:`ItemError`."""
    from .datasets import Item

    items = [Item(id=str(k), prompt=r["question"], image=r["image_path"]) for k, r in enumerate(records)]
    rows = run_items(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=progress, on_batch=on_batch)
    bad = [r for r in rows if r["error"]]
    if bad:
        raise ItemError(bad[0]["error"])
    return [r["pred"] for r in rows]


def _versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        v["vltok"] = version("vltok")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        v["vltok"] = None
    return v


def as_dataset(data, fmt: str | None = None):
    """A :class:`vltok.eval.datasets.Dataset` from a folder (format detected or ``fmt``), a list of shapes records
    or a Dataset."""
    from . import datasets

    if isinstance(data, datasets.Base) or isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, list):
        items = [datasets.Item(id=str(r["id"]), prompt=r["question"], image=r["image_path"], target=r,
                               meta={"type": r["type"], "region": r.get("region")}) for r in data]
        return datasets.Shapes(Path("."), items)
    return datasets.load(data, fmt)


def check_writable(path: str | Path) -> None:
    """Fail now (not after the run) when ``path`` (and its ``.md`` / partial siblings) cannot be written."""
    from .datasets import DatasetError

    path = Path(path)
    for p in (path, path.with_suffix(".md"), partial_path(path)):
        if p.is_dir():
            raise DatasetError(f"cannot write {p}: it is a folder; pass a file path to --json")
        existed = p.exists()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a"):
                pass
        except OSError as e:
            raise DatasetError(f"cannot write {p}: {e.strerror or e}; pass a writable --json path") from None
        if not existed:
            p.unlink()


def partial_path(json_path: str | Path) -> Path:
    json_path = Path(json_path)
    return json_path.with_name(json_path.name + ".partial.jsonl")


def run_header(model_name: str, patch: dict | None, ds, max_new_tokens: int, frames: int) -> dict:
    """What a partial-results file must agree on to be resumed."""
    return {"model": model_name, "patch": patch, "dataset": str(ds.root.resolve()), "format": ds.format,
            "max_new_tokens": max_new_tokens, "frames": frames}


def check_resume(json_path, header: dict) -> int:
    """The number of answered items in ``json_path``'s partial file (0 if none); an error if it is another run's."""
    p = partial_path(json_path)
    return len(_read_partial(p, header)) if p.exists() else 0


def _read_partial(path: Path, header: dict) -> dict[str, dict]:
    from .datasets import DatasetError, read_jsonl

    rows = read_jsonl(path)
    if not rows or "header" not in rows[0][1]:
        raise DatasetError(f"{path}: not a vltok partial-results file; delete it or drop --resume")
    if len(rows) == 1:   # a header and no answer (an older vltok wrote it before the run failed): nothing to resume
        return {}
    if rows[0][1]["header"] != header:
        old = rows[0][1]["header"]
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {header.get(k)!r}" for k in header if old.get(k) != header.get(k))
        raise DatasetError(f"{path} belongs to another run ({diff}); delete it or drop --resume")
    done = {}
    for _, r in rows[1:]:
        if r.get("error"):   # retried on resume (the file may have been fixed)
            continue
        done[r["id"]] = r
    return done


def evaluate(model, processor, data, patch: dict | None = None, *, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, progress: bool = True,
             model_name: str = "vltok-ref", keep_predictions: bool = True, fmt: str | None = None,
             scorer: str = "official", frames: int = 8, save: str | Path | None = None,
             resume: bool = False) -> dict:
    """Score ``model`` on a benchmark (a folder in any format of :mod:`vltok.eval.datasets`, a list of shapes
    records, or a Dataset) with an optional patch ``{"method": str, "keep": float, **kwargs}``.

    A bad image / video becomes an error row (scored as a wrong answer, listed under ``errors``) and the run goes
    on. ``save`` = the result JSON path: every finished batch is appended to ``<save>.partial.jsonl`` at once;
    ``resume=True`` skips the items already answered there (by the same model, patch and dataset). Returns the
    result dict (see :func:`write`)."""
    ds = as_dataset(data, fmt)
    items = ds.items[:limit] if limit is not None else list(ds.items)
    max_new_tokens = max_new_tokens or ds.max_new_tokens
    patch = dict(patch) if patch else None
    header = run_header(model_name, patch, ds, max_new_tokens, frames)
    done: dict[str, dict] = {}
    sink = None
    ppath = partial_path(save) if save is not None else None
    if ppath is not None and resume and ppath.exists():
        done = _read_partial(ppath, header)
    # the partial file is (re)started with the first finished batch, not before: a run that fails before it
    # answers anything (a model that cannot load, a method its family cannot run) leaves no file behind
    fresh = not done
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
        method, keep = cfg.pop("method"), cfg.pop("keep", 1.0)   # None: not given (the default, or set by an option)
        handle = vltok.patch(model, method, keep=None if keep is None else float(keep), **cfg)

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

    def on_rows(rows):
        nonlocal sink
        for r in rows:
            done[r["id"]] = r
        if ppath is not None and rows:
            if sink is None:
                ppath.parent.mkdir(parents=True, exist_ok=True)
                sink = open(ppath, "w" if fresh else "a")
                if fresh:
                    sink.write(json.dumps({"header": header}) + "\n")
            sink.write("".join(json.dumps(r) + "\n" for r in rows))
            sink.flush()

    todo = [it for it in items if it.id not in done]
    resumed = len(items) - len(todo)
    t0 = time.perf_counter()
    try:
        run_items(model, processor, todo, batch_size=batch_size, max_new_tokens=max_new_tokens, frames=frames,
                  progress=progress, on_batch=on_batch if handle is not None else None, on_rows=on_rows)
    finally:
        if sink is not None:
            sink.close()
        if handle is not None:
            import vltok

            vltok.unpatch(model)
    wall = time.perf_counter() - t0
    rows = [done[it.id] for it in items]
    preds = [r["pred"] for r in rows]
    errors = [{"id": r["id"], "error": r["error"]} for r in rows if r["error"]]
    result = {
        "model": model_name,
        "patch": patch,
        "dataset": None if isinstance(data, list) else str(data) if isinstance(data, (str, Path)) else str(ds.root),
        "format": ds.format,
        "scorer": scorer,
        "n": len(items),
        "n_errors": len(errors),
        "resumed": resumed,
        "score": ds.score(preds, items, scorer),
        "seconds": wall,
        "questions_per_second": len(todo) / wall if wall > 0 and todo else None,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and
        next(model.parameters()).is_cuda else None,
        "versions": _versions(),
        "errors": errors,
    }
    if handle is not None:
        tin = max(agg["tokens_in"], 1)
        result["keep"] = handle.keep   # the keep it ran at (also where none was given)
        if handle.keep_set_by is not None:
            result["keep_set_by"] = handle.keep_set_by
        result["stats"] = {"tokens_in": agg["tokens_in"], "tokens_out": agg["tokens_out"],
                           "keep_achieved": agg["tokens_out"] / tin, "flops_keep": agg["flops_weighted"] / tin,
                           "seconds": agg["seconds"], "calls": agg["calls"], "last": last_stats}
    if resized is not None:   # the same share for every image (one crop size)
        k = resized.stats.get("keep_achieved", 1.0)
        result["stats"] = {"keep_achieved": k, "flops_keep": k, "grid_out": resized.stats.get("grid_out"),
                           "seconds": 0.0}
    if keep_predictions:
        if ds.format == "shapes":
            from . import shapes as _shapes

            result["predictions"] = [
                {"id": r["id"], "type": it.target["type"], "region": it.target.get("region"),
                 "answer": it.target["answer"], "pred": r["pred"],
                 "correct": r["pred"] is not None and _shapes.is_correct(r["pred"], it.target),
                 **({"error": r["error"]} if r["error"] else {})} for it, r in zip(items, rows)]
        else:
            result["predictions"] = [{"id": r["id"], "pred": r["pred"], **({"error": r["error"]} if r["error"] else {})}
                                     for r in rows]
        sub = ds.submission(preds, items)
        if sub is not None:
            result["submission"] = sub
    return result


def _label(res: dict) -> tuple[str, str]:
    p = res.get("patch") or {}
    if not p.get("method"):
        return "full", "1.0"
    extra = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("method", "keep"))
    keep = p.get("keep", 1.0)
    if keep is None:   # not given: the keep it ran at (the default, or set by an option: marked *)
        keep = res.get("keep")
        return p["method"] + (f" ({extra})" if extra else ""), ("-" if keep is None else f"{float(keep):.3g}") + \
            ("*" if res.get("keep_set_by") else "")
    return p["method"] + (f" ({extra})" if extra else ""), f"{float(keep):g}"


def _keep_note(results) -> list[str]:
    """The legend of the keep column's ``*`` (a keep that an option set), when a row has one."""
    opts = sorted({str(r["keep_set_by"]) for r in results if r.get("keep_set_by") and _label(r)[1].endswith("*")})
    if not opts:
        return []
    return ["", f"`*` keep not passed but set by an option ({', '.join(opts)}): the FLOPs-equivalent keep it gave"]


def _extra_columns(res: dict) -> list[tuple[str, str]]:
    s = res["score"]
    fmt = res.get("format")
    if fmt == "pope":
        return [(f"F1 {k}", f"{100 * v['f1']:.1f}") for k, v in s["splits"].items()] + [("yes%", f"{100 * _mean_yes(s):.1f}")]
    if fmt == "mme":
        return [("perception", f"{s['perception']:.1f}"), ("cognition", f"{s['cognition']:.1f}")]
    return []


def _mean_yes(s):
    v = [x["yes_ratio"] for x in s["splits"].values()]
    return sum(v) / len(v) if v else 0.0


def _markdown_generic(results, baseline) -> str:
    extra_heads = []
    for r in results:
        for k, _ in _extra_columns(r):
            if k not in extra_heads:
                extra_heads.append(k)
    head = ["method", "keep", "keep_eq", "n", "errors", "overall", *extra_heads, "retention"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = baseline["score"]["overall"] if baseline else None
    for r in results:
        s = r["score"]
        method, keep = _label(r)
        keq = r.get("stats", {}).get("flops_keep", 1.0 if method == "full" else None)
        ov = s.get("overall")
        row = [method, keep, f"{keq:.3f}" if keq is not None else "-", str(s["n"]), str(r.get("n_errors", 0)),
               f"{100 * ov:.2f}" if ov is not None else "-"]
        ex = dict(_extra_columns(r))
        row += [ex.get(h, "-") for h in extra_heads]
        row.append(f"{100 * ov / base:.1f}%" if base and ov is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += _keep_note(results)
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], baseline: dict | None = None) -> str:
    """One row per result. Shapes: overall, per type, per region (percent), FLOPs-equivalent keep, retention;
    other formats: overall (the benchmark's headline accuracy) and its extra numbers (POPE F1 per split, MME
    perception / cognition)."""
    if not results:
        return ""
    if any("by_type" not in r["score"] for r in results):
        return _markdown_generic(results, baseline)
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
    lines += _keep_note(results)
    if any(r.get("n_errors") for r in results):
        lines.append("")
        lines.append("errors (scored as wrong): " + ", ".join(f"{_label(r)[0]} {r['n_errors']}" for r in results
                                                              if r.get("n_errors")))
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
