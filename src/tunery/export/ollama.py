"""An Ollama Modelfile for a run's GGUF: FROM, TEMPLATE, SYSTEM and the stop parameters.

Ollama templates are Go templates, not Jinja, so the run's chat template is not copied: it is
rendered on a probe conversation (placeholder contents for a system, a user and an assistant
turn) and each role's text before and after its content is read off the rendering, together with
the generation prompt (what the template adds to ask for the assistant's turn) and the system
message it inserts when there is none. That covers the templates that frame every turn the same
way (ChatML, Llama 3, Phi-3, Zephyr, ...; a system turn written even without a system message, as
Llama 3.1's, and an eos that closes a finished conversation, as Phi-3.5's, included), or fold the system message into the first user turn
(Llama 2, Mistral, Gemma), which is what fine-tuned chat models use; a template that does anything
else (conditionals on content, turn counts) is refused rather than approximated. A run trained on prompt/completion or plain text rows gets the raw prompt.

Stops: the tokenizer's eos and, for chat runs, the end-of-turn text after the assistant's content.
"""

from __future__ import annotations

from typing import Any

from jinja2.exceptions import TemplateError

from tunery.export import ExportError

_S, _U, _A, _U2 = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01NEXT\x01"


def chat_frames(tokenizer) -> dict[str, Any]:
    """The chat template's framing of each role: {"lead": what opens every prompt, "user" |
    "assistant": (text before the content,
    text after it), "system": the system turn's own frame, or None when the template folds a system
    message into the first user turn (Llama 2, Mistral, Gemma) or has no system role (it raises on
    one: system messages are then left out), "first_user_system": when folded, the text around the
    system message inside that turn, "generation": what asks for the assistant's turn,
    "default_system": the system message the template adds when there is none ("" for a template
    that writes an empty system turn then, as Llama 3.1's does), or None}.

    A BOS the template writes first is left to the runtime, which adds it to every prompt (as the
    tokenizer does); one written between turns (Llama 2's `<s>[INST]`) stays as text. ExportError
    for a template whose turns are not framed the same way each time."""
    from tunery.chat_templates import without_runtime_bos

    bos = tokenizer.bos_token or ""
    runtime_bos = bool(bos) and not without_runtime_bos(tokenizer, bos)  # the tokenizer adds its BOS itself

    def rendered(messages: list[tuple[str, str]], generation: bool = False) -> str:
        # What the engines are given (chat_templates.generation_prompt): a leading BOS is the runtime's.
        return without_runtime_bos(tokenizer, tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=generation))

    # A template that ends a conversation with eos when it does not ask for a reply (Phi-3.5's):
    # that end is not part of any turn, and a prompt (which always asks for a reply) never has it.
    eos = tokenizer.eos_token or ""
    ending = eos if eos and rendered([("user", _U)]).endswith(eos) and not rendered(
        [("user", _U)], True).endswith(eos) else ""

    def render(messages: list[tuple[str, str]], generation: bool = False) -> str:
        text = rendered(messages, generation)
        return text[: len(text) - len(ending)] if ending and not generation and text.endswith(ending) else text

    def cut(text: str, *marks: str) -> list[str]:
        """`text` split at each mark, in order: the segments around them."""
        out = []
        for mark in marks:
            before, found, text = text.partition(mark)
            if not found:
                raise ExportError("the chat template does not render every message's content: it cannot be "
                                  "translated to an Ollama template")
            out.append(before)
        return out + [text]

    uneven = ExportError("the chat template does not frame each turn the same way: it cannot be translated to "
                         "an Ollama template")
    alone = cut(render([("user", _U)]), _U)
    user_close = alone[1]
    generation = render([("user", _U)], True)[len(render([("user", _U)])):]
    assistant_close = cut(render([("user", _U), ("assistant", _A)]), _U, _A)[2]
    turns = cut(render([("user", _U), ("assistant", _A), ("user", _U2)]), _U, _A, _U2)
    if not (turns[3] == user_close and turns[1].startswith(user_close) and turns[2].startswith(assistant_close)):
        raise uneven
    user_open = turns[2][len(assistant_close):]
    # The first user turn opens the same way, less a BOS the runtime adds itself (Llama 2's <s>[INST]).
    first_open = user_open
    if runtime_bos and not turns[0].endswith(user_open) and user_open.startswith(bos):
        first_open = user_open[len(bos):]
    if not (turns[0].endswith(first_open) and alone[0].endswith(first_open)):
        raise uneven
    assistant_open = turns[1][len(user_close):]
    head = alone[0][: len(alone[0]) - len(first_open)]
    system: tuple[str, str] | None = None
    folded: tuple[str, str] | None = None
    default_system, lead = None, head  # lead: what opens every prompt (a BOS the runtime does not add)
    try:
        before, between, after = cut(render([("system", _S), ("user", _U)]), _S, _U)
    except TemplateError:  # a template without a system role (Mistral's first): system messages are dropped
        before, between, after = "", "", None
    if after is None:
        pass
    elif after != user_close:
        raise uneven
    elif between.endswith(first_open):  # a turn of its own
        system = (before, between[: len(between) - len(first_open)])
        if head.startswith(system[0]) and head.endswith(system[1]) and len(head) >= len(system[0] + system[1]):
            # A system turn even when there is no system message (Llama 3.1's, maybe empty).
            default_system, lead = head[len(system[0]): len(head) - len(system[1])], ""
        elif before.startswith(head):
            system = (before[len(head):], system[1])
        else:
            raise uneven
    elif before.startswith(head + first_open):  # inside the first user turn
        folded = (before[len(head + first_open):], between)
    else:
        raise uneven
    return {"lead": lead, "system": system, "first_user_system": folded, "first_user_open": first_open,
            "user": (user_open, user_close),
            "assistant": (assistant_open, assistant_close), "generation": generation,
            "default_system": default_system}


