"""The work behind the Gradio demo (``vltok demo``), without Gradio: load a model, run one method at one budget on
one image and question, draw what it kept, read the committed results. ``vltok.demos.app`` only builds the UI.

    dm = DemoModel.load()                                   # the reference VLM (or DemoModel.load("path/to/ckpt"))
    cell = dm.run_cell(image, "What color is the star?", "fourier", 0.16, truth=record)
    cell.answer, cell.correct, cell.tokens, cell.flops_keep, cell.ttft_s, cell.total_s, cell.overlay

Every call patches the model, runs ``generate`` and unpatches it under one lock, so two visitors never see a model
patched by the other. A method that cannot run on the loaded model gives an "n/a" cell with the support matrix's
reason; a budget the method refuses gives an "error" cell with the method's own message; nothing raises.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .errors import VltokError

BUDGETS = (1.0, 0.5, 0.25, 0.16, 0.11)
MAX_QUESTION = 300            # characters
MAX_NEW_TOKENS = 24

def _examples_dir() -> Path:
    """demos/examples (the package vltok.demos: a checkout, an editable or a wheel install)."""
    import importlib.util

    spec = importlib.util.find_spec("vltok.demos")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "examples"
    return Path(__file__).resolve().parent.parent / "demos" / "examples"   # pragma: no cover


EXAMPLES_DIR = _examples_dir()
# the README tables' paper presets and variants beyond the registry's own (``MethodInfo.variants``)
PRESETS = {"feather": (("preset=paper", {"preset": "paper"}),)}


class DemoInputError(VltokError):
    """Bad input to the demo (image, question, method label); the message says what to change."""


# -- methods ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    label: str          # "tome schedule=post"
    name: str           # "tome"
    options: dict = field(default_factory=dict, compare=False, hash=False)


def _fmt(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def method_choices() -> list[Choice]:
    """Every registered method with its default options, then its variants (registry) and paper presets."""
    from .registry import methods

    out = []
    for name, info in methods().items():
        out.append(Choice(name, name, {}))
        for label, opts in tuple(info.variants) + PRESETS.get(name, ()):
            out.append(Choice(f"{name} {label}", name, dict(opts)))
    return out


def fixed_budget(choice: Choice):
    """The :class:`vltok.registry.FixedBudget` of a choice whose options fix the budget themselves (e.g. "feather
    preset=paper"): the demo runs it once, at the keep it implies, not at every budget. None otherwise (also for
    options the method refuses: the cell then shows the refusal)."""
    from .registry import check_options, get

    info = get(choice.name)
    try:
        check_options(info, choice.options)
        return info.fixed_budget(choice.options)
    except (VltokError, ValueError, TypeError):
        return None


def cell_plan(choices, budgets) -> list[tuple[Choice, float | None]]:
    """The (choice, keep) cells of a grid: every budget for each choice, or one cell (keep None: not given) for a
    choice whose options fix the budget."""
    return [(c, k) for c in choices for k in (budgets if fixed_budget(c) is None else [None])]


def parse_choice(label: str) -> Choice:
    """A method label as the demo shows it ("feather preset=paper", "tome schedule=post", or "name k=v ...")."""
    for c in method_choices():
        if c.label == label:
            return c
    parts = str(label).split()
    if not parts:
        raise DemoInputError("empty method label; pick one of the listed methods")
    from .registry import get

    get(parts[0])   # UnknownMethodError names the valid ones
    opts = {}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if not eq:
            raise DemoInputError(f"method option {p!r} is not key=value (e.g. 'tome schedule=post')")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return Choice(label, parts[0], opts)


# -- inputs ----------------------------------------------------------------------------------------------------
def load_image(source) -> Image.Image:
    """A PIL RGB image from a PIL image, numpy array or file path; DemoInputError when it cannot be read."""
    if source is None:
        raise DemoInputError("no image: pick an example or upload an image")
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        import numpy as np

        if isinstance(source, np.ndarray):
            return Image.fromarray(source.astype("uint8")).convert("RGB")
        with Image.open(source) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise DemoInputError(f"could not read the uploaded image ({type(e).__name__}: {e}); upload a PNG or JPEG "
                             "file") from e


def check_question(question) -> str:
    q = (question or "").strip() if isinstance(question, str) or question is None else None
    if q is None:
        raise DemoInputError("the question must be text")
    if not q:
        raise DemoInputError("the question is empty: type a question about the image or pick an example")
    if len(q) > MAX_QUESTION:
        raise DemoInputError(f"the question has {len(q)} characters; the demo takes at most {MAX_QUESTION}")
    return q


def check_budgets(budgets) -> list[float]:
    out = []
    for b in budgets or ():
        try:
            k = float(b)
        except (TypeError, ValueError):
            raise DemoInputError(f"budget {b!r} is not a number; pick keep values such as 0.5 or 0.16") from None
        if not 0.0 < k <= 1.0:
            raise DemoInputError(f"budget {k} is outside (0, 1]: keep is the share of visual tokens kept")
        out.append(k)
    if not out:
        raise DemoInputError("no budget chosen: pick at least one keep value")
    return out


# -- examples --------------------------------------------------------------------------------------------------
EXAMPLE_ITEMS = (0, 1, 2, 4, 9, 10)   # shapes test items: color, shape, count, position (top); color, shape (middle)


def write_examples(folder: str | Path = EXAMPLES_DIR, items=EXAMPLE_ITEMS) -> Path:
    """Render shapes-benchmark test items as PNGs plus examples.json (question records with the answers)."""
    from vltok.eval import shapes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in items:
        scene, q = shapes.test_item(i)
        name = f"shapes-test-{i:02d}.png"
        shapes.render(scene).save(folder / name, optimize=True)
        recs.append({**q, "image": name, "item": i})
    (folder / "examples.json").write_text(json.dumps(recs, indent=1) + "\n")
    return folder


def examples(folder: str | Path = EXAMPLES_DIR) -> list[dict]:
    """The bundled examples: records with ``image_path`` (absolute), ``question``, ``answer``, ``type``, ``region``."""
    folder = Path(folder)
    path = folder / "examples.json"
    if not path.exists():
        return []
    return [{**r, "image_path": str(folder / r["image"])} for r in json.loads(path.read_text())]


def is_correct(answer: str, truth: dict | None) -> bool | None:
    if not truth or "answer" not in truth:
        return None
    from vltok.eval import shapes

    return bool(shapes.is_correct(answer, {"type": truth.get("type", ""), "answer": truth["answer"]}))


# -- one cell --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    method: str
    keep: float | None              # None until the run when an option fixes the budget (keep_set_by)
    status: str = "ok"              # "ok" | "n/a" | "error"
    message: str = ""
    answer: str = ""
    correct: bool | None = None
    tokens: int | None = None       # visual tokens entering the LLM (per image)
    final_tokens: int | None = None  # after the last in-LLM cut
    tokens_per_layer: list | None = None
    flops_keep: float | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    kept: list = field(default_factory=list)    # KeptGrid.to_dict() per grid of the image
    keep_set_by: str | None = None  # the option that fixed the budget (e.g. "preset='paper'"); keep = what it gave
    overlay: Image.Image | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """JSON-able (everything but the overlay)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("overlay", "kept")}
        d["kept_kind"] = self.kept[0]["kind"] if self.kept else None
        return d

    def text(self) -> str:
        """A short Markdown description (what a grid cell shows under its overlay)."""
        head = cell_head(self.method, self.keep, self.keep_set_by)
        if self.status != "ok":
            return f"{head}  \n**{self.status}**: {self.message}"
        mark = {True: " ✓ right", False: " ✗ wrong", None: ""}[self.correct]
        toks = f"{self.tokens} visual tokens"
        if self.tokens_per_layer and self.final_tokens is not None and self.final_tokens != self.tokens:
            toks += f" → {self.final_tokens} after the cuts"
        lines = [head, f"answer: `{self.answer}`{mark}", toks,
                 f"FLOPs keep {self.flops_keep:.3f}" if self.flops_keep is not None else "",
                 f"TTFT {self.ttft_s:.2f} s · total {self.total_s:.2f} s" if self.total_s is not None else ""]
        return "  \n".join(x for x in lines if x)


