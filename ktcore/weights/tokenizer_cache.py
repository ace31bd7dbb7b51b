"""Tokenizers converted from GGUF metadata, kept on disk so that only the first load of a model converts.

Transformers rebuilds a fast tokenizer from a GGUF vocabulary at every load (Gemma 3's 262k tokens and the
merges it derives from them: 5-10 s); reading the result back from its ``tokenizer.json`` takes a fraction of
that. An entry is ``<cache>/tokenizers/<key>/`` holding ``tokenizer.json`` (the converted backend) and
``kwargs.json`` (the tokenizer class and the arguments it was built with). The key hashes the file's
``tokenizer.*`` metadata (as bytes), its architecture, the model type and the Transformers and tokenizers
versions, so a changed file or library never reads a stale entry. ``<cache>`` is ``$KTCORE_CACHE``, else
``$XDG_CACHE_HOME/ktcore``, else ``~/.cache/ktcore``. Entries are written to a temporary folder and renamed
into place (a reader never sees half of one); an unreadable entry is rebuilt with a warning; where nothing
can be written the tokenizer is built in memory, also with a warning.

Reading an entry holds the GIL (tokenizers' ``from_file``) and is most of a large vocabulary's load: Gemma 3's
262k tokens and 515k merges take about 0.9 s, the merges half of it. An entry stores a BPE's merges as
``"left right"`` strings, which tokenizers reads about a quarter faster than ``[left, right]`` pairs (one string
to allocate per merge, not two and a list); pairs stay where a piece holds a space (the string form splits at it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from ..tune_cache import cache_dir

FORMAT = 3  # bump when what an entry holds changes (2: tokenizer.ggml.pre splits, e.g. kimi-k2; 3: merges as strings)
TOKENIZER_FILE = "tokenizer.json"
KWARGS_FILE = "kwargs.json"


def entry_key(header, model_type: str) -> str:
    """What identifies the converted tokenizer of the file ``header`` (a ``GGUFHeader``) describes."""
    import tokenizers
    import transformers

    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}|{model_type}|transformers {transformers.__version__}|tokenizers {tokenizers.__version__}"
             .encode())
    for key in header.fields:
        if key.startswith("tokenizer.") or key == "general.architecture":
            h.update(header.raw(key))
    return h.hexdigest()


def entry_dir(key: str) -> Path:
    return cache_dir() / "tokenizers" / key


def load(key: str, cls):
    """The cached tokenizer of ``key`` as an instance of ``cls``, or ``None`` when there is none (an
    unreadable entry is removed, with a warning, so that the caller rebuilds it)."""
    folder = entry_dir(key)
    if not (folder / KWARGS_FILE).is_file():
        return None
    try:
        meta = json.loads((folder / KWARGS_FILE).read_text(encoding="utf-8"))
        if meta.get("class") != _class_name(cls):
            raise ValueError(f"it holds a {meta.get('class')}, this Transformers builds a {_class_name(cls)}")
        return cls(tokenizer_file=str(folder / TOKENIZER_FILE), **meta["kwargs"])
    except Exception as exc:  # noqa: BLE001 -- whatever a damaged file raises, the entry is rebuilt
        warnings.warn(f"ktcore: the cached tokenizer {folder} is unreadable ({type(exc).__name__}: {exc}); "
                      "rebuilding it", stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def store(key: str, cls, backend, kwargs: dict) -> Path | None:
    """Write ``backend`` (a ``tokenizers.Tokenizer``) and ``kwargs`` as the entry of ``key``; returns its folder,
    or ``None`` (with a warning) when it cannot be written."""
    folder = entry_dir(key)
    try:
        meta = json.dumps({"class": _class_name(cls), "kwargs": kwargs}, ensure_ascii=False)
    except TypeError:
        return None  # arguments that are not plain data (older Transformers): build in memory, silently
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        try:
            (tmp / TOKENIZER_FILE).write_text(compact_merges(backend.to_str()), encoding="utf-8")
            (tmp / KWARGS_FILE).write_text(meta, encoding="utf-8")
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / KWARGS_FILE).is_file():  # not a concurrent writer's finished entry
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        warnings.warn(f"ktcore: cannot cache the converted tokenizer in {folder.parent} ({exc}); it is rebuilt "
                      "at every load (set KTCORE_CACHE to a writable folder)", stacklevel=2)
        return None
    return folder


def compact_merges(text: str) -> str:
    """The tokenizer JSON ``text`` with a BPE model's merges as ``"left right"`` strings (see the module's note),
    unchanged when it has none or a piece is empty or holds a space."""
    data = json.loads(text)
    merges = (data.get("model") or {}).get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 and all(p and " " not in p for p in m)
                             for m in merges):
        return text
    data["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data, ensure_ascii=False)


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
