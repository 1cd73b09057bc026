"""The `tunery` command: a thin typer layer over the plain functions.

`tunery train`'s flags are generated from `TrainingInputs`, so the CLI, the HTTP body and the
manifest can never drift apart: same names (with dashes), same defaults, same help text.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from tunery.errors import TuneryError
from tunery.infer.generation import SamplingParams
from tunery.models.registry import DEFAULT_BASE
from tunery.process import freeze_at_exit

# Deprecation chatter from the libraries is for their developers, not for our users.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

freeze_at_exit()

app = typer.Typer(
    name="tunery",
    help="Fine-tune Llama-family models on a JSONL file, evaluate them and serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)
models_app = typer.Typer(help="Base models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

err = Console(stderr=True)
out = Console()


def _fail(exc: Exception) -> typing.NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


# -- train --------------------------------------------------------------------------------

def _spec_parameters() -> list[inspect.Parameter]:
    """One typer option per TrainingInputs field: --train-data, --num-train-epochs, ..."""
    from tunery.spec import TrainingInputs

    params = []
    for name, field in TrainingInputs.model_fields.items():
        ann = field.annotation
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        kwargs: dict[str, Any] = {"help": field.description, "rich_help_panel": _panel(name)}
        if origin is typing.Literal:
            py_type: Any = ann
        elif args and typing.get_origin(args[0]) is None and origin is not None:  # X | None
            py_type = Optional[args[0]]  # noqa: UP045 - typer needs typing.Optional
        else:
            py_type = ann
        flag = "--" + name.replace("_", "-")
        if py_type is bool:
            decl = [f"{flag}/--no-{name.replace('_', '-')}"]
        else:
            decl = [flag]
        default = ... if field.is_required() else field.default
        option = typer.Option(*decl, **kwargs)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=Annotated[py_type, option]))
    return params


def _panel(name: str) -> str:
    from tunery.spec import REPLICATE_INPUTS

    return "Training inputs (Replicate)" if name in REPLICATE_INPUTS else "Training options"


def _train_command(
    ctx: typer.Context,
    *,
    base: Annotated[str, typer.Option("--base", help="Base model: registry name, HF id, model dir or .gguf.",
                                      rich_help_panel="Run")] = DEFAULT_BASE,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory or storage URL, "  # noqa: UP045
                                                      "e.g. s3://bucket/runs/x (default: $TUNERY_HOME/runs/run-<time>).",
                                                      rich_help_panel="Run")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its last "
                                         "checkpoint.", rich_help_panel="Run")] = False,
    events: Annotated[Optional[str], typer.Option("--events", help="Also write JSON-lines events to this "  # noqa: UP045
                                                  "file ('-' for stdout).", rich_help_panel="Run")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.",
                                           rich_help_panel="Run")] = True,
    test_data: Annotated[Optional[str], typer.Option("--test-data", help="JSONL test set: after the last step "  # noqa: UP045
                                                     "the tuned model is evaluated against the base on it.",
                                                     rich_help_panel="Run")] = None,
    **spec: Any,
) -> None:
    """Fine-tune a base model on a JSONL file (LoRA, QLoRA or full) and write a run directory."""
    from tunery.spec import parse_inputs
    from tunery.train.recipe import train

    given = {k: v for k, v in spec.items() if _was_given(ctx, k)}
    try:
        for name in ("grader", "response_format"):  # a JSON file's path, or the JSON itself
            given[name] = _json_file(given[name], f"--{name.replace('_', '-')}") if name in given else None
            if given[name] is None:
                del given[name]
        inputs = parse_inputs(given)
        result = train(inputs, base=base, output_dir=output_dir, resume=resume, events=events, progress=progress,
                       test_data=test_data)
    except TuneryError as exc:
        _fail(exc)
    if not result.manifest:  # another process than the first of a multi-process run: it reports nothing
        return
    m = result.manifest["metrics"]
    err.print(
        f"[green]done[/] {result.run_url}  steps={m['steps']} loss={_fmt(m['train_loss'])} "
        f"val_loss={_fmt(m['val_loss'])} "
        + (f"reward_accuracy={_fmt(m.get('reward_accuracy'))} " if result.manifest.get("method") == "dpo" else "")
        + (f"reward={_fmt(m.get('reward_mean'))} " if result.manifest.get("method") == "grpo" else "")
        + f"{m['tokens_per_second']:.1f} tok/s "
        f"padding={m['padding_fraction']:.1%}\nweights: {result.archive}"
    )
    if result.report is not None:
        from tunery.eval.report import render

        render(result.report, err)


def _json_file(value: str | None, flag: str) -> str | None:
    """`value` itself when it is JSON text, else the text of the file it names."""
    if value is None or value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise TuneryError(f"{flag} {value}: neither JSON nor a readable file ({exc.strerror})") from None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _was_given(ctx: typer.Context, name: str) -> bool:
    """True when the user set this option (so the manifest records inputs as given, not defaults)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


