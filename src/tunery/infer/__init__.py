"""Inference: the serving engines (one interface, `infer.generation`) and one-shot predictions.

`infer.generation` holds the interface (Request, SamplingParams, Generation, Engine, EngineBusy);
`infer.embedded` is the in-process engine with continuous batching, `infer.vllm` the engine on a
vLLM server, both importing only the interface; `infer.engines.engine_for` builds the configured
one; `infer.predict` has the one-call `predict` for the CLI and notebooks. They are not
re-exported here: a package attribute named `predict` would shadow the `predict` module.
Importing this package does not import torch.
"""
