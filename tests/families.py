"""Tiny random-weight models of real architectures, with tokenizers of the real kind, built locally.

`make_family(name, folder)` writes a model folder the way the family's Hub repository looks: the
transformers architecture with its own config class (2 layers, 64 wide), `model.safetensors`, a
generation config, and a tokenizer of the family's kind trained here on a small English corpus:

- SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3), trained with the
  `sentencepiece` trainer and loaded through transformers' tokenizer class for the family, so the
  folder holds both `tokenizer.json` and the SentencePiece `tokenizer.model`;
- byte-level BPE (Llama 3, Qwen), trained with the `tokenizers` library behind the family's own
  pre-tokenizer split regex;

with the family's special tokens and chat template (none for base Llama 2). The weights are seeded
and drawn wider than transformers' default (see INIT), so a few LoRA steps can teach a tiny model a
short answer. Nothing is downloaded. Trained tokenizers are cached in the process; the trainings
take hundredths of a second, so a folder costs a few hundredths once transformers has imported
the model code (two or three seconds, the first time).
"""

from __future__ import annotations

import functools
import io
import tempfile
from pathlib import Path

FAMILIES = ("llama-2", "llama-3", "mistral", "qwen2.5", "qwen3", "gemma-2", "gemma-3", "phi-3")

# The same small shape for every family (head_dim 16); kv heads 2 where the architecture has GQA.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, HEAD_DIM = 64, 2, 4, 2, 128, 16
# Weights drawn 10x wider than transformers' default (0.02): at 64 wide, 0.02 leaves every logit
# within about ±1.5, and a LoRA (which leaves the output layer frozen) cannot make any token likely
# (its loss stays near log(vocab)); at 0.2 a dozen LoRA steps teach a short answer, so tests can
# check that what a run predicts is what it was trained to say.
INIT = 0.2

# Llama 3's and Qwen2's split regexes, as in their tokenizer.json files (Qwen splits every digit).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# --- chat templates, as the families' instruct models ship them -----------------------------------

# Llama 3.1 / 3.3 Instruct: a system block always (knowledge and today's date), tools optional.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral 7B Instruct v0.2: [INST] turns, the answer right after [/INST], eos after each answer.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen2.5 Instruct: ChatML with a default system message, tools optional.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3 (hybrid thinking): the last assistant turn after the last user query gets a <think> block.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Gemma 2 it: no system role, user/model turns that must alternate.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma 3 it: a system message is folded into the first user turn; content may be a list of parts.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Phi-3 / Phi-3.5 mini instruct.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# --- the corpus the tokenizers are trained on -----------------------------------------------------

_PROSE = """\
The quick brown fox jumps over the lazy dog. A small cat sleeps on the warm mat by the door.
Hello! How are you today? I am fine, thank you, and I hope you are well too.
Once upon a time there was a little village at the edge of a great forest. The people there
grew wheat and barley, kept bees and cows, and sold honey at the market every Friday.
Please extract the booking as name, party size, day and time. Table for four on Friday at 19:00.
Summarize the conversation in one sentence. The user asked for the weather and the assistant answered.
What colour is the sky? Blue, on a clear day. What is two plus two? Four.
You are a helpful assistant. Answer the question briefly and politely.
def add(a, b):
    return a + b  # the sum of two numbers
Numbers like 12345, 3.14 and 2024 appear in text, and so do dates such as 26 Jul 2024.
It's a nice day; we're going out, they've left, I'll stay, she'd say, you'd agree.
The red owl, the blue bee, the green eel and the yellow yak met at the old oak tree.
[INST] Where do the bees live? [/INST] In the hive [1] by the (old) garden wall {north side}.
The system prompt, the user turn, the assistant turn and the model turn; <b>bold</b> and <i>italic</i>.
"""
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]


@functools.cache
def corpus() -> tuple[str, ...]:
    """A few hundred lines of plain English, including the words the tests' data uses."""
    lines = [line for line in _PROSE.splitlines() if line.strip()]
    for i, c in enumerate(_COLORS):
        for j, a in enumerate(_ANIMALS):
            lines.append(f"Item: the {c} {a}.\nAnimal: {a}\nColor: {c}")
            lines.append(f"The {c} {a} number {i * 8 + j} sat in the garden and looked at the sky.")
    return tuple(lines) * 2


