"""``python -m metatrail.server server|push|pull|token|peer …``."""

from __future__ import annotations

import sys

from metatrail.server.commands import main

sys.exit(main())
