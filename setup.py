"""Only what pyproject.toml cannot say: install ``peft_depth_autoload.pth`` at the top of site-packages.

That file makes ``import peft`` register peft-depth's methods in processes that never import peft_depth (see
``src/_peft_depth_autoload.py``). Editable installs do not run ``build_py``; ``scripts/setup_env.sh`` copies it there.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

AUTOLOAD_PTH = "peft_depth_autoload.pth"


class BuildPyWithAutoload(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("src", AUTOLOAD_PTH), os.path.join(self.build_lib, AUTOLOAD_PTH))


setup(cmdclass={"build_py": BuildPyWithAutoload})
