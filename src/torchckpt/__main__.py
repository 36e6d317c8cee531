"""``python -m torchckpt``: the torchckpt command."""

import sys

from .cli import main

sys.exit(main())
