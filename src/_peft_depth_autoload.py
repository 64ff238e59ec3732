"""Register peft-depth's methods with peft in processes that never ``import peft_depth``.

peft looks a method up by its ``peft_type`` and has no plugin discovery, so a script that only imports peft
(lm-eval's ``peft=``, ``AutoPeftModelForCausalLM.from_pretrained(adapter)``, a Hub snippet) failed with
``KeyError: 'MOLA'``. The wheel installs ``peft_depth_autoload.pth``, which imports this module at interpreter start.
It only puts a finder on ``sys.meta_path`` (no import of torch or peft, a few microseconds); when ``peft`` itself is
imported, the finder lets it load and then imports ``peft_depth``, which registers the methods.

Opt out with the environment variable ``PEFT_DEPTH_NO_AUTOLOAD=1``. A failure to import peft-depth never breaks
peft: it becomes a warning.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["install"]

_OPT_OUT = "PEFT_DEPTH_NO_AUTOLOAD"


class _PeftImportWatcher:
    """Meta-path finder that wraps the loader of ``peft`` so that ``peft_depth`` is imported right after it."""

    def __init__(self) -> None:
        self._searching = threading.local()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "peft" or getattr(self._searching, "active", False):
            return None
        import importlib.util

        self._searching.active = True
        try:
            spec = importlib.util.find_spec("peft")  # the other finders' answer
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_peft(module)
            self.remove()
            _import_peft_depth()

        spec.loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def _import_peft_depth() -> None:
    try:
        import peft_depth  # noqa: F401  (registers MoLA, MoLEx, MoD and DLO with peft)
    except Exception as error:  # never break `import peft`
        import warnings

        warnings.warn(
            f"peft-depth could not register its methods with peft ({type(error).__name__}: {error}); peft-depth "
            f"adapters will not load in this process. Set {_OPT_OUT}=1 to silence this.",
            stacklevel=2,
        )


def install() -> None:
    """Register on ``import peft`` (now, if peft is already imported); a no-op under ``PEFT_DEPTH_NO_AUTOLOAD``."""
    if os.environ.get(_OPT_OUT, "").strip().lower() not in ("", "0", "false", "no"):
        return
    if "peft" in sys.modules:
        _import_peft_depth()
        return
    if not any(isinstance(finder, _PeftImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportWatcher())


install()
