"""Taking a trained run elsewhere: merged Hugging Face weights, GGUF for llama.cpp, an Ollama Modelfile."""

from tunery.errors import TuneryError


class ExportError(TuneryError):
    """An export that cannot be made (a run that did not succeed, an unsupported format or
    architecture, a model whose export does not reproduce it, a full disk)."""


__all__ = ["ExportError"]
