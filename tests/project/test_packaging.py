"""Packaging, as a new user meets it: the sdist carries every source, the wheel built from it installs
into a fresh virtual environment and runs outside the checkout (extension and a training step), the
C++ source also builds without its x86-only AVX2 clone, the code's references to the algorithm
document resolve, and a command whose extra is not installed says which one to install.

The build tests compile the C++ extension once each (about a minute on 2 cores), hence ``slow``.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from elalora_kernels import reference

ROOT = Path(__file__).resolve().parents[2]
BUILD_OUTPUTS = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", ".hypothesis",
    ".benchmarks", "runs",
)
# Where the AVX2 clone is compiled, and nm (binutils) is there to see it.
CAN_SEE_CLONES = (
    sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64", "i686") and bool(shutil.which("nm"))
)


def _run(cmd, cwd, env=None, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _avx2_clones(shared_object: Path) -> int:
    """How many AVX2 clones (GCC ``target_clones`` symbols end in ``.avx2``) the library holds."""
    symbols = _run(["nm", str(shared_object)], cwd=shared_object.parent).stdout
    return sum(line.endswith(".avx2") for line in symbols.splitlines())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built from a copy of the checkout without build outputs."""
    src = tmp_path_factory.mktemp("src") / "elalora"
    shutil.copytree(ROOT, src, ignore=BUILD_OUTPUTS)
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"], cwd=src)
    (archive,) = out.glob("elalora-*.tar.gz")
    return archive


@pytest.mark.slow
@pytest.mark.subprocess
def test_sdist_carries_every_source_the_licence_and_the_data(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {"LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in"}
    for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "elalora/**/*.py", "elalora_kernels/**/*.py",
                    "data/*", "examples/*.py", "benchmarks/*.py", "docs/*.md"):
        expected |= {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern) if "__pycache__" not in p.parts}
    assert any(name.startswith("csrc/cuda/") and name.endswith(".h") for name in expected)
    assert expected <= names, f"missing from the sdist: {sorted(expected - names)}"
    assert not [name for name in names if name.endswith(".so")]


