import sys
from pathlib import Path

# Test helper modules (e.g. external_plugin.py) live beside the tests that use them.
sys.path.insert(0, str(Path(__file__).parent / "platforms"))
