"""House rules that hold the code's shape: short functions, stages that never import each other, pure-torch apt/."""

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"
MAX_FUNCTION_LINES = 60


def modules(folder: Path):
    return sorted(folder.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_function_in_pipeline_is_longer_than_the_limit():
    long = []
    for path in modules(PIPELINE):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PIPELINE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n  " + "\n  ".join(long)


@pytest.mark.parametrize("path", modules(PIPELINE / "stages"), ids=lambda p: p.name)
def test_no_stage_imports_another_stage(path):
    stages = {f"pipeline.stages.{p.stem}" for p in (PIPELINE / "stages").glob("*.py")} | {"pipeline.stages"}
    assert not imported_modules(path) & stages


@pytest.mark.parametrize("path", modules(PIPELINE / "apt"), ids=lambda p: p.name)
def test_apt_core_is_pure_torch(path):
    assert not {name for name in imported_modules(path) if name.split(".")[0] == "deepspeed"}


def test_finetune_loop_fits_on_a_screen():
    source = ast.parse((PIPELINE / "recipe.py").read_text())
    (train,) = [n for n in ast.walk(source) if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 40
