"""An Ollama Modelfile for a run's GGUF: FROM, TEMPLATE, SYSTEM and the stop parameters.

Ollama templates are Go templates, not Jinja, so the run's chat template is not copied: it is
rendered on a probe conversation (placeholder contents for a system, a user and an assistant
turn) and each role's text before and after its content is read off the rendering, together with
the generation prompt (what the template adds to ask for the assistant's turn) and the system
message it inserts when there is none. That covers the templates that frame every turn the same
way (ChatML, Llama 2/3, Mistral, Zephyr, ...), which is what fine-tuned chat models use; a
template that does anything else (conditionals on content, turn counts) is refused rather than
approximated. A run trained on prompt/completion or plain text rows gets the raw prompt.

Stops: the tokenizer's eos and, for chat runs, the end-of-turn text after the assistant's content.
"""

from __future__ import annotations

from typing import Any

from tunery.export import ExportError

_S, _U, _A, _U2 = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01NEXT\x01"


def chat_frames(tokenizer) -> dict[str, Any]:
    """The chat template's framing of each role: {"system" | "user" | "assistant": (text before the
    content, text after it), "generation": what asks for the assistant's turn, "default_system":
    the system message the template adds when there is none, or None}. ExportError for a template
    whose turns are not framed the same way each time."""
    def render(messages: list[tuple[str, str]], generation: bool = False) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=generation)

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

    seg = cut(render([("system", _S), ("user", _U), ("assistant", _A), ("user", _U2)]), _S, _U, _A, _U2)
    alone = cut(render([("user", _U)]), _U)
    user_close = alone[1]
    generation = render([("user", _U)], True)[len(render([("user", _U)])):]
    assistant_close = cut(render([("user", _U), ("assistant", _A)]), _U, _A)[2]
    same = [seg[4] == user_close, seg[2].startswith(user_close), seg[3].startswith(assistant_close)]
    user_open = seg[3][len(assistant_close):]
    same.append(seg[1].endswith(user_open) and alone[0].endswith(user_open))
    if not all(same):
        raise ExportError("the chat template does not frame each turn the same way: it cannot be translated to "
                          "an Ollama template")
    assistant_open = seg[2][len(user_close):]
    system_open, system_close = seg[0], seg[1][: len(seg[1]) - len(user_open)]
    head = alone[0][: len(alone[0]) - len(user_open)]
    default_system = None
    if head.startswith(system_open) and head.endswith(system_close) and len(head) > len(system_open + system_close):
        default_system = head[len(system_open): len(head) - len(system_close)]
    return {"system": (system_open, system_close), "user": (user_open, user_close),
            "assistant": (assistant_open, assistant_close), "generation": generation or assistant_open,
            "default_system": default_system}


def render_frames(frames: dict[str, Any], messages: list[dict], generation: bool = True) -> str:
    """What the Go template renders for `messages` (the same walk, in Python): the check that the
    frames reproduce the chat template."""
    out = ""
    if frames["default_system"] and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": frames["default_system"]}, *messages]
    for m in messages:
        before, after = frames[m["role"]]
        out += before + m["content"] + after
    return out + (frames["generation"] if generation else "")


def go_template(frames: dict[str, Any]) -> str:
    """An Ollama (Go) template with the frames: every message in order, then the generation prompt."""
    def esc(text: str) -> str:
        return text.replace("{{", "{{ \"{{\" }}")

    (s_open, s_close), (u_open, u_close), (a_open, a_close) = frames["system"], frames["user"], frames["assistant"]
    return ("{{- range $i, $m := .Messages }}"
            f'{{{{- if eq $m.Role "system" }}}}{esc(s_open)}{{{{ $m.Content }}}}{esc(s_close)}'
            f'{{{{- else if eq $m.Role "user" }}}}{esc(u_open)}{{{{ $m.Content }}}}{esc(u_close)}'
            f'{{{{- else if eq $m.Role "assistant" }}}}{esc(a_open)}{{{{ $m.Content }}}}{esc(a_close)}'
            "{{- end }}{{- end }}"
            f"{esc(frames['generation'])}")


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
