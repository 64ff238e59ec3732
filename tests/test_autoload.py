"""``pip install peft-depth`` makes ``import peft`` register the methods: tools that never import peft_depth load
peft-depth adapters as they are (lm-eval's ``peft=``, ``AutoPeftModelForCausalLM``, Hub snippets).

Each test runs a fresh interpreter whose site directory holds ``peft_depth_autoload.pth`` as a wheel install places
it (``site.addsitedir`` processes it as Python does at start-up), so the result does not depend on how this
environment installed the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from hub_cases import METHODS, adapted

REPO = Path(__file__).resolve().parents[1]
PTH = REPO / "src" / "peft_depth_autoload.pth"
AUTOLOAD = REPO / "src" / "_peft_depth_autoload.py"


def _run(code: str, site_dir: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    # a wheel install puts the .pth and the module it imports side by side in site-packages
    (site_dir / PTH.name).write_text(PTH.read_text())
    (site_dir / AUTOLOAD.name).write_text(AUTOLOAD.read_text())
    # -S: no site-packages processing at start, so this environment's own install of the hook plays no part; then the
    # hook's directory first, as a wheel install has it, and the environment's packages after it
    purelib = sysconfig.get_paths()["purelib"]
    prelude = f"import site, sys; site.addsitedir({str(site_dir)!r}); site.addsitedir({purelib!r})\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_overrides}
    env.pop("PEFT_DEPTH_NO_AUTOLOAD", None) if "PEFT_DEPTH_NO_AUTOLOAD" not in env_overrides else None
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True, env=env, timeout=300
    )


def test_importing_peft_registers_the_methods(tmp_path):
    result = _run(
        "from peft.utils import PeftType\n"
        "print(sorted(m for m in ('MOLA', 'MOLEX', 'MOD', 'DLO') if m in PeftType.__members__))\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['DLO', 'MOD', 'MOLA', 'MOLEX']"


def test_the_hook_is_cheap_at_start_up_and_can_be_switched_off(tmp_path):
    start_up = _run("print('torch' in sys.modules, 'peft' in sys.modules, 'peft_depth' in sys.modules)", tmp_path)
    assert start_up.returncode == 0, start_up.stderr[-3000:]
    assert start_up.stdout.strip() == "False False False"  # nothing heavy is imported until peft is
    off = _run(
        "import peft\nfrom peft.utils import PeftType\nprint('MOLA' in PeftType.__members__, 'peft_depth' in sys.modules)",
        tmp_path,
        PEFT_DEPTH_NO_AUTOLOAD="1",
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert off.stdout.strip() == "False False"


@pytest.mark.parametrize("method", METHODS)
def test_auto_peft_model_loads_an_adapter_in_a_script_that_never_imports_peft_depth(tmp_path, method):
    model, pristine = adapted(method)
    pristine.save_pretrained(tmp_path / "base")
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    inputs = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    result = _run(
        "import torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'adapter')!r})\n"
        "with torch.no_grad():\n"
        f"    logits = model(input_ids=torch.tensor({inputs.tolist()})).logits\n"
        f"print(float((logits - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max()))\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # another process may take other float kernel paths (DLO differs by ~5e-8 there); a wrong load differs by >1e-2
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-6


def test_the_wheel_installs_the_hook(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("peft_depth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "peft_depth_autoload.pth" in names and "_peft_depth_autoload.py" in names
    assert zipfile.ZipFile(wheel).read("peft_depth_autoload.pth").decode().strip() == "import _peft_depth_autoload"
