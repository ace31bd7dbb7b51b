"""Request field types the routes share, bounded as OpenAI documents its API (and the Ollama routes alike):
sampling values a sampler can always use, seeds that fit 64 bits, stop lists and metadata of bounded size."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .errors import APIError

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence and frequency penalties
RepeatPenalty = Annotated[float, Field(ge=0.01, le=2.0)]  # Transformers' multiplicative repetition penalty
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                          Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]

MAX_STOP_CHARS = 256  # per stop string: each one is matched against the reply's tail after every token


def stop_strings(stop: str | list[str] | None, *, most: int, param: str = "stop") -> tuple[str, ...]:
    """A stop string or list as a tuple of its non-empty strings, at most ``most`` of ``MAX_STOP_CHARS``."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > most:
        raise APIError(400, f"{param}: at most {most} stop sequences, got {len(stops)}", param=param)
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"{param}: a stop sequence may have at most {MAX_STOP_CHARS} characters", param=param)
    return tuple(s for s in stops if s)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is out of range; this model's ids are 0..{vocab_size - 1}",
                       param=param)


class StrictRequest(BaseModel):
    """A request body whose every field is either declared (implemented), listed in ``IGNORED`` (accepted
    and ignored: the reason says why that is harmless) or refused: ``check_fields`` raises a 400 naming the
    first other field that carries a value (``UNSUPPORTED`` gives a reason for the known ones). A field sent
    as null, false or empty, or as its ``NEUTRAL`` value (the one that changes nothing), passes."""

    model_config = ConfigDict(extra="allow")
    IGNORED: ClassVar[dict[str, str]] = {}
    UNSUPPORTED: ClassVar[dict[str, str]] = {}
    NEUTRAL: ClassVar[dict[str, object]] = {}


def _asks_nothing(body: StrictRequest, name: str, value) -> bool:
    if name in body.NEUTRAL and value == body.NEUTRAL[name]:
        return True
    return value is None or value is False or value == {} or value == [] or value == ""


def check_fields(body: BaseModel, where: str = "") -> None:
    """Refuse, with a 400 naming it, any field of ``body`` (and of the ``StrictRequest`` models inside it)
    that this server does not implement."""
    if isinstance(body, StrictRequest):
        for name, value in (body.model_extra or {}).items():
            if name in body.IGNORED or _asks_nothing(body, name, value):
                continue
            param = f"{where}{name}"
            reason = body.UNSUPPORTED.get(name)
            raise APIError(400, f"{param}: not supported by this server" + (f" ({reason})" if reason else ""),
                           param=param, code="unsupported_parameter")
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                check_fields(item, f"{where}{name}{f'[{i}]' if isinstance(value, list) else ''}.")


class FunctionDef(StrictRequest):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the grammar enforces the schema either way


class ToolDef(StrictRequest):
    """A tool, as OpenAI and Ollama both send it."""

    type: Literal["function"] = "function"
    function: FunctionDef

    def spec(self) -> dict:
        """The function object (name, description, parameters) the chat template and tool grammar take."""
        return self.function.model_dump(exclude_none=True, exclude={"strict"})
