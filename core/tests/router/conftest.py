"""Router test fixtures: helper modules beside these tests and the server tests' subprocess helpers are importable."""

import sys
from pathlib import Path

for _path in (Path(__file__).parent, Path(__file__).parents[1] / "entrypoints" / "openai"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
