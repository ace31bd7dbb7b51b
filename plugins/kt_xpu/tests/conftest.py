import sys
from pathlib import Path

# the helpers next to the tests (xpu_samples) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
