"""The Gradio demo: one question, several methods and budgets side by side, with the kept tokens drawn on the image.

    vltok demo [--model PATH] [--device cpu] [--dtype float32] [--port 7860] [--share]

This module only builds the UI; the work (run one method at one budget, draw what it kept, read the committed
results) is ``vltok.demo_core`` and ``vltok.visualize``. Gradio is imported when the app is built, so ``vltok``'s
other subcommands do not pay for it.
"""

import argparse
import os
import sys
import time

from vltok import demo_core as core

DEFAULT_METHODS = ("fourier", "pool", "fastv", "tome")
DEFAULT_BUDGETS = ("0.5", "0.25", "0.11")
TITLE = "vltok: fewer visual tokens, side by side"
CSS = """
.vltok-cell {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px;}
.vltok-cell img {image-rendering: pixelated;}
"""
INTRO = """Pick an example from the shapes benchmark (it knows the right answer) or upload an image, ask a question,
choose methods and budgets (`keep` = share of the 576 visual tokens kept) and press **Run**. Each cell shows the
answer, the visual tokens the LLM saw (per cut for in-LLM methods), the FLOPs-equivalent keep, the time to the first
token and in all, and what the method kept: dropped patches shaded (selection), merged groups coloured (merging),
the reduced grid drawn (resampling), one small panel per cut (in-LLM). A variant whose options fix the budget
themselves (e.g. `feather preset=paper`) runs once, at the keep they imply, whatever budgets are ticked."""


def _pending(choice: core.Choice, keep: float | None) -> dict:
    fixed = core.fixed_budget(choice) if keep is None else None
    head = core.cell_head(choice.label, keep, fixed.option if fixed is not None else None)
    return {"method": choice.label, "keep": keep, "status": "pending", "text": f"{head}  \n⏳ waiting",
            "overlay": None}


def _cell_dict(cell: core.Cell) -> dict:
    return {**cell.summary(), "text": cell.text(), "overlay": cell.overlay}


def _summary(cells: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k not in ("overlay", "text")} for c in cells]


