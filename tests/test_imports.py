"""Every module of the library (and every benchmark script) imports on its own, as the first lightmods module of
an interpreter: ``train.py`` imports the packages in one order, a script or a user's notebook in another, and an
import cycle only breaks the orders that enter it from the wrong side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One interpreter (torch and transformers loaded once) that forgets every lightmods module before each import, so
# each module is imported as if it came first.
PROBE = r"""
import importlib, sys
import torch, transformers, lightning  # noqa: F401  (third-party imports stay loaded between modules)
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k.split(".")[0] in ("lightmods", "experiments")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as e:  # report them all, not the first
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    files = sorted((ROOT / "lightmods").rglob("*.py")) + sorted((ROOT / "experiments" / "bench").glob("*.py"))
    return [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in files]


def test_module_names_cover_the_library_and_the_benchmarks():
    names = module_names()
    assert "lightmods.losses" in names and "lightmods.losses.max_entropy" in names
    assert "experiments.bench.backdoor_loss_dynamics" in names
    assert len(names) > 100


def test_every_module_imports_first():
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *module_names()], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, f"modules that fail to import first:\n{r.stdout}\n{r.stderr[-2000:]}"