def render_frames(frames: dict[str, Any], messages: list[dict], generation: bool = True) -> str:
    """What the Go template renders for `messages` (the same walk, in Python): the check that the
    frames reproduce the chat template."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if frames["default_system"] is not None and system is None:
        messages = [{"role": "system", "content": frames["default_system"]}, *messages]
    out, first = frames["lead"], True
    for m in messages:
        if m["role"] == "system":  # its own turn, folded into the first user turn, or dropped
            if frames["system"]:
                out += frames["system"][0] + m["content"] + frames["system"][1]
            continue
        before, after = frames[m["role"]]
        if m["role"] == "user" and first:
            before = frames["first_user_open"]
            if system and frames["first_user_system"]:
                before += frames["first_user_system"][0] + system + frames["first_user_system"][1]
        if m["role"] == "user":
            first = False
        out += before + m["content"] + after
    return out + (frames["generation"] if generation else "")


def go_template(frames: dict[str, Any]) -> str:
    """An Ollama (Go) template with the frames: every message in order, then the generation prompt.
    Written on one line with no whitespace-trimming actions, so every frame's own whitespace (the
    newline after ChatML's <|im_end|>) reaches the prompt as the model saw it in training."""
    def esc(text: str) -> str:
        return text.replace("{{", "{{ \"{{\" }}")

    (u_open, u_close), (a_open, a_close) = frames["user"], frames["assistant"]
    first_open = frames["first_user_open"]
    head, system, in_first = "", "", ""
    if frames["system"]:
        s_open, s_close = frames["system"]
        system = f'{{{{ else if eq $m.Role "system" }}}}{esc(s_open)}{{{{ $m.Content }}}}{esc(s_close)}'
        if frames["default_system"] == "":  # an empty system turn when there is no system message
            head = ('{{ $system := false }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = true }}'
                    f'{{{{ end }}}}{{{{ end }}}}{{{{ if not $system }}}}{esc(s_open)}{esc(s_close)}{{{{ end }}}}')
    elif frames["first_user_system"]:  # the system message opens the first user turn
        in_user, after_system = frames["first_user_system"]
        head = '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        in_first = f"{{{{ if $system }}}}{esc(in_user)}{{{{ $system }}}}{esc(after_system)}{{{{ end }}}}"
    if in_first or first_open != u_open:  # the first user turn differs from the others
        head += "{{ $first := true }}"
        opening = (f"{{{{ if $first }}}}{esc(first_open)}{in_first}{{{{ else }}}}{esc(u_open)}{{{{ end }}}}"
                   "{{ $first = false }}")
    else:
        opening = esc(u_open)
    user = f"{opening}{{{{ $m.Content }}}}{esc(u_close)}"
    return (f'{head}{esc(frames["lead"])}{{{{ range $i, $m := .Messages }}}}{{{{ if eq $m.Role "user" }}}}{user}{system}'
            f'{{{{ else if eq $m.Role "assistant" }}}}{esc(a_open)}{{{{ $m.Content }}}}{esc(a_close)}'
            f"{{{{ end }}}}{{{{ end }}}}{esc(frames['generation'])}")


def modelfile(gguf_name: str, tokenizer, data_format: str | None) -> str:
    """The Modelfile for `gguf_name` (beside it): chat runs get the translated template, others
    the raw prompt."""
    lines = [f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    chat = data_format == "messages" and getattr(tokenizer, "chat_template", None)
    if chat:
        frames = chat_frames(tokenizer)
        lines.append(f'TEMPLATE """{go_template(frames)}"""')
        if frames["default_system"]:
            lines.append(f'SYSTEM """{frames["default_system"]}"""')
        end_of_turn = frames["assistant"][1].strip()
        if end_of_turn:
            stops.append(end_of_turn)
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines.append("")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
