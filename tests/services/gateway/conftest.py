"""The gateway tests share their request set (ms_rest_cases) and HTTP helpers (gateway_client) as plain modules."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