# --- tokenizers -------------------------------------------------------------------------------------

SPM_VOCAB = 640
BPE_VOCAB = 768


@functools.cache
def _spm_model(kind: str) -> bytes:
    """A SentencePiece BPE model with byte fallback, trained as the family's was (Llama 2's
    trainer settings; Gemma's ids and no dummy prefix)."""
    import sentencepiece as spm

    options = dict(
        model_type="bpe", vocab_size=SPM_VOCAB, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    if kind == "gemma":
        options.update(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False,
                       pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                       user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"])
    else:
        options.update(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, **options)
    return buf.getvalue()


def _spm_tokenizer(kind: str, cls, **kwargs):
    """The SentencePiece model loaded through transformers' tokenizer class for the family (the
    .model file converted to tokenizer.json, as from_pretrained does for a Hub repository)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(_spm_model(kind))
        tok = cls.from_pretrained(tmp, **kwargs)
        tok.vocab_file = None  # the temporary copy goes; make_family writes tokenizer.model itself
    return tok


@functools.cache
def _byte_level_bpe(split: str) -> str:
    """A byte-level BPE trained behind `split` (Llama 3's or Qwen's regex); its tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=split == LLAMA3_SPLIT))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def _llama3_tokenizer():
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_byte_level_bpe(LLAMA3_SPLIT))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    # Llama 3.1 Instruct: eos is the end of turn; tokenizer_class PreTrainedTokenizerFast.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   model_max_length=131072, clean_up_tokenization_spaces=True)


def _qwen_tokenizer(qwen3: bool):
    import json

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    model = json.loads(_byte_level_bpe(QWEN2_SPLIT))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072,
                         errors="replace", split_special_tokens=False)
    # Qwen's order: <|endoftext|>, <|im_start|>, <|im_end|>, then (Qwen3) <think> and </think>, not special.
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")], special_tokens=True)
    if qwen3:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok


def _gemma_tokenizer():
    from transformers import GemmaTokenizer

    tok = _spm_tokenizer("gemma", GemmaTokenizer, add_bos_token=True, add_eos_token=False)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def _phi3_tokenizer():
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    tok = _spm_tokenizer("llama", LlamaTokenizer, add_bos_token=False, add_eos_token=False, legacy=False)
    # Phi-3's added tokens follow the Llama 2 vocabulary: <|endoftext|> (eos and pad), then the turns.
    tok.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
                    for t in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")],
                   special_tokens=True)
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    return tok


@functools.cache
def _tokenizer(name: str):
    from transformers import LlamaTokenizer

    if name in ("llama-2", "mistral"):
        return _spm_tokenizer("llama", LlamaTokenizer, add_bos_token=True, add_eos_token=False, legacy=False)
    if name == "llama-3":
        return _llama3_tokenizer()
    if name in ("qwen2.5", "qwen3"):
        return _qwen_tokenizer(name == "qwen3")
    if name in ("gemma-2", "gemma-3"):
        return _gemma_tokenizer()
    if name == "phi-3":
        return _phi3_tokenizer()
    raise ValueError(f"unknown family {name!r}: one of {', '.join(FAMILIES)}")


TEMPLATES = {"llama-3": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "qwen2.5": QWEN25_TEMPLATE,
             "qwen3": QWEN3_TEMPLATE, "gemma-2": GEMMA2_TEMPLATE, "gemma-3": GEMMA3_TEMPLATE, "phi-3": PHI3_TEMPLATE}


def tokenizer_for(name: str):
    """A fresh copy of the family's tokenizer (trained once per process), with its chat template."""
    import copy

    tok = copy.deepcopy(_tokenizer(name))
    tok.chat_template = TEMPLATES.get(name)
    return tok


# --- models -----------------------------------------------------------------------------------------


