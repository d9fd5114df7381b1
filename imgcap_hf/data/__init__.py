"""Caption data; the next commit splits `shapes.py` (the former `data.py`) into one module per source."""

from .shapes import *  # noqa: F403
