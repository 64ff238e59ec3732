"""Fail a test on any deprecation warning that peft-depth's own code causes.

A deprecation reached through our code (transformers' renamed ``past_key_values``, TrainingArguments'
``gradient_checkpointing``, torch's ``all_reduce``) is the next release's breakage announced in advance; a blanket
filter hid them before. Every warning shown while a test runs passes through ``warnings._showwarnmsg`` (Python and
C-level warnings alike, also inside ``pytest.warns``/``catch_warnings``), where the Python stack still holds the code
that caused it.

A deprecation (by category, or by a message that says "deprecat") counts as ours when our code made the deprecated
call: the innermost Python frame is in ``peft_depth``, or, walking outward past the frames of the package that issued
the warning and past call plumbing (``torch.nn.Module.__call__``, checkpointing, ``functools``, accelerate's hooks),
the first other frame is. A deprecated call that peft, TRL or transformers make internally while our code is further
up the stack is theirs (e.g. peft's ``PeftModel.__init__`` reading ``is_gradient_checkpointing``). Deliberate
user-facing warnings peft-depth issues itself (UserWarning) are behaviour and are asserted by the tests that trigger
them.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import peft_depth

PACKAGE_DIR = os.path.dirname(os.path.abspath(peft_depth.__file__)) + os.sep
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@dataclass
class CaughtWarning:
    category: type
    message: str
    origin: str  # file:line of the warning
    our_frame: str  # file:line of the innermost peft_depth frame on the stack


def is_deprecation(category: type, message: str) -> bool:
    return issubclass(category, DEPRECATIONS) or "deprecat" in message.lower()


#: Modules that only pass a call through: skipped when looking for the code that made the deprecated call.
PLUMBING = (
    "torch.nn.modules",
    "torch.utils.checkpoint",
    "torch.autograd",
    "torch._dynamo",
    "functools",
    "contextlib",
    "accelerate.hooks",
)


def _module(frame) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _is_ours(frame) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR)


def _where(frame) -> str:
    return f"{os.path.abspath(frame.f_code.co_filename)[len(PACKAGE_DIR) :]}:{frame.f_lineno}"


def deprecated_call_site(frame) -> str | None:
    """``file:line`` in peft_depth of the call that caused the warning raised at ``frame``, or None if not ours."""
    if frame is None:
        return None
    if _is_ours(frame):
        return _where(frame)
    issuer = _module(frame).split(".")[0]
    while frame is not None:
        module = _module(frame)
        if module.split(".")[0] == issuer or module.startswith(PLUMBING):
            frame = frame.f_back
            continue
        return _where(frame) if _is_ours(frame) else None
    return None


class WarningGuard:
    def __init__(self) -> None:
        self.caught: list[CaughtWarning] = []
        self._original = None

    def install(self) -> None:
        original = warnings._showwarnmsg
        self._original = original

        def showwarnmsg(msg) -> None:
            self.inspect(msg, sys._getframe(1))
            original(msg)

        warnings._showwarnmsg = showwarnmsg

    def uninstall(self) -> None:
        if self._original is not None:
            warnings._showwarnmsg = self._original

    def inspect(self, msg, frame) -> None:
        text = str(msg.message)
        if not is_deprecation(msg.category, text):
            return
        ours = deprecated_call_site(frame)
        if ours is not None:
            self.caught.append(CaughtWarning(msg.category, text, f"{msg.filename}:{msg.lineno}", ours))

    def take(self) -> list[CaughtWarning]:
        caught, self.caught = self.caught, []
        return caught


GUARD = WarningGuard()


def report(caught: list[CaughtWarning]) -> str:
    lines = [f"{len(caught)} deprecation warning(s) caused by peft_depth code:"]
    for item in caught:
        lines.append(
            f"  {item.category.__name__}: {item.message}\n    at {item.origin}, via peft_depth/{item.our_frame}"
        )
    return "\n".join(lines)