_sig = inspect.signature(_train_command, eval_str=True)
_sig = _sig.replace(
    parameters=[p for p in _sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    + _spec_parameters()
)
_train_command.__signature__ = _sig  # type: ignore[attr-defined]  # a function attribute typer reads
_train_command.__annotations__ = {p.name: p.annotation for p in _sig.parameters.values()}
app.command("train", no_args_is_help=True)(_train_command)


# -- predict ------------------------------------------------------------------------------

# The one set of sampling defaults is SamplingParams' own (Replicate's); the options read them.
_SAMPLING = SamplingParams()


@app.command()
def predict(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text ('-' reads stdin).")],
    weights: Annotated[Optional[str], typer.Option(help="Run directory or URL, weights archive or adapter dir.")] = None,  # noqa: UP045
    base: Annotated[Optional[str], typer.Option(help="Base model (default: the one the weights were trained on).")] = None,  # noqa: UP045, E501
    max_new_tokens: Annotated[int, typer.Option(help="Maximum number of tokens to generate.")] = _SAMPLING.max_new_tokens,  # noqa: E501
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = _SAMPLING.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the top tokens with this much mass.")] = _SAMPLING.top_p,  # noqa: E501
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens.")] = _SAMPLING.top_k,
    stop_sequences: Annotated[Optional[str], typer.Option(help="Comma-separated; output ends before the first.")] = None,  # noqa: UP045, E501
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,  # noqa: UP045
) -> None:
    """Generate from a base model or a tuned run; tokens stream to stdout as they are generated."""
    from tunery.infer.predict import stream

    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, stop_sequences=stop_sequences, seed=seed)
        for piece in stream(prompt, base=base, weights=weights, params=params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (TuneryError, ValueError) as exc:
        _fail(exc)


# -- export -------------------------------------------------------------------------------

@app.command("export", no_args_is_help=True)
def export_command(
    run: Annotated[str, typer.Argument(help="The run: its directory or storage URL.")],
    format: Annotated[str, typer.Option("--format", "-f", help="merged (a Hugging Face model folder), gguf "
                                        "(llama.cpp), ollama (GGUF + Modelfile) or gguf-lora (the adapter "
                                        "for llama.cpp's --lora).")] = "merged",
    dtype: Annotated[str, typer.Option(help="merged: bf16, f16 or f32.")] = "bf16",
    quant: Annotated[str, typer.Option(help="gguf / ollama: q8_0, f16, bf16, f32, or 4-/5-bit q4_0, q4_1, q5_0, q5_1.")] = "q8_0",
    force: Annotated[bool, typer.Option("--force", help="Export again even if this export exists.")] = False,
) -> None:
    """Export a finished run: merged weights, a GGUF file, or a GGUF with an Ollama Modelfile; each
    checked against the trained model before it is kept, in the run's exports/."""
    from tunery.export.exporter import export
    from tunery.settings import get_settings

    settings = get_settings()
    try:
        done = export(settings.run(run), format, dtype=dtype, quant=quant, settings=settings, force=force)
    except TuneryError as exc:
        _fail(exc)
    check = done.info.get("check", done.info)
    err.print(f"[green]exported[/] {done.name}: {done.file}")
    if "max_abs_diff" in check:
        err.print(f"check: logits within {check['max_abs_diff']:.3g} of the trained model "
                  f"({check.get('relative_diff', 0):.2g} of their scale, tolerance {check.get('tolerance')}); "
                  f"top token agrees {100 * check.get('argmax_agreement', 0):.1f}%")
    if done.format == "ollama":
        err.print(f"use it: unzip {done.file.name} && {done.info['ollama_create']}")
    typer.echo(str(done.file))


# -- eval ---------------------------------------------------------------------------------

@app.command("eval")
def eval_command(
    test_data: Annotated[str, typer.Option("--test-data", "-t", help="JSONL test file (path or URL).")],
    weights: Annotated[Optional[str], typer.Option(help="Run directory or URL, weights archive or adapter dir.")] = None,  # noqa: UP045
    base: Annotated[Optional[str], typer.Option(help="Base model (default: the weights' base).")] = None,  # noqa: UP045
    compare: Annotated[bool, typer.Option("--compare", help="Score the base too, side by side.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where eval.json/eval.md go "  # noqa: UP045
                                                       "(default: the run directory).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation length (default: longest reference + 16).")] = None,  # noqa: UP045, E501
    # Greedy, unlike predict's default: a score must not depend on the sampling draw.
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = _SAMPLING.top_p,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens.")] = _SAMPLING.top_k,
    stop_sequences: Annotated[Optional[str], typer.Option(help="Comma-separated stop sequences.")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,  # noqa: UP045
    examples: Annotated[int, typer.Option(help="Examples to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    grader: Annotated[Optional[str], typer.Option("--grader", help="RFT test data: the grader that scores the "  # noqa: UP045
                                                  "answers, a JSON file (default: a GRPO run's own).")] = None,
    forgetting: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--forgetting/--no-forgetting", help="What tuning cost the model: general-text loss and the base's own "
        "answers to general instructions, base against tuned (default: on for an instruct base).")] = None,
) -> None:
    """Evaluate a tuned run, a base model, or both (--compare): loss, perplexity, exact match,
    ROUGE, chrF, BLEU; on RFT prompts, the grader's mean score. Writes eval.json and eval.md."""
    from tunery.eval.evaluate import evaluate
    from tunery.eval.report import render

    if weights is None and base is None:
        base = DEFAULT_BASE
    try:
        # Without --max-new-tokens the evaluator generates up to the longest reference + 16 tokens,
        # capped by params.max_new_tokens: 256 here (not predict's default), so long references fit.
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, stop_sequences=stop_sequences,
                                seed=seed, max_new_tokens=max_new_tokens or 256)
        grader_json = _json_file(grader, "--grader")
        report = evaluate(test_data, weights=weights, base=base, compare=compare, params=params,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, n_examples=examples,
                          output_dir=output_dir, progress=not as_json, console=err,
                          grader=json.loads(grader_json) if grader_json else None, forgetting=forgetting)
    except (TuneryError, ValueError) as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, out)


