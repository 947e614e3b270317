"""conda env files: every rule names one that exists, each parses, is pinned, and agrees with the
versions this project is tested with (requirements.lock)."""
import re

import yaml

from conftest import ROOT

LOCK = {}
for line in (ROOT / "requirements.lock").read_text().splitlines():
    if "==" in line:
        k, v = line.split("==", 1)
        LOCK[k.lower().replace("_", "-")] = v.strip()


def env_files_named_by_rules():
    names = set()
    for smk in (ROOT / "rules").glob("*.smk"):
        names |= set(re.findall(r'f"\{ENVS\}/([\w.-]+\.yaml)"', smk.read_text()))
    return names


def test_every_rule_env_exists_and_is_pinned():
    named = env_files_named_by_rules()
    assert named, "no rule names a conda env"
    for name in sorted(named):
        path = ROOT / "envs" / name
        assert path.is_file(), f"rules name envs/{name}, which does not exist"
        env = yaml.safe_load(path.read_text())
        assert env["name"] and env["channels"] and "nodefaults" in env["channels"]
        deps = env["dependencies"]
        assert any(isinstance(d, str) and re.fullmatch(r"python=3\.\d+", d) for d in deps), name
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        for req in pip:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", req), f"envs/{name}: {req!r} is not pinned"


def test_tested_env_agrees_with_the_lock():
    """envs/train.yaml is the stack CI tests: each of its pins equals requirements.lock."""
    env = yaml.safe_load((ROOT / "envs" / "train.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    for req in pip:
        name, ver = req.split("==")
        key = name.lower().replace("_", "-")
        assert LOCK.get(key) == ver, f"envs/train.yaml pins {req}, requirements.lock has {LOCK.get(key)}"
