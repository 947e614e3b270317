"""conda envs and their CUDA images. conda channels cannot be reached from these machines, so what is
tested is what can be: every rule names an env (and an image) that exists; every env file parses and is pinned;
each env's pip section resolves for the env's own Python on Linux (uv, against PyPI) to a CUDA build of torch,
with the versions CI tests (requirements.lock) wherever the env does not say it differs; and every image recipe
in containers/ installs exactly its env's package set (generated from it, and read back here)."""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "containers"))
import generate  # noqa: E402  (containers/generate.py)

ENV_FILES = sorted((ROOT / "envs").glob("*.yaml"))
LOCK = {}
for line in (ROOT / "requirements.lock").read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        k, v = line.split("==", 1)
        LOCK[k.strip().lower().replace("_", "-")] = v.strip()
DIVERGES = re.compile(r"^#\s*diverges from requirements\.lock:\s*(.+)$", re.M | re.I)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_pins(path) -> dict[str, str]:
    return {norm(p.split("==")[0].split("[")[0]): p.split("==")[1] for p in generate.read_env(path)["pip"]}


def diverging(path) -> set[str]:
    """Packages an env pins differently from requirements.lock on purpose, declared in the env file as
    `# diverges from requirements.lock: transformers, torch (why)`, or `... lock: all (why)` for a stack of
    its own (e.g. an older transformers for a model's remote code)."""
    m = DIVERGES.search(path.read_text())
    names = {norm(x) for x in re.split(r"[,\s]+", re.sub(r"\(.*\)", "", m.group(1))) if x} if m else set()
    return set(pip_pins(path)) if "all" in names else names


def python_version(path) -> str:
    spec = next(d for d in generate.read_env(path)["conda"] if d.startswith("python="))
    return spec.split("=", 1)[1]


def rule_bodies():
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for m in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)+)", smk.read_text(), re.M):
            yield smk.name, m.group(1), m.group(2)


def test_there_are_env_files():
    assert {p.stem for p in ENV_FILES} >= {"train"}, ENV_FILES


def test_every_env_named_by_a_rule_exists_and_every_rule_has_env_and_image():
    named_envs, named_images = set(), set()
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        named_envs |= set(re.findall(r'\{ENVS\}/([\w.-]+)\.yaml', text))
        named_images |= set(re.findall(r'image_of\("([\w.-]+)"\)', text))
    assert named_envs, "no rule names a conda env"
    for name in sorted(named_envs | named_images):
        assert (ROOT / "envs" / f"{name}.yaml").is_file(), f"rules name envs/{name}.yaml, which does not exist"
        assert (ROOT / "containers" / f"{name}.Dockerfile").is_file(), f"no containers/{name}.Dockerfile"
    missing = [f"{f}: rule {r}" for f, r, body in rule_bodies()
               if ("shell:" in body or "script:" in body or "run:" in body)
               and ("conda:" in body) != ("container:" in body)]
    assert not missing, "rules with a conda env but no container (add `container: image_of(\"<env>\")`): " + \
        ", ".join(missing)
    for f, r, body in rule_bodies():  # a rule's image is its conda env's image
        env = re.search(r'\{ENVS\}/([\w.-]+)\.yaml', body)
        img = re.search(r'image_of\("([\w.-]+)"\)', body)
        if env and img:
            assert env.group(1) == img.group(1), f"{f}: rule {r}: conda env {env.group(1)}, image {img.group(1)}"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.stem)
def test_env_parses_and_is_pinned(path):
    env = yaml.safe_load(path.read_text())
    assert env["name"] == f"quantune-{path.stem}", f"envs/{path.name}: name should be quantune-{path.stem}"
    assert "conda-forge" in env["channels"] and "nodefaults" in env["channels"], env["channels"]
    conda = generate.read_env(path)["conda"]
    assert any(re.fullmatch(r"python=3\.\d+(\.\d+)?", d) for d in conda), f"envs/{path.name}: python not pinned"
    assert any(re.fullmatch(r"pip=[\d.]+", d) for d in conda), f"envs/{path.name}: pip not pinned"
    pins = generate.read_env(path)["pip"]
    assert pins, f"envs/{path.name}: no pip section"
    for req in pins:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+]+", req), f"envs/{path.name}: {req!r} is not pinned"
    names = [norm(p.split("==")[0]) for p in pins]
    assert len(names) == len(set(names)), f"envs/{path.name}: a package is pinned twice"


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.stem)
def test_env_pins_agree_with_the_lock(path):
    """Each pin of a package CI tests equals requirements.lock, unless the env declares that it diverges."""
    allowed = diverging(path)
    for name, ver in pip_pins(path).items():
        if name in LOCK and name not in allowed:
            assert LOCK[name] == ver, (f"envs/{path.name} pins {name}=={ver}, requirements.lock has {LOCK[name]}; "
                                       "fix: pin the lock's version, or declare it in a "
                                       "'# diverges from requirements.lock: <pkg> (why)' line")
    assert allowed <= set(pip_pins(path)), f"envs/{path.name} declares diverging packages it does not pin"


