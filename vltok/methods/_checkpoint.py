"""What vltok's trained-method checkpoints carry besides their tensors: the JSON under the safetensors metadata key
"vltok" (written by the methods' save functions: the method's name, its shapes, the encoder it was trained on)."""
from __future__ import annotations

import json


def checkpoint_meta(path) -> dict:
    """The "vltok" metadata of a safetensors file ({} where there is none). A missing or unreadable file raises as
    safetensors does (callers add what the file should have been)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("vltok", "{}"))
