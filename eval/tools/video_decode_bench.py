"""CPU decode time of the video pipeline (vltok.video.decoding) on generated H.264 clips: decord vs PyAV, 32 / 128
uniformly sampled frames. `python -m vltok.eval.tools.video_decode_bench` (needs av and decord)."""
import time, statistics, tempfile, os
from vltok.video.synthetic import write_video
from vltok.video.decoding import decode
from vltok.video.sampling import Sampling
def main():
    d = tempfile.mkdtemp()
    rows = []
    for (h, w, n) in [(448, 448, 256), (720, 1280, 256)]:
        p = os.path.join(d, f"v{h}.mp4"); write_video(p, frames=n, fps=25, height=h, width=w)
        for k in (32, 128):
            for dec in ("decord", "av"):
                ts = []
                for _ in range(3):
                    t = time.perf_counter(); out = decode(p, Sampling(fps=None, frames=k), decoder=dec); ts.append(time.perf_counter() - t)
                rows.append((f"{h}x{w}", n, k, dec, statistics.median(ts), out.decoder if hasattr(out, "decoder") else ""))
    print("| clip | frames in file | frames sampled | decoder | seconds (median of 3) |")
    print("|---|---|---|---|---|")
    for r in rows: print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} |")


if __name__ == "__main__":
    main()
