"""Where peft-depth joins peft's save, push and load paths (installed by ``import peft_depth``).

peft 0.21 gives a tuner no say in how its adapter is saved, carded or loaded: ``PeftModel.save_pretrained`` writes
the card itself, ``push_to_hub`` (transformers' mixin) then overwrites README.md with a generic card, and
``load_adapter`` only *warns* about missing keys and reads ``adapter_model.bin`` (pickle) when no safetensors file
exists. So four ``PeftModel`` entry points are wrapped. Every wrapper checks whether the adapters involved are
peft-depth adapters and otherwise calls peft's original untouched, so LoRA and every other method behave exactly as
without the plugin.

For peft-depth adapters:

- ``save_pretrained``: refuses ``safe_serialization=False``; records the base model's facts in the config (checked
  on load by ``DepthTuner``); renders the method's model card into README.md.
- ``_upload_modified_files`` (the last step of ``push_to_hub``): renders the card again, with the repo id and
  revision, over the generic card transformers put there.
- ``load_peft_weights`` (module function used by ``load_adapter``): reads ``adapter_model.safetensors`` only, after
  validating its header against the file size; ``adapter_model.bin`` is refused.
- ``load_adapter``: missing or unexpected adapter keys raise ``ValueError`` instead of a warning (a partial load
  would silently run a half-initialised adapter).
- ``inject_adapter_in_model`` (peft's function behind transformers' ``model.add_adapter`` / ``model.load_adapter``):
  refused for methods that keep state on the tuner (MoLEx gates, MoD ensembles, DLO new layers and routers), as
  peft refuses its own ``shadow``: the function keeps only the model and drops the tuner, so those weights would be
  neither trained, saved nor loaded (transformers' ``load_adapter`` then ran the base model with a load report).
  MoLA, whose weights all live in its layers, goes through ``add_adapter``, but not transformers' ``load_adapter``
  (marked by a wrapper of ``PeftAdapterMixin.load_adapter``): transformers loads the weights with its own loader,
  which reads pickles, only logs missing keys and writes a file's extra keys into the base model.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import threading
import warnings
from typing import Any

import huggingface_hub
import peft.mapping
import peft.peft_model
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft import PeftConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from torch import nn

from ..core.config import DepthPeftConfig
from ..core.snapshot import ModelSnapshot
from ..core.tuner import check_adapter_name
from .model_card import write_model_card
from .safetensors_check import check_safetensors_file

__all__ = ["install", "is_depth_adapter_source", "resolve_safetensors_file"]

#: Keys of the weights the last peft-depth load read (set by load_peft_weights, consumed by load_adapter).
_LAST_LOADED = threading.local()
#: ``depth``: how many of transformers' ``load_adapter`` calls are in progress on this thread.
_TRANSFORMERS_LOAD = threading.local()
#: ``(peft_model, adapter_name)`` of the load_adapter call in progress on this thread (its weights file is checked
#: against that adapter's own keys before any tensor is read).
_LOAD_TARGET = threading.local()
_HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "proxies", "repo_type", "local_files_only")


def _depth_adapter_names(model: PeftModel, names: list[str] | None = None) -> list[str]:
    names = list(model.peft_config) if names is None else list(names)
    return [n for n in names if isinstance(model.peft_config.get(n), DepthPeftConfig)]


def _mark(wrapper: Any) -> Any:
    wrapper._peft_depth_hook = True
    return wrapper


# ---------------------------------------------------------------------------------------------------- save / push


def _write_card_or_warn(model: PeftModel, folder: str, **kwargs: Any) -> None:
    """The card is documentation: an install without the templates keeps peft's card rather than failing a save."""
    try:
        write_model_card(model, folder, **kwargs)
    except FileNotFoundError as error:
        warnings.warn(f"peft-depth kept peft's model card: {error}", stacklevel=3)