INSTALLED_CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch, torch.nn as nn
    import elalora
    from elalora_kernels import _extension

    inside = lambda module: Path(module.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert inside(elalora), f"imported {elalora.__file__}, not the installed wheel"
    assert _extension.available(), _extension.reason_unavailable()
    ext = _extension.load()
    assert inside(ext), ext.__file__

    calls = []
    kernel = ext.score_ema_update
    ext.score_ema_update = lambda *args: calls.append(1) or kernel(*args)

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    config = elalora.ElaLoRAConfig(r=2, target_modules=["0", "2"], t_init=1, t_final=1, mask_interval=1, total_steps=4)
    elalora.inject(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = elalora.RankAllocator(model, config, opt)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 2, (8,)))
    (loss + allocator.orth_penalty()).backward()
    opt.step()
    allocator.step()
    assert calls == [1], calls
    print("installed wheel OK", ext.__file__)
    """
)


@pytest.mark.slow
@pytest.mark.subprocess
def test_wheel_from_the_sdist_installs_and_runs_outside_the_checkout(sdist, tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist), str(sdist)],
         cwd=tmp_path)
    (wheel,) = dist.glob("elalora-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert not [name for name in names if name.startswith(("data/", "benchmarks/", "examples/"))]  # library only
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    (shared_object,) = [name for name in names if name.startswith("elalora_kernels/_C.")]
    if CAN_SEE_CLONES:  # what ships carries the run-time-picked AVX2 clone
        assert _avx2_clones(Path(zipfile.ZipFile(wheel).extract(shared_object, tmp_path / "so"))) > 0

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path)
    # Reuse this environment's torch rather than download it: a .pth
    # line puts their directory on the new environment's path, after its own site-packages.
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    Path(purelib.stdout.strip(), "reuse_test_environment.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")

    outside = tmp_path / "outside"
    outside.mkdir()
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ELALORA_NO_EXTENSION")}
    child_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    assert "installed wheel OK" in _run([str(python), "-c", INSTALLED_CHECK], cwd=outside, env=child_env).stdout


@pytest.mark.slow
@pytest.mark.subprocess  # the compiler
@pytest.mark.parametrize("shapes", [[(1,), (7,), (5, 123)], [(123, 7), (300, 100)]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extension_builds_without_the_x86_clone(no_clones_extension, shapes, dtype):
    gen = torch.Generator().manual_seed(len(shapes))
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in shapes]
    grads[-1].view(-1)[0] = float("inf")  # one non-finite element: kept and counted
    ipt = [torch.rand(s, generator=gen) for s in shapes]
    unc = [torch.rand(s, generator=gen) * 0.1 for s in shapes]
    ref_ipt, ref_unc = [t.clone() for t in ipt], [t.clone() for t in unc]
    expected = reference.score_ema_update(params, grads, ref_ipt, ref_unc, 0.85, 0.85)
    assert no_clones_extension.score_ema_update(params, grads, ipt, unc, 0.85, 0.85) == int(expected) == 1
    for got, want in zip(ipt + unc, ref_ipt + ref_unc):
        assert torch.equal(got, want)  # the contract is bit-identity, clone or not


@pytest.fixture(scope="module")
def no_clones_extension(tmp_path_factory):
    """csrc/score_ema.cpp built with -DELALORA_NO_TARGET_CLONES, as on a compiler without target_clones."""
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("no_clones")
    module = load(
        name="_C",  # the module name the source declares; loaded from the temp dir, apart from elalora_kernels._C
        sources=[str(path) for path in sorted((ROOT / "csrc").glob("*.cpp"))],
        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", "-DELALORA_NO_TARGET_CLONES"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
    )
    if CAN_SEE_CLONES:  # the macro really removed the clone
        assert _avx2_clones(Path(module.__file__)) == 0
    return module


def test_every_algorithm_reference_names_a_section_of_docs_algorithm():
    doc = (ROOT / "docs" / "ALGORITHM.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## §(\d+) ", doc, re.M)}
    round_section = doc.split("## §4 ")[1].split("\n## ")[0]
    round_items = {int(n) for n in re.findall(r"^(\d+)\. ", round_section, re.M)}
    assert sections == set(range(1, 8)) and round_items == set(range(1, 7))

    cited = 0
    code = ("elalora", "elalora_kernels", "tests", "benchmarks", "examples")
    for pattern in [f"{folder}/**/*.py" for folder in code] + ["csrc/**/*.*"]:
        for path in ROOT.glob(pattern):
            if path.name == "test_packaging.py":  # this test's own patterns
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for match in re.finditer(r"(\S*)ALGORITHM(\S*)(?: §(\d+)(?:\.(\d+))?)?", text):
                before, after, section, item = match.groups()
                where = f"{path.relative_to(ROOT)}: {match.group(0)!r}"
                assert before.endswith("docs/") and after.startswith(".md"), where
                if section:
                    cited += 1
                    assert int(section) in sections, where
                    assert item is None or (section == "4" and int(item) in round_items), where
    assert cited >= 30


def test_a_command_whose_extra_is_missing_names_it(monkeypatch, capsys, tmp_path):
    from elalora import cli

    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "elalora[plot]" in err
    assert not (tmp_path / "plots").exists()



def _says(text: str, default) -> bool:
    """Whether a documented default (``8``, ``0.85``, ``"paper"``, ``True``; backticks or not) is ``default``."""
    text = text.strip().strip("`").strip('"')
    if isinstance(default, (bool, str)):
        return text == str(default)
    return float(text) == default


def test_every_config_field_is_documented_with_its_default_in_help_and_in_the_readme():
    import dataclasses

    from elalora import ElaLoRAConfig

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(ElaLoRAConfig):
        entry = re.search(rf"^ +{field.name} \[([^;\]]+)", ElaLoRAConfig.__doc__, re.M)
        assert entry, f"help(ElaLoRAConfig) does not document {field.name}"
        row = re.search(rf"^\| `{field.name}` \| ([^|]+) \|", readme, re.M)
        assert row, f"the README's configuration table has no row for {field.name}"
        if field.default is not None:
            assert _says(entry.group(1), field.default), (field.name, entry.group(1))
            assert _says(row.group(1), field.default), (field.name, row.group(1))
