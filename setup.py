"""Only what pyproject.toml cannot say: ship the top-level configs/ inside the wheel as eslora/configs.

The example configs stay at configs/ for the README's commands in a clone, and `eslora train demo`
finds the shipped copy after `pip install` (eslora.cli.shipped_configs_dir).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["eslora", "eslora.*"]), "eslora.configs"],
    package_dir={"eslora.configs": "configs"},
)
