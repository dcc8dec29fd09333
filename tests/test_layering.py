"""The package's layers: engine < fit < use < trust, imports only going down.

``layering_errors`` reads the sources (nothing is imported) and names every import
that breaks the layering: an import cycle, an import from a higher layer, an import
of the package's own modules inside a function, a private name used across modules,
an ``__init__`` that does more than re-export. The test runs it on the package, and
on small made-up packages that break each rule, so the check itself is checked.
"""

import ast
import pathlib

import pytest

import numpyro_ensemble

PACKAGE = pathlib.Path(numpyro_ensemble.__file__).resolve().parent
LAYERS = ("engine", "fit", "use", "trust")

# Every public name of numpyro_ensemble: those before the move into subpackages (issue 22)
# and those of issue 24 (the low-rank Laplace guide, laplace_exclusions,
# laplace_prior_precision, linearized_predictive).
PUBLIC_NAMES = [
    "AutoLowRankPrecisionNormal", "LowRankPrecisionNormal",
    "EarlyStopping", "EnsembleMAP", "EnsembleSVI", "EnsembleSummary", "IdenticalMembersWarning",
    "ImportanceWeights", "NUTSSummary", "NUTSWarmStart", "StackingWeights", "TemperedTrace_ELBO",
    "WarmNUTSRun", "concat_members", "clear_compiled_programs", "enable_compilation_cache",
    "ensemble_summary", "ensemble_map", "ensemble_predict", "ensemble_predictive", "ensemble_svi",
    "importance_weights", "laplace_exclusions", "laplace_init_params", "laplace_members",
    "laplace_prior_precision",
    "linearized_predictive", "load_checkpoint",
    "mcmc_init_params", "nuts_summary", "nuts_warm_start", "per_member", "sample_posterior",
    "save_checkpoint", "select_members", "stacking_weights", "take_member", "to_arviz",
]


def package_sources(root: pathlib.Path, name: str = "numpyro_ensemble") -> dict:
    """``{dotted module name: source}`` for every ``.py`` file under ``root``."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = [name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text()
    return sources


def layer_of(module: str) -> int:
    """0-3 for the layers, 4 for the top-level ``__init__`` (above them all)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _imports(module: str, tree: ast.Module, modules: set) -> list:
    """``(line, imported module, names, at module level)`` for the package's imports;
    ``from package import module`` counts as an import of that module."""
    found = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                if module not in modules or not any(m.startswith(module + ".") for m in modules):
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != module.split(".")[0]:
                continue
            for alias in node.names:
                child = f"{source}.{alias.name}"
                if child in modules:
                    found.append((node.lineno, child, (), id(node) in top))
                else:
                    found.append((node.lineno, source, (alias.name,), id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == module.split(".")[0]:
                    found.append((node.lineno, alias.name, (), id(node) in top))
    return found


def _module_aliases(tree: ast.Module, modules: set) -> dict:
    """Names bound at module level to one of the package's modules."""
    aliases = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def _reexport_only(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in targets):
                continue
        return False
    return True


def layering_errors(sources: dict) -> list:
    """Every break of the layering in ``sources`` (``{module: source}``), as sentences."""
    modules = set(sources)
    errors, graph = [], {m: set() for m in modules}
    for module, source in sources.items():
        tree = ast.parse(source)
        is_package = any(m.startswith(module + ".") for m in modules)
        if is_package and not _reexport_only(tree):
            errors.append(f"{module}: an __init__ does more than re-export names")
        for line, target, names, top_level in _imports(module, tree, modules):
            where = f"{module}:{line}"
            if not top_level:
                errors.append(f"{where}: imports {target} inside a function or class")
            if target != module and target in modules:
                graph[module].add(target)
            if layer_of(target) > layer_of(module):
                errors.append(f"{where}: imports {target} from a higher layer")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                errors.append(f"{where}: imports the private {private} of {target}")
        aliases = _module_aliases(tree, modules)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                errors.append(
                    f"{module}:{node.lineno}: uses the private {node.attr} of {aliases[node.value.id]}"
                )
    # cycles among modules (packages' __init__ re-exports are edges too)
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                errors.append("import cycle: " + " -> ".join(cycle))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return errors


def test_the_package_is_layered():
    sources = package_sources(PACKAGE)
    assert {m.split(".")[1] for m in sources if m.count(".") == 1} >= set(LAYERS)
    assert all(layer_of(m) < len(LAYERS) for m in sources if m != "numpyro_ensemble")
    assert layering_errors(sources) == []


def test_every_public_name_is_importable_from_the_top():
    assert sorted(numpyro_ensemble.__all__) == sorted(PUBLIC_NAMES)
    for name in PUBLIC_NAMES:
        assert getattr(numpyro_ensemble, name) is not None
    namespace = {}
    exec(f"from numpyro_ensemble import {', '.join(PUBLIC_NAMES)}", namespace)
    assert all(name in namespace for name in PUBLIC_NAMES)


FINE = {
    "pkg": '"""A package."""\nfrom pkg.fit.b import B\n__all__ = ["B"]\n',
    "pkg.engine": "",
    "pkg.engine.a": "import numpy as np\n\ndef a():\n    import flax  # optional: fine\n",
    "pkg.fit": "",
    "pkg.fit.b": "from pkg.engine import a\nfrom pkg.engine.a import a as helper\nB = a.a\n",
}


@pytest.mark.parametrize(
    "change, found",
    [
        ({"pkg.engine.a": "from pkg.fit.b import B\n"}, "from a higher layer"),
        ({"pkg.engine.a": "from pkg.fit import b\n"}, "from a higher layer"),
        ({"pkg.fit.c": "from pkg.fit.b import B\n", "pkg.fit.b": "from pkg.fit.c import C\n"},
         "import cycle"),
        ({"pkg.fit.b": "def f():\n    from pkg.engine import a\n"}, "inside a function"),
        ({"pkg.fit.b": "from pkg.engine.a import _helper\n"}, "private ['_helper']"),
        ({"pkg.fit.b": "from pkg.engine import a\nx = a._registry\n"}, "private _registry"),
        ({"pkg.engine": "def f():\n    pass\n"}, "does more than re-export"),
    ],
)
def test_the_check_finds_each_break(change, found):
    assert layering_errors(FINE) == []
    errors = layering_errors({**FINE, **change})
    assert any(found in e for e in errors), errors
