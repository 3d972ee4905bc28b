"""README.md as written must run: every ```python block, in order, in one namespace.

The README leaves a few things to the user (their training loop, loss, a batch); the test defines
them first, with a training loop that really steps the optimizer on random data, so the updates
and the pruning in the snippets see trained curvature. Blocks are compiled under the name
README.md with their README line numbers, so a traceback points at the broken README line.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
# a dotted name the prose or a snippet says is reachable after `import mackay_ext`, not the
# module path of a `from mackay_ext.x import y` (the snippets that import that way run it)
DOTTED = re.compile(r"(?<![\w.])(?<!from )(?<!-m )mackay_ext(?:\.[A-Za-z_]\w*)+")
# `python -m mackay_ext.x` / `torchrun -m mackay_ext.x`: a module to run, which must exist
RUN_MODULE = re.compile(r"(?<=-m )mackay_ext(?:\.[A-Za-z_]\w*)+")


def python_blocks() -> list[tuple[int, str]]:
    """(README line of the block's first code line, code) for every ```python block, in order."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in FENCE.finditer(text)]


def placeholders(calls: dict[str, int]) -> dict[str, object]:
    """What the README leaves to the user, made small: MNIST-shaped random images, 10 classes."""
    teacher = torch.randn(28 * 28, 10)  # labels a function of the images: there is signal to fit

    def train_some_epochs(model, optimizer, batches: int = 5, batch_size: int = 32):
        calls["train_some_epochs"] += 1
        model.train()
        for _ in range(batches):
            images = torch.randn(batch_size, 1, 28, 28)
            labels = (images.flatten(1) @ teacher).argmax(1)
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()

    return {"train_some_epochs": train_some_epochs, "loss_fn": F.cross_entropy,
            "x": torch.randn(16, 1, 28, 28), "y": torch.randint(0, 10, (16,))}


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _loaded_names(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def test_readme_has_the_use_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 5, f"README.md: expected the Use section's python blocks, found {len(blocks)}"
    assert any("MacKayPruner(" in code for _, code in blocks)
    assert any("load_compressed(" in code for _, code in blocks)


# a few batches of toy data against num_data=55000 leave little curvature, so the pruner wants
# whole layers gone and says so; the README's claim tested here is only that the blocks run
@pytest.mark.filterwarnings("ignore:MacKayPruner.update. every group:RuntimeWarning")
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippets write files (save_compressed)
    calls = {"train_some_epochs": 0}
    given = placeholders(calls)
    namespace = {"__name__": "__readme__", **given}
    used = set()
    for line, code in python_blocks():
        tree = ast.parse(code, filename="README.md")
        used |= _loaded_names(tree)
        # blank lines in front keep README.md's line numbers in any traceback
        exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)
    assert calls["train_some_epochs"] > 0
    # every placeholder stands for something the README really leaves open; drop stale ones
    unused = sorted(set(given) - used)
    assert not unused, f"placeholders no README block uses any more: {unused}"
    out = capsys.readouterr().out
    assert "weights kept" in out and "dense" in out  # the snippets' prints ran


def test_each_block_imports_what_it_uses():
    """A reader copies one block: whatever it uses that some block imports, it imports itself."""
    blocks = [(line, ast.parse(code)) for line, code in python_blocks()]
    imported_anywhere = set().union(*(_imported_names(tree) for _, tree in blocks))
    missing = {line: sorted((_loaded_names(tree) & imported_anywhere) - _imported_names(tree))
               for line, tree in blocks}
    missing = {line: names for line, names in missing.items() if names}
    assert not missing, f"README.md blocks (by first line) use names they do not import: {missing}"


def test_names_the_readme_mentions_exist():
    """Every `mackay_ext.a.b` in README.md (prose included) resolves after `import mackay_ext`,
    in a fresh interpreter: submodules other tests imported do not count."""
    names = sorted(set(DOTTED.findall(README.read_text(encoding="utf-8"))))
    assert "mackay_ext.models.create" in names
    script = ("import json, sys, mackay_ext\n"
              "missing = []\n"
              "for name in json.loads(sys.argv[1]):\n"
              "    obj = mackay_ext\n"
              "    for part in name.split('.')[1:]:\n"
              "        if not hasattr(obj, part):\n"
              "            missing.append(name)\n"
              "            break\n"
              "        obj = getattr(obj, part)\n"
              "print(json.dumps(missing))\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    missing = json.loads(result.stdout.strip().splitlines()[-1])
    assert not missing, f"README.md names that `import mackay_ext` does not reach: {missing}"
    run = sorted(set(RUN_MODULE.findall(README.read_text(encoding="utf-8"))))
    assert "mackay_ext.cli" in run
    assert not [name for name in run if importlib.util.find_spec(name) is None]

