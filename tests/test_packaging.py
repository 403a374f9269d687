"""What installing the package promises: extras never replace the user's torch; CI and the README install the lock."""
import re
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402  (after the skip)

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages that pin torch to their own release: installing one makes pip replace the user's torch.
TORCH_FAMILY = {"torchvision", "torchaudio", "timm", "torchdata"}


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def _requires_torch(name: str, seen: set) -> str | None:
    """The chain by which installed distribution ``name`` requires torch (its non-extra requirements), or None."""
    if name in seen:
        return None
    seen.add(name)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dep = _name(text)
        if dep == "torch":  # a range the installed torch satisfies leaves it alone (lightning: torch>=2.1)
            if not req.specifier.contains(metadata.version("torch").split("+")[0], prereleases=True):
                return f"{name} -> {text}"
            continue
        if dep in TORCH_FAMILY:
            return f"{name} -> {dep}"
        chain = _requires_torch(dep, seen)
        if chain:
            return f"{name} -> {chain}"
    return None


@pytest.mark.parametrize("extra", sorted(PROJECT["optional-dependencies"]))
def test_no_extra_requires_torch(extra):
    """``pip install -e .[extra]`` beside the user's torch must not replace it (a torch-family requirement
    makes pip install the newest torch build); checked by name, and through the installed requirements."""
    for req in PROJECT["optional-dependencies"][extra]:
        name = _name(req)
        assert name not in TORCH_FAMILY | {"torch"}, f"extra {extra!r} requires {name}"
        chain = _requires_torch(name, set())
        assert chain is None, f"extra {extra!r}: {chain}"


def test_lock_pins_every_direct_dependency_and_ci_and_readme_use_it():
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    direct = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    unpinned = sorted({_name(r) for r in direct} - set(lock))
    assert not unpinned, f"constraints.txt pins no version of {unpinned}"
    assert "+" not in lock["torch"], "a local version (+cpu) is not on PyPI's index"
    ci = (ROOT / ".ci" / "run").read_text()
    readme_install = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
    for where, text in ((".ci/run", ci), ("the README's first command", readme_install)):
        assert re.search(r"pip install -c constraints\.txt -e \"\.\[test\]\"", text), where