def cell_head(label: str, keep: float | None, set_by: str | None = None) -> str:
    """A cell's Markdown title: "**fourier @ 0.25**", or for a budget an option fixes "**feather preset=paper @
    0.35** (keep set by preset='paper')" (before the run: "**feather preset=paper** (keep set by ...)")."""
    if set_by is None:
        return f"**{label} @ {keep:g}**" if keep is not None else f"**{label}**"
    at = f" @ {keep:.3g}" if keep is not None else ""
    return f"**{label}{at}** (keep set by {set_by})"


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.t = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.t is None:
            self.t = time.perf_counter()

    def end(self):
        pass


class DemoModel:
    """A loaded model + processor, used by one request at a time (``lock``)."""

    def __init__(self, model, processor, device="cpu", name: str = "vltok-ref"):
        from vltok.registry import adapter_for as find_adapter

        self.model, self.processor, self.device, self.name = model, processor, torch.device(device), name
        self.adapter_cls = find_adapter(model)   # UnsupportedModelError for other families
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu", dtype: str = "float32") -> "DemoModel":
        """The reference VLM (``path=None``) or a checkpoint on disk with its processor."""
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise DemoInputError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        if path is None:
            from vltok import reference

            model, processor = reference.load(device=device, dtype=torch_dtype)
            return cls(model, processor, device, "vltok-ref (DINOv2-S + SmolLM2-135M)")
        if not (Path(path) / "config.json").is_file():   # no model hub: a folder on disk, checked before transformers
            what = "no config.json in that folder" if Path(path).is_dir() else "no such folder"
            raise DemoInputError(f"--model {path}: {what}; pass a checkpoint folder on disk (config, weights and "
                                 "processor files)")
        import transformers
        from transformers import AutoConfig, AutoProcessor

        cfg = AutoConfig.from_pretrained(path)
        archs = getattr(cfg, "architectures", None) or []
        model_cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if model_cls is None:
            raise DemoInputError(f"{path}: its config names no transformers model class ({archs}); vltok supports "
                                 "the classes listed by `python -m vltok.support`")
        model = model_cls.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"
        return cls(model, processor, device, Path(path).name)

    def _image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", -1))

    def view(self, image: Image.Image) -> Image.Image:
        """The image as the model sees it: the processor's shortest-edge resize and centre crop when it has them."""
        ip = getattr(self.processor, "image_processor", None)
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
        if not crop:
            return image
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)
        W, H = image.size
        s = max(ch / H, cw / W)
        im = image.resize((max(cw, round(W * s)), max(ch, round(H * s))), Image.BICUBIC)
        W, H = im.size
        left, top = (W - cw) // 2, (H - ch) // 2
        return im.crop((left, top, left + cw, top + ch))

    def inputs(self, image: Image.Image, question: str) -> dict:
        from vltok.eval.runner import build_prompt

        prompt = build_prompt(self.processor, question)
        return self.processor(images=[image], text=[prompt], return_tensors="pt").to(self.device)

    def support(self, choice: Choice, keep: float | None) -> str | None:
        """The support matrix's reason why this method cannot run on the loaded model (None: it can)."""
        from vltok.api import build_method
        from vltok.support import incompatibility

        return incompatibility(self.adapter_cls, build_method(choice.name, keep, **choice.options))

    def run_cell(self, image, question: str, method: str | Choice, keep: float | None, truth: dict | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, draw: bool = True) -> Cell:
        """One (method, keep) cell: never raises for a method / budget problem (the cell says it). ``keep=None``:
        not given (the method's default, or the keep its options fix: :func:`cell_plan`); the cell then reports the
        keep the run had."""
        import vltok

        choice = method if isinstance(method, Choice) else parse_choice(method)
        cell = Cell(choice.label, None if keep is None else float(keep))
        fixed = fixed_budget(choice)
        cell.keep_set_by = fixed.option if fixed is not None else None
        image = load_image(image)
        question = check_question(question)
        try:
            reason = self.support(choice, keep)
        except (VltokError, ValueError, TypeError) as e:   # the method's own refusal of this budget / option
            cell.status, cell.message = "error", str(e)
            return cell
        if reason:
            cell.status, cell.message = "n/a", f"{choice.name} {reason}"
            return cell
        seen = self.view(image)
        inputs = self.inputs(image, question)
        n_prompt = inputs["input_ids"].shape[1]
        tok = getattr(self.processor, "tokenizer", self.processor)
        streamer = _FirstToken()
        with self.lock:   # patch -> run -> unpatch: no other request sees this model patched
            try:
                handle = vltok.patch(self.model, choice.name, keep=keep, **choice.options)
            except (VltokError, ValueError, TypeError) as e:
                cell.status, cell.message = "error", str(e)
                return cell
            try:
                handle.record_kept = True
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id, streamer=streamer)
                cell.total_s = time.perf_counter() - t0
                cell.ttft_s = (streamer.t or time.perf_counter()) - t0
                stats = dict(handle.stats)
                cell.keep = handle.keep   # the requested keep, or the one the options gave this run
                try:
                    kept = handle.kept_patches()
                except VltokError:
                    kept = []
            except (VltokError, ValueError, RuntimeError) as e:
                cell.status, cell.message = "error", f"{type(e).__name__}: {e}"
                return cell
            finally:
                handle.remove()
        cell.answer = tok.decode(out[0, n_prompt:], skip_special_tokens=True).strip()
        cell.correct = is_correct(cell.answer, truth)
        n_img = max(len(stats.get("images", [])), 1)
        cell.tokens = int(stats.get("llm_input_tokens", stats.get("tokens_out", 0))) // n_img if stats else 0
        if not cell.tokens:   # nothing reduced (keep=1.0 of a vision-stage method installs nothing): the native run
            cell.tokens = int((inputs["input_ids"][0] == self._image_token_id()).sum())
        cell.tokens_per_layer = stats.get("tokens_per_layer")
        st = stats.get("stage_tokens")
        cell.final_tokens = int(st["final"]) if st else cell.tokens
        cell.flops_keep = float(stats["flops_keep"]) if "flops_keep" in stats else None
        cell.kept = [k.to_dict() for k in kept]
        if draw:
            cell.overlay = overlay(seen, kept)
        return cell


