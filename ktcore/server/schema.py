"""Request field types the routes share, bounded as OpenAI documents its API (and the Ollama routes alike):
sampling values a sampler can always use, seeds that fit 64 bits, stop lists and metadata of bounded size."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

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
