"""Everything is in setup.cfg, except one build step: a wheel gets a copy of the checkout's
domain descriptors (datasets/*.toml) and recipes (recipes/**/*.toml) as package data under
da_seg/_resources/, so that an install outside the checkout knows the shipped domains and
recipes (da_seg/utils/resources.py finds them). The folders stay where they are in the checkout,
where the README and users name them by path."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
RESOURCES = {"datasets": "*.toml", "recipes": "**/*.toml"}


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout itself
            return
        for folder, pattern in RESOURCES.items():
            for path in sorted((HERE / folder).glob(pattern)):
                target = Path(self.build_lib) / "da_seg" / "_resources" / folder / path.relative_to(HERE / folder)
                self.mkpath(str(target.parent))
                self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": BuildPyWithResources})