# -- data check ---------------------------------------------------------------------------

@data_app.command("check")
def data_check(
    file: Annotated[str, typer.Argument(help="JSONL file (path or http(s) URL).")],
    base: Annotated[str, typer.Option(help="Base model whose tokenizer to use.")] = DEFAULT_BASE,
    chunk_size: Annotated[int, typer.Option(help="Packed sequence length.")] = 2048,
    max_seq_length: Annotated[Optional[int], typer.Option(help="Truncation length (default chunk_size).")] = None,  # noqa: UP045, E501
    micro_batch_size: Annotated[int, typer.Option(help="Micro batch size for the padding estimate.")] = 4,
    train_batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 4,
    num_train_epochs: Annotated[int, typer.Option(help="Epochs, for the time estimate.")] = 3,
    pack_sequences: Annotated[bool, typer.Option(help="Estimate with packing.")] = False,
    peft_method: Annotated[str, typer.Option(help="lora, qlora or full, for the time estimate.")] = "lora",
    estimate: Annotated[bool, typer.Option(help="Time a few real training steps to estimate duration.")] = True,
    chat_template: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Chat template for chat rows: chatml, llama-2, llama-3, mistral, gemma, phi-3 or Jinja "
        "(default: the base's own).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="Estimate memory with gradient checkpointing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a JSONL file and report rows, tokens, truncation, packing fill, the training's peak memory
    against this machine's device, and estimated training time."""
    from tunery.chat_templates import chat_template_problem
    from tunery.train.preflight import check_data, render_report

    if chat_template is not None and (problem := chat_template_problem(chat_template)):
        _fail(TuneryError(f"--chat-template: {problem}"))
    try:
        report = check_data(
            file, base=base, chunk_size=chunk_size, max_seq_length=max_seq_length,
            micro_batch_size=micro_batch_size, train_batch_size=train_batch_size,
            num_train_epochs=num_train_epochs, pack_sequences=pack_sequences,
            peft_method=peft_method, estimate=estimate, chat_template=chat_template,
            gradient_checkpointing=gradient_checkpointing,
        )
    except TuneryError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_report(report, out)


# -- models -------------------------------------------------------------------------------

@models_app.command("list")
def models_list() -> None:
    """Registered base model names (any HF id, model directory or .gguf path also works)."""
    from tunery.models.registry import REGISTRY

    for e in REGISTRY.values():
        where = f"embedded via {e.install_hint}" if e.gguf_package else e.hf_id
        out.print(f"{e.name:24} {e.description}  [dim]({where})[/]")


# -- demo ---------------------------------------------------------------------------------

@app.command()
def demo(
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o")] = None,  # noqa: UP045
    max_steps: Annotated[int, typer.Option(help="Cap on optimizer steps (-1: all epochs).")] = -1,
) -> None:
    """The main job on the embedded defaults: fine-tune SmolLM2-135M on the bundled sample, then predict."""
    from tunery.demo import run_demo

    try:
        run_demo(output_dir=output_dir, max_steps=max_steps, console=err)
    except TuneryError as exc:
        _fail(exc)


# -- the service ----------------------------------------------------------------------------
# These modules import neither torch nor transformers at load, so the CLI stays quick to start.

from tunery.client.commands import models_create, predictions_app, trainings_app  # noqa: E402
from tunery.server.cli import bases_app, owners_app, serve_command, tokens_app, worker_command  # noqa: E402

models_app.command("create")(models_create)
app.command("serve")(serve_command)
app.command("worker")(worker_command)
app.add_typer(tokens_app, name="tokens")
app.add_typer(owners_app, name="owners")
app.add_typer(trainings_app, name="trainings")
app.add_typer(predictions_app, name="predictions")
app.add_typer(bases_app, name="bases")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
