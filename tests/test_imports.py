"""The dependency rules, checked on what Python really imports: the model reads no files and knows no
trainer or server, and `import nanoseek` loads neither the engine nor FastAPI."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import nanoseek


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


def test_import_nanoseek_loads_no_engine_and_no_fastapi():
    modules = imported_after("import nanoseek")
    assert not {m for m in modules if m.endswith("engine") or "fastapi" in m}


def test_the_public_names_load_on_first_use():
    modules = imported_after("import nanoseek; nanoseek.Engine, nanoseek.save_pretrained")
    assert {"nanoseek.serve.engine", "nanoseek.checkpoint"} <= modules


@pytest.mark.parametrize("module", ["nanoseek.model", "nanoseek.model.transformer", "nanoseek.model.moe"])
def test_the_model_imports_no_checkpoint_serving_training_or_cli(module):
    loaded = imported_after(f"import {module}")
    outside = ("nanoseek.checkpoint", "nanoseek.serve", "nanoseek.train", "nanoseek.rl", "nanoseek.cli")
    assert not {m for m in loaded if m.startswith(outside)}


def test_an_unknown_name_is_an_attribute_error():
    import nanoseek

    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        nanoseek.Engin  # noqa: B018


def test_no_module_under_model_names_checkpoint_serving_training_or_cli_even_inside_a_function():
    """A static check too: an import inside a method (how the model once reached checkpoint.py) runs late."""
    outside = ("nanoseek.checkpoint", "nanoseek.serve", "nanoseek.train", "nanoseek.rl", "nanoseek.cli")
    for path in Path(nanoseek.__file__).parent.joinpath("model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not [n for n in names if n.startswith(outside)], f"{path.name} imports {names}"


def test_every_public_name_and_submodule_resolves():
    assert all(getattr(nanoseek, name) is not None for name in nanoseek.__all__)
    assert imported_after("import nanoseek; nanoseek.checkpoint.save_pretrained") >= {"nanoseek.checkpoint"}