def _wrap_save_pretrained(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, save_directory, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        depth = _depth_adapter_names(self, arguments.get("selected_adapters"))
        if not depth:
            return original(self, save_directory, *args, **kwargs)
        for name in depth:
            check_adapter_name(name)  # a name is a folder under save_directory: never a path out of it
        if not arguments.get("safe_serialization", True):
            raise ValueError(
                "peft-depth adapters are saved as safetensors only (adapter_model.bin is a pickle, which can run code "
                "when loaded); drop `safe_serialization=False`."
            )
        embedding_layers = arguments.get("save_embedding_layers", "auto")
        if embedding_layers is True:
            raise ValueError(
                "peft-depth adapters do not save whole embedding layers (`save_embedding_layers=True`), and their "
                "loads refuse them: an adapter never overwrites base weights. Train embeddings through "
                "`trainable_token_indices` or `modules_to_save`, which are saved as the adapter's own tensors."
            )
        if "save_embedding_layers" in signature.parameters:
            # "auto" would look the base model's config up on the Hub to see whether the vocabulary grew
            arguments["save_embedding_layers"] = False
        facts = getattr(self.base_model, "base_model_facts", None)
        # written for the save only: the caller's config object stays as it was, reusable on another base model
        filled = [self.peft_config[name] for name in depth if self.peft_config[name].base_model_facts is None]
        for config in filled if facts else ():
            config.base_model_facts = dict(facts)
        try:
            result = original(*bound.args, **bound.kwargs)
        finally:
            for config in filled:
                config.base_model_facts = None
        if arguments.get("is_main_process", True):
            _write_card_or_warn(self, save_directory, adapter_names=depth)
        return result

    return _mark(save_pretrained)


def _wrap_upload_modified_files(original: Any) -> Any:
    @functools.wraps(original)
    def _upload_modified_files(self: Any, working_dir: str, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self, PeftModel) and _depth_adapter_names(self):
            # transformers' push_to_hub saved a generic (or the remote) card over ours; render ours with the repo id.
            _write_card_or_warn(
                self,
                working_dir,
                adapter_names=_depth_adapter_names(self),
                repo_id=repo_id,
                revision=kwargs.get("revision"),  # the branch pushed to: the card's snippets load from it
            )
        return original(self, working_dir, repo_id, *args, **kwargs)

    return _mark(_upload_modified_files)


# ---------------------------------------------------------------------------------------------------- load


def is_depth_adapter_source(model_id: str, **hub_kwargs: Any) -> bool:
    """Whether the adapter_config.json at ``model_id`` (folder or repo, with ``subfolder``) is a peft-depth one."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        peft_type = PeftConfig._get_peft_type(model_id, **hub_kwargs)
    except Exception:  # no readable config: peft's own loader raises its usual error
        return False
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    return isinstance(config_cls, type) and issubclass(config_cls, DepthPeftConfig)


def resolve_safetensors_file(model_id: str, **hub_kwargs: Any) -> str:
    """Local path of ``adapter_model.safetensors`` for a folder or Hub repo; ValueError if there is none.

    ``adapter_model.bin`` is never downloaded or read.
    """
    subfolder = hub_kwargs.get("subfolder") or None
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(path):
            return path
        found = (
            " (it holds only adapter_model.bin, a pickle, which is refused)"
            if os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
            else ""
        )
        raise ValueError(
            f"No {SAFETENSORS_WEIGHTS_NAME} in {folder}{found}; peft-depth adapters load from safetensors only."
        )
    kwargs = {k: hub_kwargs[k] for k in _HUB_KWARGS if hub_kwargs.get(k) is not None}
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        kwargs["local_files_only"] = True
    try:
        return hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError) as error:
        raise ValueError(
            f"{model_id!r}{f' (subfolder {subfolder!r})' if subfolder else ''} has no {SAFETENSORS_WEIGHTS_NAME}; "
            f"peft-depth adapters load from safetensors only and never read {WEIGHTS_NAME} (a pickle). ({error})"
        ) from error


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _header_budget(expected: dict[str, Any]) -> int:
    """Most header bytes a file holding exactly ``expected`` can need: each entry's name, dtype, shape and offsets
    (generously), plus room for metadata."""
    return 64 * 1024 + sum(len(name) + 256 + 24 * len(tensor.shape) for name, tensor in expected.items())


def _check_header_matches_adapter(
    path: str, header: dict[str, dict], expected: dict[str, Any], adapter_name: str
) -> None:
    """The file must hold exactly the adapter's own keys, with their shapes, as floating-point tensors.

    Checked from the header, before any tensor data is read: a key outside the adapter (e.g. a base weight such as
    ``lm_head.weight``) would otherwise be written into the base model by ``load_state_dict(strict=False)``.
    """
    unexpected = sorted(set(header) - set(expected))
    missing = sorted(set(expected) - set(header))
    wrong_shape = [
        f"{name}: {header[name]['shape']} (expected {list(expected[name].shape)})"
        for name in sorted(set(header) & set(expected))
        if list(header[name]["shape"]) != list(expected[name].shape)
    ]
    wrong_dtype = [
        f"{name}: {entry['dtype']}" for name, entry in sorted(header.items()) if entry["dtype"] not in _FLOAT_DTYPES
    ]
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s), which an adapter load never writes (e.g. {unexpected[:3]})"
        )
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) of the wrong shape (e.g. {wrong_shape[:3]})")
    if wrong_dtype:
        problems.append(
            f"{len(wrong_dtype)} non-floating-point tensor(s) (allowed dtypes: {sorted(_FLOAT_DTYPES)}; e.g. "
            f"{wrong_dtype[:3]})"
        )
    if problems:
        raise ValueError(
            f"{path} does not hold the adapter {adapter_name!r} its config builds: " + "; ".join(problems) + ". "
            "Nothing was read from it; peft-depth loads exactly the adapter's own tensors."
        )


def _remapped(header: dict[str, dict], key_mapping: dict[str, str] | None) -> dict[str, dict]:
    """The header's names as peft's ``load_peft_weights`` renames them with ``key_mapping`` (a model's
    ``_checkpoint_conversion_mapping``): first matching pattern wins, the ``base_model[.model].`` prefix kept."""
    if not key_mapping:
        return header
    renamed = {}
    for key, entry in header.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
        name = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            new_name, count = re.subn(pattern, replacement, name)
            if count:
                name = new_name
                break
        renamed[prefix + name] = entry
    return renamed


def _check_finite(path: str, weights: dict[str, Any]) -> None:
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {len(bad)} tensor(s) (e.g. {sorted(bad)[:3]}).")


def _wrap_load_peft_weights(original: Any) -> Any:
    @functools.wraps(original)
    def load_peft_weights(model_id: str, device: str | None = None, key_mapping: Any = None, **hub_kwargs: Any):
        target = getattr(_LOAD_TARGET, "value", None)
        # a peft-depth adapter by its config on the model (``from_pretrained(..., config=...)`` never reads the folder's
        # config) or by the folder's adapter_config.json
        depth_target = target is not None and isinstance(target[0].peft_config.get(target[1]), DepthPeftConfig)
        if not depth_target and not is_depth_adapter_source(model_id, **hub_kwargs):
            return original(model_id, device=device, key_mapping=key_mapping, **hub_kwargs)
        path = resolve_safetensors_file(model_id, **hub_kwargs)
        if depth_target:
            model, adapter_name = target
            expected = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
            header = check_safetensors_file(path, max_header_bytes=_header_budget(expected))
            _check_header_matches_adapter(path, _remapped(header, key_mapping), expected, adapter_name)
        else:
            check_safetensors_file(path)
        try:
            # The folder now holds a validated safetensors file, which peft's loader prefers; no Hub access remains.
            weights = original(os.path.dirname(path), device=device, key_mapping=key_mapping)
        except Exception as error:
            if type(error).__name__ == "SafetensorError":
                raise ValueError(f"{path} could not be read as safetensors: {error}") from error
            raise
        _check_finite(path, weights)
        _LAST_LOADED.keys = set(weights)
        return weights

    return _mark(load_peft_weights)


def _is_depth_load(model_id: Any, config: Any, hub_kwargs: dict[str, Any]) -> bool:
    if config is not None:
        return isinstance(config, DepthPeftConfig)
    keys = ("subfolder", *_HUB_KWARGS)
    return isinstance(model_id, (str, os.PathLike)) and is_depth_adapter_source(
        str(model_id), **{k: hub_kwargs[k] for k in keys if k in hub_kwargs}
    )


def _wrap_load_adapter(original: Any) -> Any:
    @functools.wraps(original)
    def load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        existing = isinstance(self.peft_config.get(adapter_name), DepthPeftConfig)
        if not existing and not _is_depth_load(model_id, None, kwargs):
            return original(self, model_id, adapter_name, *args, **kwargs)
        # a failed load leaves the model exactly as it was: no half-built adapter, hook or rewired layer
        snapshot = ModelSnapshot(self)
        _LAST_LOADED.keys = None
        _LOAD_TARGET.value = (self, adapter_name)  # read by load_peft_weights, called inside peft's load_adapter
        try:
            result = original(self, model_id, adapter_name, *args, **kwargs)
            _check_loaded_keys(self, model_id, adapter_name, result)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            _LOAD_TARGET.value = None
            _LAST_LOADED.keys = None
        return result

    return _mark(load_adapter)


def _check_loaded_keys(model: PeftModel, model_id: Any, adapter_name: str, result: Any) -> None:
    loaded_keys = _LAST_LOADED.keys
    if not isinstance(model.peft_config.get(adapter_name), DepthPeftConfig) or result is None:
        return
    # peft's own missing-key list keeps only keys containing the method prefix (or the adapter name), which drops
    # e.g. the lora_A/B of methods that carry LoRA; so compare with the full set of keys this adapter saves.
    missing = list(getattr(result, "missing_keys", []) or [])
    if loaded_keys is not None:
        expected = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        missing = sorted(set(expected) - loaded_keys)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ValueError(
            f"Adapter {adapter_name!r} from {model_id!r} does not match the adapter its config builds: "
            + " and ".join(parts)
            + " keys. peft-depth refuses partial loads; the weights file belongs to another config or model."
        )


def _wrap_from_pretrained(original: Any) -> Any:
    function = original.__func__

    @functools.wraps(function)
    def from_pretrained(cls: type, model: Any, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config")
        if len(args) >= 3:  # (adapter_name, is_trainable, config, ...)
            config = args[2]
        if not isinstance(model, nn.Module) or not _is_depth_load(model_id, config, kwargs):
            return function(cls, model, model_id, *args, **kwargs)
        snapshot = ModelSnapshot(model)
        try:
            return function(cls, model, model_id, *args, **kwargs)
        except BaseException:
            snapshot.restore()  # the caller's base model, exactly as it was
            raise

    return _mark(classmethod(from_pretrained))


def _check_tokenizer_fits_base(adapter_path: str, peft_config: PeftConfig, kwargs: dict[str, Any]) -> None:
    """Refuse the embedding resize ``AutoPeftModel*`` makes when the adapter folder or repo ships a larger tokenizer.

    peft then calls ``resize_token_embeddings``, which writes new, randomly initialised rows into the base model; a
    peft-depth adapter never holds embedding rows, so those tokens would run on noise. Checked from the two configs,
    before the base model is loaded, with peft's own test for whether it will load a tokenizer (a local
    ``tokenizer_config.json``, else one in the Hub repo) and the same tokenizer arguments.
    """
    from peft.utils.constants import TOKENIZER_CONFIG_NAME
    from peft.utils.other import check_file_exists_on_hf_hub
    from transformers import AutoConfig, AutoTokenizer

    token = kwargs.get("token", kwargs.get("use_auth_token"))
    revision = kwargs.get("revision")
    if not os.path.exists(os.path.join(adapter_path, TOKENIZER_CONFIG_NAME)) and not check_file_exists_on_hf_hub(
        repo_id=adapter_path,
        filename=TOKENIZER_CONFIG_NAME,
        revision=revision,
        repo_type=kwargs.get("repo_type"),
        token=token,
    ):
        return
    # As peft's own tokenizer load: remote code only when the caller asked for it. Left at None, transformers would
    # ask on the terminal whether to run the adapter folder's tokenizer code.
    trust_remote_code = kwargs.get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(
        adapter_path, revision=revision, token=token, trust_remote_code=trust_remote_code
    )
    tokenizer_size = len(tokenizer)
    base_path = peft_config.base_model_name_or_path
    base_config = AutoConfig.from_pretrained(
        base_path, revision=peft_config.revision, trust_remote_code=trust_remote_code
    )
    text_config = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    vocab_size = getattr(text_config, "vocab_size", None)
    if vocab_size is not None and tokenizer_size > vocab_size:
        raise ValueError(
            f"The tokenizer in {adapter_path} has {tokenizer_size} tokens but the base model {base_path!r} has "
            f"{vocab_size} embedding rows: AutoPeftModel would resize the embeddings, giving the new tokens random "
            "vectors the adapter does not hold (peft-depth adapters never write base weights). Load the base "
            "yourself, decide how to initialise new rows, and call `PeftModel.from_pretrained(base, path)`."
        )


def _wrap_auto_from_pretrained(original: Any) -> Any:
    function = original.__func__

    @functools.wraps(function)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {key: kwargs[key] for key in (*_HUB_KWARGS, "subfolder") if kwargs.get(key) is not None}
        if is_depth_adapter_source(path, **hub_kwargs):  # a folder or a Hub repo, as peft's AutoPeftModel reads it
            config = kwargs.get("config") or PeftConfig.from_pretrained(path, **hub_kwargs)
            _check_tokenizer_fits_base(path, config, kwargs)
        return function(cls, pretrained_model_name_or_path, *args, **kwargs)

    return _mark(classmethod(from_pretrained))


def _wrap_transformers_load_adapter(original: Any) -> Any:
    """Mark transformers' ``load_adapter`` (also behind ``AutoModel*.from_pretrained(adapter_dir)`` and
    ``pipeline(model=adapter_dir)``) as in progress on this thread, for ``inject_adapter_in_model`` to refuse."""

    @functools.wraps(original)
    def load_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_TRANSFORMERS_LOAD, "depth", 0)
        _TRANSFORMERS_LOAD.depth = depth + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _TRANSFORMERS_LOAD.depth = depth

    return _mark(load_adapter)


def _wrap_inject_adapter_in_model(original: Any) -> Any:
    @functools.wraps(original)
    def inject_adapter_in_model(peft_config: PeftConfig, model: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(peft_config, DepthPeftConfig) and getattr(_TRANSFORMERS_LOAD, "depth", 0):
            # Refused before the injection, so the caller's model is untouched.
            raise ValueError(
                f"transformers' `load_adapter` (also used by `AutoModel*.from_pretrained(adapter_dir)` and "
                f"`pipeline(model=adapter_dir)`) reads a {type(peft_config).__name__} adapter's weights with its own "
                "loader, which runs none of peft-depth's load checks: it reads `adapter_model.bin` pickles, only "
                "logs missing keys, and lets extra keys in the file overwrite base weights such as `lm_head`. Load "
                "it with `PeftModel.from_pretrained(model, path)` (a pipeline accepts the PeftModel it returns)."
            )
        if isinstance(peft_config, DepthPeftConfig):
            from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

            tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_config.peft_type)
            names = tuple(getattr(tuner_cls, "tuner_module_names", ()))
            if names:
                method = str(peft_config.peft_type.value if hasattr(peft_config.peft_type, "value") else "")
                raise ValueError(
                    f"{method or type(peft_config).__name__} keeps adapter weights on the tuner ({', '.join(names)}), "
                    "which `inject_adapter_in_model` - and so transformers' `model.add_adapter()` / "
                    "`model.load_adapter()` - drops. Use `peft.get_peft_model(model, config)` to add it and "
                    "`PeftModel.from_pretrained(model, path)` to load it."
                )
            losses, _ = peft_config.training_needs()
            if losses and not peft_config.inference_mode:
                # the losses and routing statistics are collected through the tuner (core.aux), which this path
                # never builds: aux_losses(model) would be {} and a loop adding it would train without the loss
                raise ValueError(
                    f"{type(peft_config).__name__} trains with an auxiliary loss ({', '.join(losses)}) that its "
                    "tuner collects, and `inject_adapter_in_model` - and so transformers' `model.add_adapter()` - "
                    "builds no tuner: `peft_depth.aux_losses(model)` would return {} and training would drop the "
                    "loss silently. Use `peft.get_peft_model(model, config)`, or set the coefficient to 0 to inject "
                    "the layers without that loss."
                )
        return original(peft_config, model, *args, **kwargs)

    return _mark(inject_adapter_in_model)


def install() -> None:
    """Wrap peft's entry points (idempotent; non-peft-depth adapters are unaffected)."""
    hooks = (
        (PeftModel, "save_pretrained", _wrap_save_pretrained),
        (PeftModel, "_upload_modified_files", _wrap_upload_modified_files),
        (PeftModel, "load_adapter", _wrap_load_adapter),
    )
    for owner, name, wrap in hooks:
        current = getattr(owner, name)
        if not getattr(current, "_peft_depth_hook", False):
            setattr(owner, name, wrap(current))
    if not getattr(PeftModel.__dict__["from_pretrained"], "_peft_depth_hook", False):
        PeftModel.from_pretrained = _wrap_from_pretrained(PeftModel.__dict__["from_pretrained"])
    from peft.auto import _BaseAutoPeftModel

    if not getattr(_BaseAutoPeftModel.__dict__["from_pretrained"], "_peft_depth_hook", False):
        _BaseAutoPeftModel.from_pretrained = _wrap_auto_from_pretrained(_BaseAutoPeftModel.__dict__["from_pretrained"])
    if not getattr(peft.peft_model.load_peft_weights, "_peft_depth_hook", False):
        peft.peft_model.load_peft_weights = _wrap_load_peft_weights(peft.peft_model.load_peft_weights)
    from transformers.integrations.peft import PeftAdapterMixin

    if not getattr(PeftAdapterMixin.load_adapter, "_peft_depth_hook", False):
        PeftAdapterMixin.load_adapter = _wrap_transformers_load_adapter(PeftAdapterMixin.load_adapter)
    # transformers imports it from the package at call time; direct users may import it from peft.mapping
    for owner in (peft, peft.mapping):
        if not getattr(owner.inject_adapter_in_model, "_peft_depth_hook", False):
            owner.inject_adapter_in_model = _wrap_inject_adapter_in_model(owner.inject_adapter_in_model)
