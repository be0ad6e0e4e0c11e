"""Compare the reference VLM's answers at several visual-token budgets in the terminal (`make compare`; the
Gradio version is the main job, `make demo`).

    python -m vltok.demos.compare [--n 4] [--methods fourier pool feather] [--keeps 1 0.5 0.25 0.16] [--device cpu]

Each row is one shapes-benchmark question (a procedurally drawn image with a known answer); each column is a
method at a budget: the answer, and the visual tokens the LLM carried (FLOPs-equivalent for in-LLM methods).
The reference VLM is small (DINOv2-S + SmolLM2-135M, 88.2 % on the shapes test split: eval/results/quality-h100.md):
the point here is how answers move with the budget.
"""
from __future__ import annotations

import argparse
import time

import torch

import vltok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="questions (test items 0..n-1, one per question type)")
    ap.add_argument("--methods", nargs="+", default=["fourier", "pool", "feather"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.16])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from vltok import reference
    from vltok.eval import runner, shapes

    model, processor = reference.load(device=args.device)
    tok = processor.tokenizer
    tok.padding_side = "left"
    items = [shapes.test_item(i) for i in range(args.n)]
    images = [shapes.render(scene) for scene, _ in items]
    prompts = [runner.build_prompt(processor, q["question"]) for _, q in items]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(args.device)
    n_prompt = inputs["input_ids"].shape[1]

    columns = []
    for method in args.methods:
        for keep in args.keeps:
            t0 = time.perf_counter()
            with torch.inference_mode(), vltok.patched(model, method, keep=keep) as h:
                out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
                stats = dict(h.stats)
            answers = [a.strip() for a in tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]
            columns.append((f"{method}@{keep:g}", answers, stats, time.perf_counter() - t0))

    print(f"reference VLM on {args.device}; {len(items)} questions; keep = share of the 576 visual tokens\n")
    for i, (_, q) in enumerate(items):
        print(f"Q{i} [{q['type']}, {q['region']}] {q['question']}   (answer: {q['answer']})")
        for name, answers, _, _ in columns:
            mark = "ok" if shapes.is_correct(answers[i], q) else "  "
            print(f"    {mark} {name:<14} {answers[i]}")
    print("\nmethod@keep     visual tokens/img  FLOPs keep  correct  seconds (generate, whole batch)")
    for name, answers, stats, dt in columns:
        n_img = max(len(stats.get("images", [])), 1)
        correct = sum(shapes.is_correct(a, q) for a, (_, q) in zip(answers, items))
        print(f"{name:<15} {stats.get('tokens_out', 0) / n_img:>17.0f}  {stats.get('flops_keep', 1.0):>10.3f}  "
              f"{correct:>4}/{len(items)}  {dt:>7.1f}")


if __name__ == "__main__":
    main()
