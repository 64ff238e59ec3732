"""The one place where peft-depth extends peft's closed ``PeftType`` enum and registers its methods.

peft 0.21 has no plugin discovery and ``PeftType`` is a closed ``(str, Enum)``: ``register_peft_method`` refuses a
name that is not already a member. We add members the way ``EnumMeta`` itself does on CPython, so that
``PeftType("MOLA")``, ``PeftType["MOLA"]``, pickling, deep copies and the JSON written to ``adapter_config.json``
behave exactly as for built-in members. Everything here is idempotent: importing the package twice, or reloading a
method module, registers nothing twice.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.peft_types import PeftType, register_peft_method

__all__ = ["add_peft_type", "register_depth_method"]


def add_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member called ``name``, adding it to the enum if it is not there yet."""
    if not name.isupper() or not name.replace("_", "").isalnum():
        raise ValueError(f"PeftType names are upper-case identifiers, got {name!r}.")
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # EnumType.__setattr__ refuses to rebind members, so go through type's own __setattr__.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_depth_method(*, name: str, config_cls: type, model_cls: type[BaseTuner]) -> PeftType:
    """Register one peft-depth method with peft (idempotent).

    ``name`` is the lower-case method name; the adapter-parameter prefix is ``name + "_"`` and must equal
    ``model_cls.prefix``.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name.upper())
    registered_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered_config is not None:
        if registered_config.__qualname__ != config_cls.__qualname__:
            raise KeyError(f"PeftType {peft_type.value} is already registered to {registered_config!r}.")
        # A module reload created new classes with the same names: point peft at the current ones.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    return peft_type
