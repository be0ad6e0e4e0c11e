"""The import rules of the layers (docs/architecture.md), read from the source with ast (every import, also the lazy
ones inside functions): kernels import nothing of vltok; methods import only the stage protocol, kernels, errors, the
registry and other methods; adapters import the engines, the protocol and errors / rewrite / compat / hooks; the core
reaches adapters only through vltok.registry; only eval, training, demos and the CLI may import anything."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"vltok": ROOT / "vltok", "vltok.kernels": ROOT / "kernels", "vltok.adapters": ROOT / "adapters"}
METHODS = ("vltok.stages", "vltok.kernels", "vltok.errors", "vltok.methods", "vltok.registry", "vltok.__version__")
ADAPTERS = ("vltok.inllm", "vltok.vision", "vltok.stages", "vltok.errors", "vltok.rewrite", "vltok.compat",
            "vltok.hooks", "vltok.prompt_cache", "vltok.adapters", "vltok.__version__")
FREE = ("vltok.cli", "vltok.train", "vltok.train_reference", "vltok.train_reference_video", "vltok.demo_core",
        "vltok.video", "vltok.eval", "vltok.demos")
PENDING: set = set()   # imports still to remove (issue 19 B removed the last ones)


def modules():
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("").parts
            if pkg == "vltok" and rel[0] in ("kernels", "adapters"):   # (symlinked / mapped folders)
                continue
            name = ".".join((pkg, *rel)).removesuffix(".__init__")
            yield name, f.name == "__init__.py", ast.parse(f.read_text())


def imports(name, is_pkg, tree):
    """The vltok modules a module imports (relative imports resolved; ``from vltok import x`` -> vltok.x)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "vltok")
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            if mod and mod.split(".")[0] == "vltok":
                yield from ([f"{mod}.{a.name}" for a in node.names] if mod == "vltok" else [mod])


def under(mod, prefixes):
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_import_rules():
    bad = []
    for name, is_pkg, tree in modules():
        for mod in set(imports(name, is_pkg, tree)):
            if (name, mod) in PENDING or under(name, FREE):
                continue
            if under(name, ("vltok.kernels",)):
                ok = under(mod, ("vltok.kernels",))
            elif under(name, ("vltok.methods",)):
                ok = under(mod, METHODS)
            elif under(name, ("vltok.adapters",)):
                ok = under(mod, ADAPTERS)
            else:   # the core
                ok = not under(mod, ("vltok.adapters", "vltok.eval", "vltok.demos")) or name == "vltok.registry"
            if not ok:
                bad.append(f"{name} imports {mod}")
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))
