import os
import sys
from pathlib import Path

# Test helpers (fixtures modules) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))
# Two cores on CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
