"""Server test fixtures: helper modules beside these tests are importable (also by child processes)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