def build(dm: core.DemoModel, examples_dir=None, max_new_tokens: int = core.MAX_NEW_TOKENS):
    """The Blocks app around a loaded :class:`vltok.demo_core.DemoModel`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home (offline machines, CI)
    import gradio as gr
    import pandas as pd

    examples = core.examples(examples_dir or core.EXAMPLES_DIR)
    choices = [c.label for c in core.method_choices()]
    budgets = [f"{b:.2f}".rstrip("0").rstrip(".") if b < 1 else "1.0" for b in core.BUDGETS]

    def pick_example(evt: gr.SelectData):
        rec = examples[evt.index]
        return rec["image_path"], rec["question"], rec

    def pick_question(q):
        return q or gr.update()

    def run(image, question, truth, methods, keeps, progress=gr.Progress()):
        try:
            img = core.load_image(image)
            q = core.check_question(question)
            ks = core.check_budgets(keeps)
            if not methods:
                raise core.DemoInputError("no method chosen: tick at least one method")
            chosen = [core.parse_choice(m) for m in methods]
        except core.VltokError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if truth and truth.get("question") != q:
            truth = None   # the example's answer belongs to its own question
        plan = core.cell_plan(chosen, ks)   # a variant that fixes its own budget: one cell (keep None: not given)
        cells = [_pending(c, k) for c, k in plan]
        yield cells, _summary(cells), f"Running {len(cells)} cells on {dm.name} ..."
        t0 = time.perf_counter()
        n = len(cells)
        for i, (c, k) in enumerate(plan):
            progress((i, n), desc=c.label if k is None else f"{c.label} @ {k:g}")
            try:
                cell = dm.run_cell(img, q, c, k, truth=truth, max_new_tokens=max_new_tokens)
                cells[i] = _cell_dict(cell)
            except Exception as e:   # a bug in one cell must not take the others (or the app) down
                cells[i] = {"method": c.label, "keep": k, "status": "error", "message": f"{type(e).__name__}: {e}",
                            "text": f"{core.cell_head(c.label, k)}  \n**error**: {type(e).__name__}: {e}",
                            "overlay": None}
            cells = list(cells)
            yield cells, _summary(cells), f"{i + 1} / {n} cells, {time.perf_counter() - t0:.1f} s"
        right = sum(1 for c in cells if c.get("correct") is True)
        judged = sum(1 for c in cells if c.get("correct") is not None)
        tail = f"; {right} / {judged} right" if judged else ""
        yield cells, _summary(cells), f"Done: {n} cells in {time.perf_counter() - t0:.1f} s{tail}."

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nModel: **{dm.name}** on `{dm.device}`.")
        with gr.Tab("Compare"):
            gr.Markdown(INTRO)
            with gr.Row():
                with gr.Column(scale=1):
                    gallery = gr.Gallery(value=[(r["image_path"], f"{r['type']}: {r['question']}") for r in examples],
                                         label="Examples (shapes benchmark)", columns=3, height=260,
                                         allow_preview=False, elem_id="examples")
                    image = gr.Image(type="filepath", label="Image (or upload your own)", height=300,
                                     elem_id="image")
                with gr.Column(scale=1):
                    question = gr.Textbox(label="Question", max_lines=3, elem_id="question",
                                          placeholder="What color is the star?")
                    suggest = gr.Dropdown(choices=sorted({r["question"] for r in examples}), value=None,
                                          label="... or pick a question", elem_id="suggest")
                    methods = gr.CheckboxGroup(choices=choices, value=list(DEFAULT_METHODS), label="Methods",
                                               elem_id="methods")
                    keeps = gr.CheckboxGroup(choices=budgets, value=list(DEFAULT_BUDGETS),
                                             label="Budgets (keep)", elem_id="budgets")
                    go = gr.Button("Run", variant="primary", elem_id="run")
            status = gr.Markdown("", elem_id="status")
            truth = gr.State(None)
            cells = gr.State([])
            with gr.Accordion("Results as JSON (what the API returns)", open=False):
                table = gr.JSON(label="cells", elem_id="cells-json")

            @gr.render(inputs=cells)
            def grid(cs):
                if not cs:
                    gr.Markdown("The grid of answers appears here.")
                    return
                by_method = {}
                for c in cs:
                    by_method.setdefault(c["method"], []).append(c)
                for label, row in by_method.items():
                    with gr.Row(equal_height=False):
                        for c in row:
                            with gr.Column(min_width=180, elem_classes=["vltok-cell", f"vltok-{c['status']}"]):
                                if c.get("overlay") is not None:
                                    gr.Image(c["overlay"], show_label=False, interactive=False, height=260,
                                             elem_classes=["vltok-overlay"], buttons=["fullscreen"])
                                gr.Markdown(c["text"], elem_classes=["vltok-text"])

        with gr.Tab("Committed results"):
            try:
                q = core.quality_results()
                head, rows = core.quality_rows(q)
                gr.Markdown(f"### Accuracy vs keep on the shapes benchmark ({q['n']} questions, {q['device']}; "
                            f"full model {q['full']:.1f} %; from `eval/results/{q['source']}`)")
                gr.LinePlot(pd.DataFrame(core.quality_long(q)), x="keep", y="accuracy", color="method",
                            x_title="keep (share of visual tokens)", y_title="accuracy %", height=420,
                            elem_id="quality-plot")
                gr.Dataframe(pd.DataFrame(rows, columns=head), label="accuracy % per method and keep",
                             elem_id="quality-table", interactive=False)
            except (OSError, ValueError, KeyError) as e:
                gr.Markdown(f"No quality results readable: {e}")
            files = core.speed_files()
            if files:
                gr.Markdown("### Speed (GPU measurements, `eval/results/speed-*`)")
                pick = gr.Dropdown(files, value=files[0], label="speed result", elem_id="speed-file")
                cols, srows, shead = core.speed_table(files[0])
                sinfo = gr.Markdown(shead)
                stable = gr.Dataframe(pd.DataFrame(srows, columns=cols), interactive=False, elem_id="speed-table")

                def show_speed(name):
                    c, r, h = core.speed_table(name)
                    return h, pd.DataFrame(r, columns=c)

                pick.change(show_speed, pick, [sinfo, stable], api_name="speed")

        gallery.select(pick_example, None, [image, question, truth], api_name=False)
        image.upload(lambda: None, None, truth, api_name=False)   # an uploaded image has no known answer
        suggest.change(pick_question, suggest, question, api_name=False)
        go.click(run, [image, question, truth, methods, keeps], [cells, table, status], api_name="run",
                 concurrency_limit=1, concurrency_id="model")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch(dm: core.DemoModel, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           **kw):
    import gradio as gr

    demo = build(dm, **kw)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                theme=gr.themes.Soft(), css=CSS, show_error=True)
    url = demo.share_url or demo.local_url
    print(f"vltok demo: {url}", flush=True)
    print(f"vltok demo: ready ({dm.name} on {dm.device}); Ctrl+C stops it", flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a supported checkpoint folder with its processor (default: the "
                   "reference VLM vltok-ref, built offline)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    from vltok import cli_args

    p.add_argument("--dtype", type=cli_args.dtype, default="float32", metavar="DTYPE",
                   help=f"{cli_args.DTYPE_HELP}; default float32")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--max-new-tokens", type=int, default=core.MAX_NEW_TOKENS, help="answer length cap")
    p.add_argument("--time-grid", action="store_true", help="no server: time the default 4-method x 3-budget grid "
                   "(twice, the first with warm-up) on the first example, print the seconds and exit")


def _main(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"vltok demo: loading {args.model or 'the reference VLM'} on {device} ({args.dtype}) ...", flush=True)
    try:
        dm = core.DemoModel.load(args.model, device=device, dtype=args.dtype)
    except core.VltokError as e:
        print(f"vltok: error: {e}", file=sys.stderr)
        return 2
    if args.time_grid:
        for i, r in enumerate(core.time_grid(dm, DEFAULT_METHODS, [float(k) for k in DEFAULT_BUDGETS],
                                             max_new_tokens=args.max_new_tokens)):
            print(f"vltok demo: grid {len(DEFAULT_METHODS)} methods x {len(DEFAULT_BUDGETS)} budgets, run {i + 1}: "
                  f"{r['seconds']:.2f} s ({r['ok']} / {r['cells']} cells ok, {r['right']} right) on {dm.device}",
                  flush=True)
        return 0
    launch(dm, args.host, args.port, args.share, max_new_tokens=args.max_new_tokens)
    return 0


def register(subparsers) -> None:
    """``vltok demo`` (vltok/cli.py PLUGINS)."""
    p = subparsers.add_parser("demo", help="the Gradio demo: methods x budgets side by side on one image "
                              "(http://127.0.0.1:7860)")
    add_arguments(p)
    p.set_defaults(func=_main)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return _main(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