def time_grid(dm: DemoModel, methods=("fourier", "pool", "fastv", "tome"), keeps=(0.5, 0.25, 0.11), example: int = 0,
              repeats: int = 2, max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Run a methods x keeps grid on a bundled example ``repeats`` times (the first includes warm-up) as the demo
    does, overlays included; per repeat {"seconds", "cells", "ok", "right"}."""
    ex = examples()[example]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = cell_plan([m if isinstance(m, Choice) else parse_choice(m) for m in methods], list(keeps))
        cells = [dm.run_cell(ex["image_path"], ex["question"], m, k, truth=ex, max_new_tokens=max_new_tokens)
                 for m, k in plan]
        if dm.device.type == "cuda":
            torch.cuda.synchronize(dm.device)
        out.append({"seconds": time.perf_counter() - t0, "cells": len(cells),
                    "ok": sum(c.status == "ok" for c in cells), "right": sum(bool(c.correct) for c in cells)})
    return out


def overlay(seen: Image.Image, kept) -> Image.Image:
    """The first grid's drawing (LLaVA-1.5: the one grid; NeXT: the base tile); the plain image without a record."""
    from .visualize import draw_kept

    if not kept:
        return seen.convert("RGB").resize((336, 336))
    return draw_kept(seen, kept[0])


# -- committed results -----------------------------------------------------------------------------------------
RESULTS_DIR = Path(__file__).resolve().parent.parent / "eval" / "results"


def _results_dir() -> Path:
    try:
        import vltok.eval as ev

        d = Path(ev.__file__).resolve().parent / "results"
        if d.exists():
            return d
    except ImportError:   # pragma: no cover
        pass
    return RESULTS_DIR


def quality_results(path: str | Path | None = None) -> dict:
    """The committed quality runs (eval/results/quality-h100.json): {"keeps": [...], "methods": {label:
    {keep: accuracy %}}, "full": accuracy %, "n": questions, "device": ...}."""
    path = Path(path) if path else _results_dir() / "quality-h100.json"
    runs = json.loads(path.read_text())["runs"]
    out: dict = {"methods": {}, "keeps": set(), "full": None, "n": None, "device": None, "source": path.name}
    for r in runs:
        if "score" not in r:   # a run the method refused (its error is in the file)
            continue
        acc = 100.0 * r["score"]["overall"]
        out["n"] = out["n"] or r.get("n")
        out["device"] = out["device"] or f"{r.get('gpu') or r.get('device')}, {r.get('dtype')}"
        if r["method"] == "full":
            out["full"] = acc
            continue
        keep = float(r["keep"])
        out["keeps"].add(keep)
        out["methods"].setdefault(r["method"], {})[keep] = acc
    out["keeps"] = sorted(out["keeps"], reverse=True)
    return out


def quality_rows(q: dict) -> tuple[list[str], list[list]]:
    """A table: one row per method, one column per keep (accuracy %, '' where not run)."""
    head = ["method"] + [f"{k:g}" for k in q["keeps"]]
    rows = [[m] + [round(v[k], 1) if k in v else None for k in q["keeps"]] for m, v in q["methods"].items()]
    return head, rows


def quality_long(q: dict) -> list[dict]:
    """Long form for a line plot: {method, keep, accuracy} per run (the full model as a line at keep 1.0)."""
    out = [{"method": m, "keep": k, "accuracy": round(a, 2)} for m, v in q["methods"].items() for k, a in v.items()]
    if q["full"] is not None:
        out += [{"method": m, "keep": 1.0, "accuracy": round(q["full"], 2)} for m in q["methods"]]
    return sorted(out, key=lambda r: (r["method"], r["keep"]))


def speed_files() -> list[str]:
    """The committed speed results with a JSON table (eval/results/speed-*.json), newest names first."""
    return sorted((p.name for p in _results_dir().glob("speed-*.json")), reverse=True)


SPEED_COLUMNS = ("model", "batch", "method", "keep", "visual_tokens", "flops_keep", "ttft_ms", "speedup",
                 "decode_tok_s", "peak_gib", "vltok_ms")


def speed_table(name: str) -> tuple[list[str], list[list], str]:
    """(columns, rows, header text) of one speed file: the rows of its JSON and the device line of its .md."""
    d = _results_dir()
    path = d / Path(name).name
    if not path.exists() or not path.name.startswith("speed-"):
        raise DemoInputError(f"no speed result {name!r}; the committed ones are {', '.join(speed_files())}")
    data = json.loads(path.read_text())
    runs = data if isinstance(data, list) else data.get("runs", data.get("results", []))
    base = {}
    for r in runs:
        if r.get("method") == "none":
            base[(r.get("model"), r.get("batch"))] = r.get("ttft_ms")
    rows = []
    for r in runs:
        b = base.get((r.get("model"), r.get("batch")))
        t = r.get("ttft_ms")
        sp = round(b / t, 2) if b and t else None
        row = {**r, "speedup": sp}
        rows.append([_round(row.get(c)) for c in SPEED_COLUMNS])
    md = path.with_suffix(".md")
    header = ""
    if md.exists():
        header = "\n".join(line for line in md.read_text().splitlines()[:8]
                           if line.startswith(("device", "command", "Device")))
    return list(SPEED_COLUMNS), rows, header


def _round(v):
    return round(v, 3) if isinstance(v, float) else v
