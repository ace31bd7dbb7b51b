import sys
from pathlib import Path

# the helpers next to the tests (ascend_samples) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "npu: needs an Ascend NPU with torch_npu")
