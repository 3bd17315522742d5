"""The package as it is published and as a new user installs it.

The sdist and the wheel are built from this tree as a release would be (``python -m build``:
the sdist, then the wheel from the unpacked sdist), offline (``--no-isolation``: the test
extra brings ``build`` and ``flit_core``). Then: what the sdist holds, what the wheel holds,
the tests run from the unpacked sdist, and a new user's path: a fresh virtual environment,
``pip install`` of the wheel (its dependencies from the package index), ``asyncbatch
--version``, ``asyncbatch help troubleshooting`` (the page an error message points to) and
``asyncbatch demo`` from there.
"""

from __future__ import annotations

import ensurepip
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import asyncbatch

ROOT = Path(__file__).resolve().parent.parent
VERSION = asyncbatch.__version__
SOURCES = ("asyncbatch", "tests", "examples")


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


def run(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command outside this test environment: no venv or path settings leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [os.fspath(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=out)
    assert built.returncode == 0, built.stdout + built.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


def fresh_venv_pip(venv: Path) -> list[str]:
    """Make a fresh virtual environment at ``venv``; the arguments after its ``python`` that run
    pip in it: the pip wheel bundled with this Python (the one ``python -m venv`` would install)
    run from the wheel itself, when there is one (installing it costs ~5-10 s of the test); else
    the venv's own pip."""
    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if bundled:
        made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    else:
        made = run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    assert made.returncode == 0, made.stderr
    return [f"{bundled[-1]}/pip"] if bundled else ["-m", "pip"]


def tree_files(*tops: str) -> set[str]:
    """The files under ``tops`` in this tree, as relative POSIX paths, bytecode left out."""
    return {
        path.relative_to(ROOT).as_posix()
        for top in tops
        for path in (ROOT / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_sdist_holds_what_building_and_testing_need_and_nothing_else(dists: Dists) -> None:
    top = f"asyncbatch-{VERSION}"
    assert dists.sdist.name == f"{top}.tar.gz"
    with tarfile.open(dists.sdist) as tar:
        members = tar.getmembers()
        files = {m.name.removeprefix(f"{top}/"): m for m in members if m.isfile()}
        assert all(m.name == top or m.name.startswith(f"{top}/") for m in members)
        license_text = tar.extractfile(files["LICENSE"]).read()  # type: ignore[union-attr]
        pkg_info = tar.extractfile(files["PKG-INFO"]).read().decode()  # type: ignore[union-attr]
    assert {name.split("/")[0] for name in files} == {
        "LICENSE",
        "PKG-INFO",
        "README.md",
        "pyproject.toml",
        *SOURCES,
    }  # so no benchmarks/ (nor its plot), .ci/, Makefile, .gitignore
    assert {name for name in files if name.split("/")[0] in SOURCES} == tree_files(*SOURCES)
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert f"Version: {VERSION}" in pkg_info.splitlines()


def test_the_wheel_holds_the_package_its_docs_its_license_and_no_tests(dists: Dists) -> None:
    info = f"asyncbatch-{VERSION}.dist-info"
    assert dists.wheel.name == f"asyncbatch-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"{info}/METADATA").decode().splitlines()
        license_text = wheel.read(f"{info}/licenses/LICENSE")
    assert {name.split("/")[0] for name in names} == {"asyncbatch", info}
    assert {name for name in names if name.startswith("asyncbatch/")} == tree_files("asyncbatch")
    assert "asyncbatch/py.typed" in names
    assert {"asyncbatch/docs/troubleshooting.md", "asyncbatch/docs/cli.md"} <= names
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert f"Version: {VERSION}" in metadata  # the one version, read from asyncbatch/__init__.py
    assert "License-Expression: MIT" in metadata
    runtime = [line for line in metadata if line.startswith("Requires-Dist:") and ";" not in line]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(line.split(" ", 1)[1] for line in runtime) == sorted(declared)
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)
    assert {line for line in metadata if line.startswith("Project-URL:")} == {
        f"Project-URL: {label}, {url}" for label, url in urls.items()
    }


def test_the_tests_in_the_sdist_are_complete_enough_to_collect(
    dists: Dists, tmp_path: Path
) -> None:
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = tmp_path / f"asyncbatch-{VERSION}"
    # --assert=plain: collecting imports every test module all the same; rewriting their
    # asserts (~5 s, redone at each run under PYTHONDONTWRITEBYTECODE) is not what is checked.
    collected = run(
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        "--assert=plain",
        cwd=unpacked,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    modules = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert modules == {
        p.relative_to(unpacked).as_posix() for p in unpacked.glob("tests/**/test_*.py")
    }


def test_the_wheel_installs_into_a_fresh_venv_and_runs_the_demo(
    dists: Dists, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    python, script = venv / "bin" / "python", venv / "bin" / "asyncbatch"
    installed = run(python, *fresh_venv_pip(venv), "install", "--quiet", dists.wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = run(python, "-c", "import asyncbatch; print(asyncbatch.__file__)", cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    for command in ([script], [python, "-m", "asyncbatch"]):
        version = run(*command, "--version", cwd=tmp_path)
        assert (version.returncode, version.stdout) == (0, f"asyncbatch {VERSION}\n")

    page = run(script, "help", "troubleshooting", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert page.stdout == (ROOT / "asyncbatch" / "docs" / "troubleshooting.md").read_text()
    topics = run(script, "help", cwd=tmp_path)
    assert topics.returncode == 0, topics.stderr
    assert "  troubleshooting  Troubleshooting\n" in topics.stdout

    demo = run(
        script, "demo", "--dir", tmp_path / "demo", "--files", "50", "--no-progress", cwd=tmp_path
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    first, second = demo.stdout.split("== run 1: handle every file ==")[1].split("== run 2")
    assert "50 seen: 50 done;" in first, demo.stdout
    assert "50 seen: 0 done, 50 done before;" in second, demo.stdout
    assert len(list((tmp_path / "demo" / "out").iterdir())) == 50
