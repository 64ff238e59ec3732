"""How a transformers model hands its KV cache to a call: found by what it is, not by the keyword's name.

Methods that call a decoder block a second time (MoLEx's expert passes), read how much the cache already holds (MoD's
sequence router), or must refuse a cache (DLO's block skipping) need the cache of a call. transformers has renamed
that argument before (``layer_past`` → ``past_key_value`` → ``past_key_values`` → ``cache`` in 5.24, the old name kept
as a deprecated alias), and code that looks for one name silently stops seeing it: expert passes then write into
the model's real cache and the adapter computes a different function with no error.

So this module is the one place that knows the convention. A call's cache is the ``transformers.Cache`` instance among
its arguments, whatever its keyword. The keyword must be one transformers is known to use; a cache under any other
name, or ``use_cache`` on with no cache at all, is a calling convention this version of peft-depth does not know, and
raises ``CallConventionError`` naming the transformers version rather than computing something else. The one legal
"use_cache without a cache" is activation checkpointing, where transformers drops the cache (GPT-2 drops it before
the block is called, while ``use_cache`` stays on).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache

__all__ = [
    "CACHE_KEYWORDS",
    "BlockCall",
    "CallConventionError",
    "bind_block_call",
    "call_cache",
    "checkpointing_active",
    "output_cache",
]

#: The keywords under which transformers passes a KV cache: ``cache`` (5.24 and later), ``past_key_values``
#: (5.x before 5.24, and the deprecated alias until 5.40), ``past_key_value`` and ``layer_past`` (older blocks).
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")


class CallConventionError(RuntimeError):
    """A model call reached peft-depth in a form it does not recognise (e.g. a KV cache under a new keyword)."""


def _convention_error(where: str, problem: str) -> CallConventionError:
    return CallConventionError(
        f"peft-depth does not recognise how transformers {transformers.__version__} calls {where}: {problem}. "
        f"peft-depth expects the KV cache as a `transformers.Cache` under one of {list(CACHE_KEYWORDS)}. Rather than "
        "compute a different function silently it stops here: please report this with your transformers version, "
        "or install a transformers release this peft-depth version supports."
    )


def _find_caches(arguments: dict[str, Any]) -> list[tuple[str, Cache]]:
    return [(name, value) for name, value in arguments.items() if isinstance(value, Cache)]


def call_cache(arguments: dict[str, Any], where: str) -> tuple[str | None, Cache | None]:
    """``(keyword, cache)`` of the ``Cache`` among ``arguments`` (``(None, None)`` if there is none).

    Raises ``CallConventionError`` for a cache under a keyword outside ``CACHE_KEYWORDS`` or for two caches.
    """
    found = _find_caches(arguments)
    if not found:
        return None, None
    if len(found) > 1:
        raise _convention_error(where, f"it passes several caches ({[name for name, _ in found]})")
    name, cache = found[0]
    if name not in CACHE_KEYWORDS:
        raise _convention_error(where, f"it passes the KV cache under the unknown keyword {name!r}")
    return name, cache


def checkpointing_active(block: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is about to run ``block`` (it then drops the cache)."""
    enabled = bool(getattr(block, "gradient_checkpointing", False))
    return enabled and block.training and torch.is_grad_enabled()


def output_cache(output: Any) -> Cache | None:
    """The ``Cache`` a model's output carries (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    values = output.values() if hasattr(output, "values") and callable(output.values) else ()
    for value in values:
        if isinstance(value, Cache):
            return value
    return None


@dataclass
class BlockCall:
    """One call of a transformer block, bound to its signature.

    Attributes:
        hidden: the hidden states (the first argument).
        arguments: every other argument by name (``**kwargs`` flattened in).
        cache_keyword: the keyword carrying the KV cache in this call, if any.
        cache: the ``Cache`` of this call, if any.
    """

    hidden: torch.Tensor
    arguments: dict[str, Any]
    cache_keyword: str | None
    cache: Cache | None

    def past_length(self, layer_index: int) -> int:
        """Positions the cache holds for block ``layer_index`` before this call (0 without a cache)."""
        if self.cache is None:
            return 0
        try:
            return int(self.cache.get_seq_length(layer_index))
        except (IndexError, KeyError):
            return int(self.cache.get_seq_length())

    def without_cache(self) -> dict[str, Any]:
        """The arguments with no cache: for calls whose keys and values must not reach the model's cache."""
        arguments = dict(self.arguments)
        if self.cache_keyword is not None:
            arguments[self.cache_keyword] = None
        if "use_cache" in arguments:
            arguments["use_cache"] = False
        return arguments

    def with_cache(self, cache: Cache) -> dict[str, Any]:
        """The arguments with ``cache`` in place of this call's cache (same keyword)."""
        if self.cache_keyword is None:
            raise ValueError("this block call carries no cache to replace")
        arguments = dict(self.arguments)
        arguments[self.cache_keyword] = cache
        return arguments


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature_key(forward: Callable[..., Any]) -> Any:
    """What a forward's signature depends on, never the instance it is bound to: the cache must not hold modules
    (it would keep every model alive and grow with each ``functools.partial`` a caller builds per call), and a bound
    method and its plain function (with ``self``) must not share an entry."""
    if isinstance(forward, functools.partial):
        return ("partial", _signature_key(forward.func), len(forward.args), tuple(sorted(forward.keywords)))
    function = getattr(forward, "__func__", None)
    if function is not None:
        return ("bound", function)
    return ("plain", forward)


def _signature(forward: Callable[..., Any]) -> inspect.Signature:
    key = _signature_key(forward)
    signature = _SIGNATURES.get(key)
    if signature is None:
        signature = _SIGNATURES[key] = inspect.signature(forward)
    return signature


def bind_block_call(block: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> BlockCall:
    """Bind a call of ``block`` (through ``forward``, its bound forward) and find its cache.

    Raises ``CallConventionError`` when the cache arrives under an unknown keyword, or when ``use_cache`` is on but
    no cache arrived outside activation checkpointing.
    """
    signature = _signature(forward)
    bound = signature.bind(*args, **kwargs)
    arguments: dict[str, Any] = {}
    hidden = None
    for position, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if position == 0:
            hidden = value
        elif kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"peft-depth cannot wrap {type(block).__name__}: its forward takes *args.")
        else:
            arguments[name] = value
    if isinstance(hidden, tuple):  # very old-style blocks received the hidden state in a tuple
        hidden = hidden[0]
    where = f"{type(block).__name__}.forward"
    keyword, cache = call_cache(arguments, where)
    if cache is None and arguments.get("use_cache") and not checkpointing_active(block):
        raise _convention_error(where, "`use_cache` is on but no `transformers.Cache` reached the block")
    return BlockCall(hidden=hidden, arguments=arguments, cache_keyword=keyword, cache=cache)
