"""The built wheel: its files, and the commit it records for bench."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("mamba2_cli-*.whl"))


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def commit_seen_by(site: Path) -> str:
    return subprocess.run([sys.executable, "-c", "from mamba2_cli.bench import build_commit; print(build_commit())"],
                          cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_wheel_holds_the_assets_and_the_build_commit(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    asset_dir = ROOT / "src" / "mamba2_cli" / "assets" / "tiny-code"
    for f in asset_dir.iterdir():
        assert f"mamba2_cli/assets/tiny-code/{f.name}" in names
    info = zipfile.ZipFile(wheel).read("mamba2_cli/_build_info.py").decode()
    assert f"COMMIT = '{git('rev-parse', '--short', 'HEAD')}" in info


def test_an_install_inside_another_repository_reports_its_own_commit(wheel, tmp_path):
    # A virtual environment inside some project: that project's git must not answer.
    project = tmp_path / "project"
    site = project / "venv" / "site-packages"
    site.mkdir(parents=True)
    git("init", "-q", cwd=project)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "other", cwd=project)
    zipfile.ZipFile(wheel).extractall(site)
    built = zipfile.ZipFile(wheel).read("mamba2_cli/_build_info.py").decode().split("COMMIT = ")[1].strip().strip("'")
    assert commit_seen_by(site) == built != git("rev-parse", "--short", "HEAD", cwd=project)
    (site / "mamba2_cli" / "_build_info.py").unlink()  # not built from git: unknown, still not the project's
    assert commit_seen_by(site) == "unknown"
