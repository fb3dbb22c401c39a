import sys
from pathlib import Path

# Benchmarks import their helpers (synthetic, naive_merge) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
