"""The one place where peft's closed PeftType enum is extended, and peft's own loaders finding our methods."""

import copy
import importlib
import json
import os
import pickle
import subprocess
import sys

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_depth
from peft_depth.core.peft_registration import add_peft_type, register_depth_method
from peft_depth.tuners.mola import MoLAConfig, MoLAModel


def test_member_behaves_like_a_builtin_peft_type():
    member = PeftType.MOLA
    assert PeftType("MOLA") is member
    assert PeftType["MOLA"] is member
    assert member == "MOLA" and member.value == "MOLA" and member.name == "MOLA"
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    assert json.dumps({"peft_type": member}) == '{"peft_type": "MOLA"}'
    assert "MOLA" in list(PeftType)
    assert PeftType.LORA in list(PeftType)  # built-in members untouched


def test_add_peft_type_is_idempotent_and_rejects_bad_names():
    assert add_peft_type("MOLA") is PeftType.MOLA
    count = len(PeftType._member_names_)
    add_peft_type("MOLA")
    assert len(PeftType._member_names_) == count
    with pytest.raises(ValueError, match="upper-case"):
        add_peft_type("mola")


def test_registration_maps_config_and_tuner_and_survives_reload():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOLA] is MoLAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MOLA] is MoLAModel
    # re-registering the same classes (e.g. a second import path) is a no-op
    register_depth_method(name="mola", config_cls=MoLAConfig, model_cls=MoLAModel)
    # reloading the method package runs its registration again: still one member, still our classes
    count = len(PeftType._member_names_)
    importlib.reload(importlib.import_module("peft_depth.tuners.mola"))
    assert len(PeftType._member_names_) == count
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOLA].__qualname__ == "MoLAConfig"


def test_a_different_class_cannot_take_a_registered_name():
    class OtherConfig(PeftConfig):
        pass

    with pytest.raises(KeyError, match="already registered"):
        register_depth_method(name="mola", config_cls=OtherConfig, model_cls=MoLAModel)


def test_peft_config_from_pretrained_finds_the_plugin_config(tmp_path):
    MoLAConfig(num_experts=4, top_k=1, target_modules=["q_proj"]).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoLAConfig)
    assert loaded.num_experts == 4 and loaded.top_k == 1


def test_loading_without_the_plugin_fails_and_works_after_import(tmp_path):
    MoLAConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    code = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    # the autoload hook (src/_peft_depth_autoload.py) would register the methods on `import peft`: switch it off
    no_autoload = {**os.environ, "PEFT_DEPTH_NO_AUTOLOAD": "1"}
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_autoload)
    # peft's own lookup of the unknown method, not any other crash
    assert without.returncode != 0 and "KeyError: 'MOLA'" in without.stderr, without.stderr[-2000:]
    with_plugin = subprocess.run([sys.executable, "-c", "import peft_depth; " + code], capture_output=True, text=True)
    assert with_plugin.returncode == 0, with_plugin.stderr


def test_public_names():
    for name in ("MoLAConfig", "aux_losses", "routing_stats"):
        assert hasattr(peft_depth, name)


def test_the_trainer_module_is_reachable_from_a_plain_import():
    """The README calls `peft_depth.trainer.set_training_step(...)` after `import peft_depth`; the trainer (and TRL)
    load only then, in a fresh interpreter where nothing imported them before."""
    code = (
        "import sys, peft_depth; assert 'trl' not in sys.modules; "
        "print(callable(peft_depth.trainer.set_training_step), 'trl' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]
