"""Per-forward state: what one top-level call of a model carries to the adapter layers deep inside it.

Adapter code inside a model (a projection in attention, a hook on the final norm) never sees the top-level call, yet
needs what it said: the padding mask, the KV cache it continues and how long that cache already is. Keeping that on
shared module objects makes every forward overwrite the previous one's; here it lives in a ``ForwardContext`` stored
in a ``contextvars.ContextVar``, so each thread (and each asyncio task) sees the context of its own latest forward.

A context is made by a forward pre-hook on the top-level model and is kept after the forward returns, until that
thread's next forward of the same model: activation-checkpoint recomputation runs during backward, after the forward
returned, and must see the same mask. A forward of the model started inside one of its own forwards (a reference pass
from a layer hook) gets a context of its own, and the outer forward's is current again when it returns: the outer
forward's remaining layers read the outer call's mask and cache and record into the outer call's state. Methods keep
their own per-forward values in ``ForwardContext.state`` under a key of their own rather than as attributes of their
modules.

A context holds what its forward saw (the cache, the layers whose records it keeps), so it must not outlive its
model: when a tracked model is garbage-collected, its context is dropped from the thread that collects it at once,
and from every other thread at that thread's next forward of any tracked model. Without that, a loop that builds,
runs and deletes models kept every deleted model's adapted layers (and their base weights) alive.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import sys
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from .checkpointing import checkpoint_pass
from .layer_call import call_cache

__all__ = [
    "ForwardContext",
    "ForwardContextTracker",
    "calls_in_progress",
    "labels_outside_the_call",
    "outside_labels",
    "padding_mask",
]

# One dict per thread/task: tracker key -> the context of that tracker's model's latest forward. Replaced, never
# mutated in place, so a context copied into another thread or task keeps its own view.
_CONTEXTS: ContextVar[dict[int, ForwardContext]] = ContextVar("peft_depth_forward_contexts")
_KEYS = itertools.count()
#: Keys of trackers whose model has been garbage-collected (keys are never reused).
_DEAD_KEYS: set[int] = set()
#: Labels of the forwards that run in ``labels_outside_the_call`` (this thread's or task's).
_OUTSIDE_LABELS: ContextVar[torch.Tensor | None] = ContextVar("peft_depth_outside_labels", default=None)


@contextlib.contextmanager
def labels_outside_the_call(labels: torch.Tensor | None) -> Iterator[None]:
    """Run forwards whose loss is computed by the caller from the logits, with ``labels`` held back from the call
    (so the model computes no loss of its own), while adapters that read the labels still see them
    (``outside_labels``): MoD distils only the positions that carry a label."""
    token = _OUTSIDE_LABELS.set(labels)
    try:
        yield
    finally:
        _OUTSIDE_LABELS.reset(token)


def outside_labels() -> torch.Tensor | None:
    """The labels ``labels_outside_the_call`` holds for the current forward (None outside it)."""
    return _OUTSIDE_LABELS.get()


def _forget(key: int) -> None:
    """Finalizer of a tracked model: drop its context here; other threads drop theirs at their next forward."""
    _DEAD_KEYS.add(key)
    contexts = _CONTEXTS.get({})
    if key in contexts:
        _CONTEXTS.set({k: v for k, v in contexts.items() if k != key})


_MODULE_CALL_CODE = nn.Module._call_impl.__code__


def _module_call_frame() -> Any:
    """The frame of torch's ``Module._call_impl`` that runs the pre-hook, on the stack exactly while the forward runs;
    None where there is none (a compiled call, whose frames dynamo replaced): nested calls are then not told apart."""
    frame = sys._getframe(1)
    for _ in range(8):  # the pre-hook, torch's inner(), _call_impl: a few frames up
        if frame is None:
            return None
        if frame.f_code is _MODULE_CALL_CODE:
            return frame
        frame = frame.f_back
    return None


def calls_in_progress(module: nn.Module) -> int:
    """How many calls of ``module`` are running in this thread (2 or more: a call nested in one of its own)."""
    count, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code is _MODULE_CALL_CODE and frame.f_locals.get("self") is module:
            count += 1
        frame = frame.f_back
    return count


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name: ``model(input_ids, attention_mask)`` passes the mask positionally."""
    if len(args) <= 1 and "attention_mask" in kwargs:
        return kwargs
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # a forward that takes *args only: keywords are all there is
        return kwargs
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})  # a **kwargs parameter's own entries
    return arguments


