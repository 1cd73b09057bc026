"""Chat templates by name, for a base whose tokenizer has none (base Llama 2, most pretrained
bases) or for a user who wants another: the `chat_template` training input is one of NAMES or a
Jinja template of its own (as transformers' `tokenizer.chat_template` takes it).

The template is set on the tokenizer before the data is tokenized, so it is saved with the run's
tokenizer and everything that reads that tokenizer uses it: predictions and the OpenAI chat API,
evaluation, the merged export and the Ollama Modelfile (export/ollama.py translates it).

Each named template renders what its family's own instruct models were trained on, with the markers
as text: on a base whose vocabulary lacks them (`<|eot_id|>` on a Llama 2 base) they are
tokenized as ordinary text, and the model learns them like any other.
"""

from __future__ import annotations

from typing import Any

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta's Llama 2 chat format: the system prompt inside the first [INST], each exchange its own
# <s>[INST] ... [/INST] answer </s>.
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

LLAMA_3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral's instruct format; a system prompt goes before the first user message, as Mistral's own
# templates put it.
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if loop.first and system %}{{ system + '\\n\\n' }}{% endif %}{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Gemma 2/3: turns are "user" and "model"; a system prompt opens the first user turn (Gemma 3's way).
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}{% if loop.first and system %}{{ system + '\\n\\n' }}{% endif %}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

PHI_3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama-2": LLAMA_2, "llama-3": LLAMA_3, "mistral": MISTRAL, "gemma": GEMMA,
             "phi-3": PHI_3}
NAMES = tuple(TEMPLATES)


def chat_template_problem(value: str) -> str | None:
    """Why `value` is not a chat template input (a name of NAMES, or a Jinja template that compiles
    and renders a chat), or None."""
    if value in TEMPLATES:
        return None
    if "{{" not in value and "{%" not in value:
        return f"unknown chat template {value!r}: give one of {', '.join(NAMES)}, or a Jinja template"
    try:
        _render_probe(value)
    except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception
        return f"the Jinja chat template does not render a chat: {exc}"
    return None


def resolve_chat_template(value: str) -> str:
    """The Jinja template of a chat_template input (a name, or a template as it is)."""
    return TEMPLATES.get(value, value)


def apply_chat_template(tokenizer: Any, value: str | None) -> None:
    """Set the chat_template input (a name or Jinja) on `tokenizer`; None keeps the tokenizer's own."""
    if value:
        tokenizer.chat_template = resolve_chat_template(value)


def generation_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """A chat as the prompt text the engines take (they tokenize it with the tokenizer's special
    tokens, as training tokenized prompts): the template's rendering with the generation prompt,
    less a BOS the template writes first when the tokenizer adds one itself (never two)."""
    return without_runtime_bos(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True))


def without_runtime_bos(tokenizer: Any, text: str) -> str:
    """`text` less a leading BOS when the tokenizer adds one itself on encoding (so that a prompt
    never carries two): what the engines, and an exported model's runtime, are given."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        return text[len(bos):]
    return text


def _render_probe(template: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    render: Any = render_jinja_template  # returns (texts, generation indices), whatever its annotation says
    rendered, _ = render(
        conversations=[[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
        chat_template=template, add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
    return rendered[0]
