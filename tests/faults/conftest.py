"""Fault tests of gloo ranks use the launcher and hooks of ``tests/distributed`` (``dist_util``, ``dist_hooks``).

That directory goes on ``sys.path`` here, before the test modules are imported;
ranks started with ``spawn`` inherit the parent's ``sys.path``, so they find the
same modules.
"""

from __future__ import annotations

import os
import sys

_DISTRIBUTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed")
if _DISTRIBUTED not in sys.path:
    sys.path.append(_DISTRIBUTED)
