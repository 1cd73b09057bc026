"""manifest.json's content: what was trained, from what, how, with which results (`Run` writes it)."""

from __future__ import annotations

import platform
import time
from typing import Any

from tunery.artifacts.run import ARCHIVE, TOKENIZER
from tunery.version import __version__


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "tunery": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def build_manifest(*, inputs, given: dict, base: str, resolved, files: dict, data_stats: dict, metrics: dict,
                   samples: list, output: str, device: str) -> dict[str, Any]:
    """Everything needed to know what a run is and to reproduce it. `given` are the inputs as
    the user gave them; "resolved_inputs" are all of them, defaults included."""
    return {
        "format": "tunery.run/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"name": base, **resolved.as_dict()},
        "peft_method": inputs.peft_method,
        "method": inputs.method,
        **({"dpo_beta": inputs.dpo_beta} if inputs.method == "dpo" else {}),
        "inputs": given,
        "resolved_inputs": inputs.model_dump(),
        "data": files,
        "data_stats": data_stats,
        "metrics": metrics,
        "samples": samples,
        "output": output,
        "tokenizer": TOKENIZER,
        "archive": ARCHIVE,
        "device": device,
        "versions": versions(),
    }
