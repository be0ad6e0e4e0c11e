"""Where Qwen2-VL-7B's prefill time goes: the vision tower alone vs the whole forward, unpatched and patched.

    python -m vltok.eval.tools.profile_qwen   (GPU; random bf16 weights; the speed benchmark's 1008 x 1456 image)
"""
from __future__ import annotations

import torch

import vltok
from vltok.eval import configs, speed


def main():
    model = configs.build_random("qwen2-vl-7b", device="cuda", dtype=torch.bfloat16)
    for grid in [(1, 72, 104), (1, 28, 42)]:
        inp = speed.make_inputs(model, "qwen2_vl", 1, "cuda", grid=grid)
        with torch.no_grad():
            vit = speed.cuda_time(lambda: model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"]),
                                  warmup=3, reps=5)
            full = speed.cuda_time(lambda: model(**inp, logits_to_keep=1), warmup=3, reps=5)
            print(f"grid {grid}: vision tower {vit:.1f} ms, whole prefill {full:.1f} ms, "
                  f"LLM + rest {full - vit:.1f} ms ({inp['input_ids'].shape[1]} tokens)", flush=True)
            if grid == (1, 72, 104):
                for method in ("fourier", "random"):
                    with vltok.patched(model, method, keep=0.16) as h:
                        t = speed.cuda_time(lambda: model(**inp, logits_to_keep=1), warmup=3, reps=5)
                        print(f"  {method} keep 0.16: whole prefill {t:.1f} ms, LLM + rest {t - vit:.1f} ms "
                              f"({h.stats['tokens_out']} visual tokens)", flush=True)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    model.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


if __name__ == "__main__":
    main()
