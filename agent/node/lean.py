"""Keep the node agent's process small (issue 12: <= 40 MB RSS on every GPU server).

Called by ``agent/cli.py`` before anything else is imported, for ``podagent node`` only. Each
entry is a module the node never uses that a library would import anyway (bench/node_cost.py):
- ``rich``: structlog's pretty tracebacks (~3.5 MB); a node logs JSON lines to journald.
- ``ssl``: asyncio imports it when it can (~1.3 MB); the pod protocol is HMAC-signed TCP, no TLS
  (docs/node.md says why).
- ``bz2``, ``lzma``: shutil's optional archive formats (pynvml's ``ctypes.util`` imports
  shutil); ``_uuid``: uuid's C helper (pydantic imports uuid; uuid4 needs no helper).
- ``pydantic.plugin._loader``: pydantic's plugin discovery imports ``importlib.metadata`` (and
  with it email, zipfile, csv, bz2, lzma: ~2 MB) to scan every installed distribution for
  plugins; podagent has none. The stand-in answers "no plugins", as ``PYDANTIC_DISABLE_PLUGINS``
  would after the import.

``release_startup_memory``, once the node is armed: what start-up freed (pydantic building the
config's validators, the first NVML read) goes back to the OS (glibc keeps freed heap pages
otherwise): ~1 MB.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import types


def _no_plugins() -> tuple[()]:
    return ()


def trim_imports() -> None:
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    for name in ("ssl", "bz2", "lzma", "_uuid"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    loader = types.ModuleType("pydantic.plugin._loader")
    loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
    sys.modules.setdefault("pydantic.plugin._loader", loader)


def release_startup_memory() -> None:
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


__all__ = ["release_startup_memory", "trim_imports"]