def _padded(n: int, multiple: int = 64) -> int:
    """Qwen's and Phi-3's embeddings are larger than their tokenizers (151936 rows for 151665
    tokens; 32064 for 32011): the same here, rounded up to a multiple of 64."""
    return -(-n // multiple) * multiple


def _config(name: str, tok):
    """The family's own config class at the tiny shape, with its real quirks (rope, biases, norms,
    sliding windows, soft-capping, tied embeddings, several eos ids)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    ids = tok.convert_tokens_to_ids
    shape = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, initializer_range=INIT)
    if name == "llama-2":
        return LlamaConfig(**shape, vocab_size=len(tok), max_position_embeddings=4096, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "llama-3":
        return LlamaConfig(**shape, vocab_size=len(tok), max_position_embeddings=131072, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                           eos_token_id=[ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
                           pad_token_id=None,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    if name == "mistral":
        return MistralConfig(**shape, vocab_size=len(tok), max_position_embeddings=32768, rms_norm_eps=1e-5,
                             sliding_window=None, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "qwen2.5":
        return Qwen2Config(**shape, vocab_size=_padded(len(tok)), max_position_embeddings=32768, rms_norm_eps=1e-6,
                           use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS,
                           tie_word_embeddings=True, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                           pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "qwen3":
        return Qwen3Config(**shape, head_dim=HEAD_DIM, vocab_size=_padded(len(tok)), max_position_embeddings=40960,
                           rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False, sliding_window=None,
                           max_window_layers=LAYERS, tie_word_embeddings=True, bos_token_id=ids("<|endoftext|>"),
                           eos_token_id=ids("<|im_end|>"), pad_token_id=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "gemma-2":
        return Gemma2Config(**shape, head_dim=HEAD_DIM, vocab_size=len(tok), max_position_embeddings=8192,
                            query_pre_attn_scalar=HEAD_DIM, sliding_window=4096, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                            tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=[tok.eos_token_id, ids("<end_of_turn>")])
    if name == "gemma-3":
        # Gemma 3 1B: text only (Gemma3ForCausalLM), local sliding layers between global ones.
        return Gemma3TextConfig(**shape, head_dim=HEAD_DIM, vocab_size=len(tok), max_position_embeddings=32768,
                                query_pre_attn_scalar=HEAD_DIM, sliding_window=512,
                                layer_types=["sliding_attention", "full_attention"],
                                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=[tok.eos_token_id, ids("<end_of_turn>")])
    if name == "phi-3":
        return Phi3Config(**shape, vocab_size=_padded(len(tok)), max_position_embeddings=4096,
                          original_max_position_embeddings=4096, sliding_window=2047, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise ValueError(f"unknown family {name!r}: one of {', '.join(FAMILIES)}")


def _generation_eos(name: str, tok) -> list[int] | None:
    """The eos ids the instruct models' generation_config.json lists (the end of turn besides eos)."""
    ids = tok.convert_tokens_to_ids
    return {
        "llama-3": [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")],
        "qwen2.5": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "qwen3": [ids("<|im_end|>"), ids("<|endoftext|>")],
        "gemma-2": [tok.eos_token_id, ids("<end_of_turn>")],
        "gemma-3": [tok.eos_token_id, ids("<end_of_turn>")],
        "phi-3": [ids("<|endoftext|>"), ids("<|assistant|>"), ids("<|end|>")],
    }.get(name)


_MODEL_CLASSES = {"llama-2": "LlamaForCausalLM", "llama-3": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma-2": "Gemma2ForCausalLM",
                  "gemma-3": "Gemma3ForCausalLM", "phi-3": "Phi3ForCausalLM"}


def make_family(name: str, folder: Path) -> Path:
    """Write a tiny random `name` model (one of FAMILIES) into `folder` (created) and return it:
    config.json, generation_config.json, model.safetensors, the tokenizer files (tokenizer.json,
    tokenizer_config.json, and tokenizer.model for SentencePiece families) and the chat template
    (chat_template.jinja) where the family has one. Seeded: the same name gives the same weights."""
    import torch
    import transformers

    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: one of {', '.join(FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(name)
    config = _config(name, tok)
    torch.manual_seed(0)
    model = getattr(transformers, _MODEL_CLASSES[name])(config)
    eos = _generation_eos(name, tok)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if name in ("llama-2", "mistral", "phi-3"):
        (folder / "tokenizer.model").write_bytes(_spm_model("llama"))
    elif name in ("gemma-2", "gemma-3"):
        (folder / "tokenizer.model").write_bytes(_spm_model("gemma"))
    return folder
