"""Draw what a method kept of an image: ``draw_kept(image, entry) -> PIL.Image``.

``entry`` is one :class:`vltok.kept.KeptGrid` from ``handle.kept_patches()`` (or its ``to_dict()``). The picture
lays the entry's patch grid over the image (the image as the model saw it: after the processor's resize / crop):

* selection: dropped patches shaded dark, kept ones clear;
* merging: each merged group (2 or more patches) tinted with its own colour, single patches clear;
* resampling: the reduced r_h x r_w grid drawn over the image;
* in-LLM: the patches entering the LLM (groups tinted if a vision merge ran first), and below, one small panel per
  cut layer with the patches still present there (dropped ones shaded), labelled "L<layer>: <count>".
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from .kept import KeptGrid

SHADE = 0.22          # brightness left on a dropped patch
TINT = 0.5           # colour weight on a merged group


def _as_entry(kept) -> KeptGrid:
    if isinstance(kept, KeptGrid):
        return kept
    d = dict(kept)
    return KeptGrid(int(d.get("image", 0)), tuple(d["grid"]), d["kind"], list(d.get("kept") or []), d.get("groups"),
                    tuple(d["out_grid"]) if d.get("out_grid") else None,
                    {int(k): list(v) for k, v in (d.get("cuts") or {}).items()}, int(d.get("tokens", 0)))


def _patch_masks(h: int, w: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel row / column, the patch row / column it lies in (the grid stretched over the image)."""
    W, H = size
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    return rows, cols


def _per_pixel(values: np.ndarray, h: int, w: int, size) -> np.ndarray:
    """values [h*w, ...] -> [H, W, ...] (each pixel takes its patch's value)."""
    rows, cols = _patch_masks(h, w, size)
    idx = rows[:, None] * w + cols[None, :]
    return values[idx]


def group_colours(n: int) -> np.ndarray:
    """n distinct-looking RGB colours in [0, 1] (golden-ratio hues, alternating lightness)."""
    hues = (np.arange(n) * 0.6180339887) % 1.0
    return np.array([colorsys.hls_to_rgb(hh, 0.5 if i % 2 else 0.6, 0.9) for i, hh in enumerate(hues)]).reshape(n, 3)


def shade_dropped(image: Image.Image, grid: tuple[int, int], kept) -> Image.Image:
    """The image with every patch not in ``kept`` (raster indices of ``grid``) darkened."""
    h, w = grid
    alive = np.zeros(h * w, dtype=bool)
    alive[np.asarray(list(kept), dtype=int)] = True
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    factor = _per_pixel(np.where(alive, 1.0, SHADE).astype(np.float32), h, w, image.size)
    return Image.fromarray((arr * factor[..., None]).clip(0, 255).astype(np.uint8))


def tint_groups(image: Image.Image, grid: tuple[int, int], groups, alive=None) -> Image.Image:
    """Each group of 2+ patches (same value in ``groups``, -1 = dropped) tinted with its own colour; dropped patches
    (and groups not in ``alive``, a set of group ids, when given) darkened."""
    h, w = grid
    g = np.asarray(groups, dtype=int)
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    colours = group_colours(max(len(ids), 1))
    colour = np.zeros((h * w, 3), dtype=np.float32)
    weight = np.zeros(h * w, dtype=np.float32)
    factor = np.ones(h * w, dtype=np.float32)
    for k, (gid, c) in enumerate(zip(ids, counts)):
        members = g == gid
        if alive is not None and gid not in alive:
            factor[members] = SHADE
        elif c > 1:
            colour[members] = colours[k] * 255
            weight[members] = TINT
    factor[g < 0] = SHADE
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    wpx = _per_pixel(weight, h, w, image.size)[..., None]
    out = arr * (1 - wpx) + _per_pixel(colour, h, w, image.size) * wpx
    out = out * _per_pixel(factor, h, w, image.size)[..., None]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def draw_grid(image: Image.Image, grid: tuple[int, int], colour=(255, 230, 0), width: int = 2) -> Image.Image:
    """The image with an r_h x r_w grid of lines over it (a resampling method's output cells)."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    W, H = out.size
    r_h, r_w = grid
    for i in range(r_h + 1):
        y = min(round(i * H / r_h), H - 1)
        d.line([(0, y), (W - 1, y)], fill=colour, width=width)
    for j in range(r_w + 1):
        x = min(round(j * W / r_w), W - 1)
        d.line([(x, 0), (x, H - 1)], fill=colour, width=width)
    return out


def _main_panel(image: Image.Image, e: KeptGrid, alive=None) -> Image.Image:
    if e.kind == "resample" and e.out_grid:
        return draw_grid(image, e.out_grid)
    if e.kind == "merge" and e.groups is not None:
        return tint_groups(image, e.grid, e.groups, alive)
    if e.kind in ("select", "merge"):
        return shade_dropped(image, e.grid, e.kept if alive is None else alive)
    if alive is not None:
        return shade_dropped(image, e.grid, alive)
    return image.convert("RGB").copy()


def _cut_panel(image: Image.Image, e: KeptGrid, survivors) -> Image.Image:
    if e.kind == "merge" and e.groups is not None:   # survivors are groups' first patches: keep their whole groups
        g = np.asarray(e.groups, dtype=int)
        alive = {int(g[p]) for p in survivors}
        return tint_groups(image, e.grid, e.groups, alive)
    return shade_dropped(image, e.grid, survivors)


def draw_kept(image: Image.Image, kept, size: int | None = 336, strip: int = 112) -> Image.Image:
    """``image`` (PIL) with what one KeptGrid entry kept drawn over it (see the module docstring). ``size``: the
    main panel's side in pixels (None: the image's own size); ``strip``: the side of each in-LLM cut panel."""
    e = _as_entry(kept)
    img = image.convert("RGB")
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    main = _main_panel(img, e)
    if not e.cuts:
        return main
    layers = sorted(e.cuts)
    W, H = main.size
    label_h = 16
    strip = max(48, min(strip, W // len(layers)))   # one row of panels when they fit at 48 px or more
    n_per_row = max(1, W // strip)
    rows = (len(layers) + n_per_row - 1) // n_per_row
    out = Image.new("RGB", (W, H + rows * (strip + label_h)), (24, 24, 24))
    out.paste(main, (0, 0))
    d = ImageDraw.Draw(out)
    small = img.resize((strip, strip), Image.BICUBIC)
    for k, layer in enumerate(layers):
        r, c = divmod(k, n_per_row)
        x, y = c * strip, H + r * (strip + label_h)
        out.paste(_cut_panel(small, e, e.cuts[layer]), (x, y + label_h))
        d.text((x + 3, y + 2), f"L{layer}: {len(e.cuts[layer])}", fill=(240, 240, 240))
    return out
