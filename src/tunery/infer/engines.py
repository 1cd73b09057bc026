"""Which engine serves a base: `engine_for(base)` builds the configured one (settings `engine`,
`vllm_url`, `max_batch`, `max_queue`).

The engines (`infer.embedded`, `infer.vllm`) are imported here, lazily and only here: they import
the interface (`infer.generation`), never this module. Nothing here imports torch.
"""

from __future__ import annotations

from tunery.infer.generation import Engine
from tunery.settings import Settings, get_settings


def engine_for(base: str, settings: Settings | None = None, **overrides) -> Engine:
    """The configured engine for `base`: vLLM when settings.engine is "vllm", else the embedded one."""
    settings = settings or get_settings()
    options = {"max_batch": settings.max_batch, "max_queue": settings.max_queue} | overrides
    if settings.engine == "vllm":
        from tunery.infer.vllm import VLLMEngine

        return VLLMEngine(base, settings=settings, **options)
    from tunery.infer.embedded import EmbeddedEngine

    return EmbeddedEngine(base, **options)