@functools.lru_cache(maxsize=None)
def resolve(path) -> dict[str, str]:
    """uv pip compile of the env's pip section for its Python, on x86_64 Linux, against PyPI. Packages CI tests
    and the env leaves to the resolver are held at the lock's versions (unless the env diverges from it)."""
    uv = shutil.which("uv") or str(ROOT / ".venv" / "bin" / "uv")
    pins = pip_pins(path)
    cons = "" if diverging(path) else "".join(f"{k}=={v}\n" for k, v in LOCK.items() if k not in pins)
    tmp = ROOT / ".pytest_cache" / "envs"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"{path.stem}.in").write_text("\n".join(generate.read_env(path)["pip"]) + "\n")
    (tmp / f"{path.stem}.constraints.txt").write_text(cons)
    r = subprocess.run([uv, "pip", "compile", str(tmp / f"{path.stem}.in"),
                        "-c", str(tmp / f"{path.stem}.constraints.txt"),
                        "--python-version", python_version(path), "--python-platform", "x86_64-manylinux_2_28",
                        "--no-header", "--no-annotate", "--quiet", "--index-url", "https://pypi.org/simple"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (f"envs/{path.name}: pip section does not resolve for Python "
                               f"{python_version(path)}:\n{r.stderr[-3000:]}")
    out = {}
    for line in r.stdout.splitlines():
        if "==" in line and not line.startswith("#"):
            k, v = line.split(";")[0].strip().split("==")
            out[norm(k)] = v
    return out


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.stem)
def test_env_pip_section_resolves_for_its_python(path):
    got = resolve(path)
    for name, ver in pip_pins(path).items():
        assert got.get(name) == ver, f"envs/{path.name}: {name} resolved to {got.get(name)}, pinned {ver}"
    if not diverging(path):  # the env gets the exact versions CI tests, transitive ones included
        differ = {k: (v, LOCK[k]) for k, v in got.items() if k in LOCK and LOCK[k] != v}
        assert not differ, f"envs/{path.name}: resolved versions differ from requirements.lock: {differ}"
    if "torch" in got:  # on Linux the env gets a CUDA build of torch, whose CUDA the image's base matches
        cuda = next((v for k, v in got.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", k)), None)
        assert cuda, f"envs/{path.name}: torch {got['torch']} resolved without CUDA runtime wheels"
        # torch's wheels bring their own CUDA runtime. CUDA's minor version compatibility: a runtime of major M
        # runs on any driver of major >= M; the base image's CUDA sets the driver it asks the host for, so its
        # major must be >= torch's; where nvcc builds extensions against torch (devel), the majors must match.
        base = generate.settings(path.stem)["base"]
        base_major = int(re.search(r"nvidia/cuda:(\d+)\.\d+\.\d+-", base).group(1))
        torch_major = int(cuda.split(".")[0])
        assert base_major >= torch_major, f"envs/{path.name}: torch brings CUDA {cuda}, its image's base is {base}"
        if "-devel-" in base:
            assert base_major == torch_major, f"envs/{path.name}: nvcc of {base} cannot build for torch's CUDA {cuda}"


def test_container_recipes_are_up_to_date_with_the_envs():
    r = subprocess.run([sys.executable, str(ROOT / "containers" / "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.stem)
def test_each_image_installs_its_env_package_set(path):
    env = generate.read_env(path)
    for recipe in (ROOT / "containers" / f"{path.stem}.Dockerfile", ROOT / "containers" / f"{path.stem}.def"):
        assert recipe.is_file(), f"no {recipe.name}; fix: python containers/generate.py"
        text = recipe.read_text()
        specs = generate.installed_specs(text)
        assert sorted(specs["conda"]) == sorted(env["conda"]), (recipe.name, specs["conda"], env["conda"])
        assert sorted(specs["pip"]) == sorted(env["pip"]), (recipe.name, specs["pip"], env["pip"])
        bases = re.findall(r"^(?:FROM|From:) (\S+)", text, re.M)
        assert any(re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-(runtime|devel)-ubuntu\d+\.\d+", b) for b in bases), bases
        assert all(re.search(r":\d+\.\d+\.\d+", b) for b in bases), f"{recipe.name}: a base image not pinned: {bases}"
