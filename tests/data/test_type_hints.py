"""The data packages' public functions carry type hints: every parameter and the return value of each function
and method not named with a leading underscore, in data/ (osp-data) and osp_megatron/data."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _unannotated(path: Path) -> list[str]:
    missing = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef) and (
                not child.name.startswith("_") or child.name in ("__init__", "__call__")
            ):
                arguments = child.args.posonlyargs + child.args.args + child.args.kwonlyargs
                bare = [a.arg for a in arguments if a.annotation is None and a.arg not in ("self", "cls")]
                if child.returns is None and child.name != "__init__":
                    bare.append("return")
                if bare:
                    missing.append(f"{path.relative_to(ROOT)}:{child.lineno} {prefix}{child.name}: {bare}")

    visit(ast.parse(path.read_text()), "")
    return missing


def test_public_functions_of_the_data_packages_are_annotated():
    """No public function or method of data/*.py or osp_megatron/data/*.py lacks a parameter or return hint."""
    files = sorted((ROOT / "data").glob("*.py")) + sorted((ROOT / "osp_megatron" / "data").glob("*.py"))
    assert len(files) > 10
    assert [line for path in files for line in _unannotated(path)] == []
