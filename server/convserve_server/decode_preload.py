"""Imported by the decode processes' fork server only: Pillow and all its plugins, loaded once.

Each decode process is forked from that server, so it finds them loaded; importing them on its first
image took 0.1 s.  The server process itself never imports this module: it loads Pillow only when it
first tells an encoded image's format.
"""

from __future__ import annotations

from PIL import Image

Image.init()
