"""Helpers shared by the tests (and by bench/): real server processes, process
statistics, NumPy oracles, the op table, random graphs, hand-built requests and wire
bytes, reference models. Test modules import from here, never from each other.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
