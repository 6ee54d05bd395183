"""Everything is in pyproject.toml; this only adds ``melayer-lm-eval.pth`` at the root of site-packages.

The .pth imports ``_melayer_lm_eval`` at interpreter start (silently skipped if it is gone), which is what lets a
bare ``lm_eval --model melayer`` find our model (lm-eval 0.4.13 reads no entry points). A wheel gets the file from
``build_lib``; an editable wheel (PEP 660, ``pip install -e .``) packs only what lies in its unpacked-wheel folder,
which editable_wheel hands us as the ``install`` command's ``install_lib``.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "melayer-lm-eval.pth"
PTH_LINE = 'import sys; exec("try: import _melayer_lm_eval\\nexcept Exception: pass")\n'


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [str(Path(self.build_lib, PTH_NAME))]
        return super().get_outputs(include_bytecode) + extra


setup(cmdclass={"build_py": build_py_with_pth})
