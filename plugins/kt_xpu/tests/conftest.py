import sys
from pathlib import Path

# the helpers next to the tests (xpu_samples) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "xpu: needs an Intel GPU with an XPU build of torch")
