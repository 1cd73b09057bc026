"""Inference: the serving engines (one interface, `infer.engine`) and one-shot predictions.

`infer.engine` holds the interface (Request, SamplingParams, Generation, EngineBusy, engine_for);
`infer.embedded` is the in-process engine with continuous batching, `infer.vllm` the engine on a
vLLM server; `infer.predict` has the one-call `predict` for the CLI and notebooks. They are not
re-exported here: a package attribute named `predict` would shadow the `predict` module.
Importing this package does not import torch.
"""
