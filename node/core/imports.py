"""Imports a command can do without: optional libraries kept out of a short-lived process.

pydicom imports numpy, Pillow, the pylibjpeg plugins, pyjpegls, requests and tqdm when
they are installed (pixel handlers and decoders, its test-data downloader) but works
without them, as documented. ``cxr-node push`` never touches pixel data, and its start-up
is time in which the receiving PACS idles, so those imports are kept out of it (measured in
bench/RESULTS.md, fifth session, "Push start-up").
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# what pydicom imports only if it can, and the push tool never uses
PUSH_NEVER_USES = (
    "numpy",
    "PIL",
    "pylibjpeg",
    "openjpeg",
    "libjpeg",
    "rle",
    "jpeg_ls",
    "requests",
    "tqdm",
)


@contextlib.contextmanager
def hidden(names: tuple[str, ...]) -> Iterator[None]:
    """While the block runs, ``import name`` raises ImportError for each of ``names`` that
    is not already imported (Python's own convention: ``sys.modules[name] = None``).

    Modules imported in the block keep believing those libraries are absent. Afterwards
    ``sys.modules`` is as before for them, so later code can still import them.
    """
    if any(not name or "." in name for name in names):
        raise ValueError(f"hidden() takes top-level module names, got {names!r}")
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
