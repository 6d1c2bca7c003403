"""The package's layers: no import cycle, and no module imports a module of a higher layer (see ARCHITECTURE.md)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "sit_workbench"
LAYERS = [  # lowest first; a module may import its own layer and the ones above it in this list
    ("core", {"paths", "errors", "model", "interpolants", "gaussian", "solvers", "learned", "meanflow", "transport", "registry",
              "sample"}),
    ("checkpoint", {"checkpoint", "run", "fit_solver"}),
    ("training", {"config", "data", "shards", "latents", "repa", "digits", "resume", "train", "launch"}),
    ("evaluation", {"evaluate"}),
    ("studies", {"studies.zoo", "studies.path_length", "studies.nfe", "studies.diffusion_coefficient",
                 "studies.design_space", "studies.convergence", "studies.repa", "studies.meanflow", "studies.guidance",
                 "studies.measures", "studies.remeasure", "studies.claims"}),
    ("front ends", {"cli", "sampling_cli", "explore", "widgets", "demo", "pipeline"}),
]
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def modules():
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py")
            if p.name not in ("__init__.py", "_modidx.py")}


def imports(name, path):
    "Package modules `name` imports, anywhere in the file (function-level imports included)."
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("sit_workbench"):
                mod = node.module[len("sit_workbench."):] if node.module != "sit_workbench" else ""
            else:
                continue
            for a in node.names:  # `from sit_workbench import data` names a module
                found.add(f"{mod}.{a.name}".strip(".") if f"{mod}.{a.name}".strip(".") in LEVEL else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("sit_workbench."):] for a in node.names if a.name.startswith("sit_workbench.")}
    return {m for m in found if m in LEVEL or m == "studies"} - {name}


def test_every_module_has_a_layer():
    assert set(modules()) == set(LEVEL), set(modules()) ^ set(LEVEL)


def test_lower_layers_do_not_import_higher():
    bad = [f"{m} ({LAYERS[LEVEL[m]][0]}) imports {d} ({LAYERS[LEVEL[d]][0]})"
           for m, p in modules().items() for d in imports(m, p) if d in LEVEL and LEVEL[d] > LEVEL[m]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: imports(m, p) & set(LEVEL) for m, p in modules().items()}
    state = {}
    def visit(m, stack):
        if state.get(m) == "done": return
        if state.get(m) == "open": raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        state[m] = "open"
        for d in sorted(graph[m]): visit(d, stack + [m])
        state[m] = "done"
    for m in sorted(graph): visit(m, [])


def test_the_checks_can_fail():
    assert LEVEL["train"] > LEVEL["checkpoint"] and "checkpoint" in imports("train", modules()["train"])
    assert "train" not in imports("checkpoint", modules()["checkpoint"])
