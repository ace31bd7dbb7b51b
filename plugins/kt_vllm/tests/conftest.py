"""kt-vllm's tests: ``test_kt_vllm_hybrid.py`` needs no vLLM (main venv; its CUDA-graph test runs on a CUDA
host); ``test_vllm_engine.py`` needs vLLM and is left out where it is not installed (./run-tests runs it in
``.venv-vllm``, ``tox -e vllm`` in its own env)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["test_vllm_engine.py"]
