"""Graders as OpenAI writes them (its RFT and graders API), parsed and checked.

`parse_grader(obj)` turns a grader's JSON into one of the models below or raises GraderError naming
the field at fault with a JSON-path-like location (`grader.graders.exact.operation`) and the reason.
`check_grader` then checks what a schema cannot: the templates parse and name only `item` and
`sample`, a multi grader's formula names its graders, a python grader's source compiles and defines
grade (in the sandbox), and a text_similarity metric can run here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tunery.errors import TuneryError

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                      "rouge_5", "rouge_l")
#: How deep multi graders may nest (a multi of multis of ...).
MAX_DEPTH = 4


class GraderError(TuneryError):
    """A grader that cannot be used: `field` is where (grader.graders.x.source), the message why."""

    def __init__(self, message: str, *, field: str = "grader"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)


class StringCheckGrader(_Grader):
    """1 when the rendered input and reference compare as `operation` says, else 0: eq and ne exactly,
    like when the input contains the reference, ilike the same ignoring case."""

    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_Grader):
    """The similarity of the rendered input to the reference, 0 to 1, by `evaluation_metric`."""

    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal["cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                               "rouge_4", "rouge_5", "rouge_l"]
    pass_threshold: float | None = None  # used by evals, not by fine-tuning; kept so OpenAI's JSON passes


class PythonGrader(_Grader):
    """`grade(sample, item) -> float` in [0, 1], run isolated (graders/sandbox.py)."""

    type: Literal["python"]
    source: str
    image_tag: str | None = None  # OpenAI's runtime image; there is one runtime here, the server's Python
    pass_threshold: float | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's content may be a list of text parts ({"type": "input_text", "text": ...})."""
        if isinstance(value, list):
            texts = []
            for part in value:
                if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") \
                        and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise ValueError("only text parts ({type: input_text, text}) are supported")
            return "".join(texts)
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return value["text"]
        return value


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_completions_tokens: int | None = Field(default=None, ge=1, le=8192)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    reasoning_effort: str | None = None  # accepted for OpenAI's JSON; the judges here do not reason


class ScoreModelGrader(_Grader):
    """A model served by this tunery (a base or an `ft:` model) reads `input` (its messages, templated)
    and answers with a number in `range`; that number is the score."""

    type: Literal["score_model"]
    input: list[Message] = Field(min_length=1)
    model: str = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: SamplingParams | None = None
    pass_threshold: float | None = None

    @model_validator(mode="after")
    def _range(self) -> ScoreModelGrader:
        if not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, not {list(self.range)}")
        return self


class MultiGrader(_Grader):
    """Named graders, combined by the arithmetic formula `calculate_output` (graders/formula.py)."""

    type: Literal["multi"]
    graders: dict[str, Grader]
    calculate_output: str = Field(min_length=1)

    @field_validator("graders")
    @classmethod
    def _some(cls, value: dict) -> dict:
        if not value:
            raise ValueError("a multi grader needs at least one grader")
        for key in value:
            if not key.isidentifier():
                raise ValueError(f"{key!r} cannot be named in a formula: use letters, digits and _")
        return value


Grader = Annotated[StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | MultiGrader,
                   Field(discriminator="type")]
MultiGrader.model_rebuild()
_ADAPTER: TypeAdapter = TypeAdapter(Grader)
TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")


def parse_grader(obj: Any, *, field: str = "grader") -> StringCheckGrader | TextSimilarityGrader | PythonGrader | \
        ScoreModelGrader | MultiGrader:
    """The grader `obj` describes; GraderError naming the first field at fault."""
    if not isinstance(obj, dict):
        raise GraderError(f"must be an object with a type ({', '.join(TYPES)}), not {type(obj).__name__}", field=field)
    kind = obj.get("type")
    if kind not in TYPES:
        raise GraderError(f"unknown grader type {kind!r}: the types are {', '.join(TYPES)}" if kind is not None
                          else f"has no type: the types are {', '.join(TYPES)}", field=f"{field}.type")
    try:
        grader = _ADAPTER.validate_python(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:] if not _is_union_tag(p))  # [0] is the type's tag
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "is not a field of a " + str(kind) + " grader"
        elif first["type"] == "missing":
            message = "is required"
        raise GraderError(message.removeprefix("Value error, "), field=f"{field}.{where}" if where else field) \
            from None
    _depth(grader, field, 1)
    return grader


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in TYPES


def _depth(grader, field: str, depth: int) -> None:
    if isinstance(grader, MultiGrader):
        if depth > MAX_DEPTH:
            raise GraderError(f"multi graders nest at most {MAX_DEPTH} deep", field=field)
        for key, sub in grader.graders.items():
            _depth(sub, f"{field}.graders.{key}", depth + 1)


def walk(grader, field: str = "grader"):
    """(field, grader) for the grader and every grader inside it, outermost first."""
    yield field, grader
    if isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            yield from walk(sub, f"{field}.graders.{key}")
