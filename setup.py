"""Build step: record the git commit the package is built from (bench reports it).

Everything else about the package is in pyproject.toml. The commit is written into the
built package as mamba2_cli/_build_info.py; a build outside a git checkout records
"unknown".
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def source_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"  # the files built are not that commit's
        return commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class BuildWithCommit(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "mamba2_cli" / "_build_info.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f'"""Written when the package was built."""\n\nCOMMIT = {source_commit()!r}\n')


setup(cmdclass={"build_py": BuildWithCommit})