#: An additive attention mask blocks a key with a large negative value: the dtype's minimum in transformers, -inf, or
#: -1e4 and below in older code. Anything above is a bias on a key that may be attended (transformers >= 5.25 adds
#: Falcon's ALiBi, positive and growing with the key's position, to its mask), so "0 = attend" misreads such masks.
ADDITIVE_MASK_BLOCKED_AT = -1e4


def additive_mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive attention mask lets a query attend to a key (booleans, ``mask``'s shape)."""
    return mask > ADDITIVE_MASK_BLOCKED_AT


def padding_mask(mask: Any, past_length: int) -> torch.Tensor | None:
    """The padding mask of a forward's ``attention_mask``: ``[batch, past + seq]`` or ``[batch, seq]``, 1 = real.

    A 2-D mask is one already. A 4-D mask ``[batch, heads, seq, keys]`` (generate's with a static cache, or a
    caller's attention bias; a dict of them per attention type) hides it: there a token is real when it may attend to
    itself (its own key at ``past_length`` + its index), which holds for every real token under causal, sliding-window
    and packed-sequence masks alike, and never for padding. Anything else gives None (every token real).
    """
    if isinstance(mask, dict):  # per attention type: the full-attention one spans every key (a sliding one may not)
        tensors = [mask.get("full_attention"), *mask.values()]
        mask = next((value for value in tensors if isinstance(value, torch.Tensor)), None)
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask
    if mask.dim() != 4 or past_length + mask.shape[-2] > mask.shape[-1]:
        return None
    seq = mask.shape[-2]
    own_keys = torch.diagonal(mask[..., past_length : past_length + seq], dim1=-2, dim2=-1)  # [batch, heads, seq]
    visible = own_keys if own_keys.dtype == torch.bool else additive_mask_allows(own_keys)
    return visible.any(dim=1).long()


@dataclass
class ForwardContext:
    """What one top-level forward of a model was called with.

    Attributes:
        attention_mask: the padding mask, ``[batch, past + seq]`` as passed, or ``[batch, seq]`` read from a 4-D
            mask (``padding_mask``); None when there is none (every token real).
        cache: the KV cache the call continues, if one was passed in (a cache created inside the forward is not
            known here; see ``layer_call.output_cache``).
        past_length: positions that cache held before the call.
        state: per-forward values of the methods, each under a key of its own.
    """

    attention_mask: torch.Tensor | None = None
    cache: Cache | None = None
    past_length: int = 0
    state: dict[Any, Any] = field(default_factory=dict)
    #: The frame of the model call while its forward runs (None once it returned): a forward that raised a
    #: BaseException (KeyboardInterrupt) skips the post-hook, so whether the call still runs is read off the stack.
    #: After such an interrupt the frame (and its callers' locals) stays referenced until the model's next forward
    #: in this thread, as the interrupted forward's records do; an id would not do, since the next call's frame can
    #: reuse the address.
    call_frame: Any = field(default=None, repr=False, compare=False)
    #: The context of the forward this one runs inside (a nested call of the same model), current again at its end.
    outer: ForwardContext | None = field(default=None, repr=False, compare=False)

    def running(self) -> bool:
        """Whether this context's forward is still running in this thread (its call frame is on the stack)."""
        frame, target = sys._getframe(), self.call_frame
        if target is None:
            return False
        while frame is not None:
            if frame is target:
                return True
            frame = frame.f_back
        return False


class ForwardContextTracker:
    """Makes a ``ForwardContext`` at every top-level forward of ``model`` (a transformers model or any module)."""

    def __init__(self, model: nn.Module) -> None:
        self.key = next(_KEYS)
        self._where = f"{type(model).__name__}.forward"
        self._handle = model.register_forward_pre_hook(self._begin, with_kwargs=True)
        self._end_handle = model.register_forward_hook(self._end, always_call=True)
        self._finalizer = weakref.finalize(model, _forget, self.key)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardContextTracker:
        # A deep copy tracks another model (``copy.deepcopy(peft_model)``): it needs its own key, or the two models'
        # forwards would replace each other's contexts.
        duplicate = type(self).__new__(type(self))
        memo[id(self)] = duplicate
        for name, value in self.__dict__.items():
            if name != "_finalizer":  # set at the copy's first forward, on the copied model
                setattr(duplicate, name, copy.deepcopy(value, memo))
        duplicate.key = next(_KEYS)
        return duplicate

    def __getstate__(self) -> dict[str, Any]:
        # a pickled model (torch.save(model)) is another model once loaded: no finalizer of the original's
        return {name: value for name, value in self.__dict__.items() if name != "_finalizer"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.key = next(_KEYS)  # its own contexts, as for a deep copy

    @torch.compiler.disable
    def _track(self, module: nn.Module) -> None:
        """Drop this tracker's contexts when ``module`` is collected. A deep copy's or unpickled tracker learns its own
        model here, at its first forward; outside compiled code, since dynamo guards the finalizer registry's size
        and a registration while tracing failed that guard at once ("Guard failed on the same frame")."""
        if not self.__dict__.get("_finalizer"):
            self._finalizer = weakref.finalize(module, _forget, self.key)

    @torch.compiler.disable
    def _end_last(self, module: nn.Module) -> None:
        """Keep ``_end`` the model's last forward hook: the post-hooks methods add later (DLO's router loss) read the
        ending call's context, which ``_end`` would hand back to an outer call before them (hooks run in order)."""
        hooks = module._forward_hooks
        if hooks and next(reversed(hooks)) != self._end_handle.id and self._end_handle.id in hooks:
            hooks.move_to_end(self._end_handle.id)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.__dict__.get("_finalizer"):
            self._track(module)
        self._end_last(module)
        arguments = _call_arguments(module, args, kwargs)
        _, cache = call_cache(arguments, self._where)
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        self.begin_context(
            ForwardContext(
                attention_mask=padding_mask(arguments.get("attention_mask"), past_length),
                cache=cache,
                past_length=past_length,
                call_frame=_module_call_frame(),
                outer=self._enclosing_context(),
            )
        )

    def _enclosing_context(self) -> ForwardContext | None:
        """The context a forward starting now runs inside: a running forward of the model, or, in a reentrant
        checkpoint's replay during backward (the recording forward has returned), the context the replay reads."""
        running = self.running_context()
        if running is None and checkpoint_pass() is not None:
            return self.current
        return running

    @torch.compiler.disable
    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        """At the end of a forward (also one that raised): a nested forward hands the outer one its context back."""
        context = self.current
        if context is None or context.call_frame is None:
            return
        context.call_frame = None  # the frame's locals (the call's inputs) are not kept past the call
        outer, context.outer = context.outer, None
        if outer is not None:
            self.begin_context(outer)

    def running_context(self) -> ForwardContext | None:
        """The context of a forward of the model that is running in this thread now (None outside any)."""
        context = self.current
        return context if context is not None and context.running() else None

    def begin_context(self, context: ForwardContext) -> ForwardContext:
        """Make ``context`` this thread's current one for the model (replacing its previous forward's)."""
        contexts = {key: value for key, value in _CONTEXTS.get({}).items() if key not in _DEAD_KEYS}
        contexts[self.key] = context
        _CONTEXTS.set(contexts)
        return context

    @property
    def current(self) -> ForwardContext | None:
        """This thread's context of the model's latest forward (None before the first one)."""
        return _CONTEXTS.get({}).get(self.key)

    def remove(self) -> None:
        self._handle.remove()
        self._end_handle.remove()
        contexts = dict(_CONTEXTS.get({}))
        if contexts.pop(self.key, None) is not None:
            _CONTEXTS.set(contexts)
