"""The package's shape (README "Layout"): three domains beside a flat spine, and no import that runs back up.

Every import of mkiso's own modules is read from the source, those inside functions too, so a move or a new
import that breaks a rule fails here, not in a reader's head.  The rules are the ones each domain's
``__init__`` states.
"""

import ast
import pathlib

import mkiso

ROOT = pathlib.Path(mkiso.__file__).parent
DOMAINS = ("dicom", "disc", "http")
# The spine's base: what every domain may lean on (the version, the error funnel, tools, space, logs, the hot path).
BASE = {"mkiso", "mkiso.errors", "mkiso.process", "mkiso.disk", "mkiso.logs", "mkiso.fastcopy", "mkiso._fastcopy"}
FLAT_AT_MOST = 22


def module_names():
    """{dotted name: source path} of every module in the package (a package by its ``__init__``)."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("mkiso",) + path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    names["mkiso._fastcopy"] = ROOT / "_fastcopy.pyx"
    return names


def own_imports(name, path, known):
    """The mkiso modules ``name`` imports."""
    if path.suffix != ".py":
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mkiso")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target.split(".")[0] != "mkiso":
                continue
            for alias in node.names:
                found.add(target + "." + alias.name if target + "." + alias.name in known else target)
    return found


def graph():
    known = module_names()
    return {name: own_imports(name, path, known) for name, path in known.items()}


def domain(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in DOMAINS else None


def test_the_graph_is_read():
    """The reader of imports sees what is there (else every rule below would pass on nothing)."""
    imports = graph()
    assert "mkiso.disc.tree" in imports["mkiso.steps"]
    assert "mkiso.dicom.received" in imports["mkiso.disc.webcontent"]
    assert "mkiso.server" in imports["mkiso.demo"]  # an import inside a function counts
    assert "mkiso._fastcopy" in imports["mkiso.fastcopy"]


def test_no_cycle():
    """No module imports one that imports it back, however far round: each floor leans only on floors below."""
    imports = graph()
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("an import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(imports.get(name, ())):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(imports):
        visit(name)


def test_dicom_leans_on_the_base_only():
    broken = {(name, other) for name, targets in graph().items() if domain(name) == "dicom"
              for other in targets if other not in BASE and domain(other) != "dicom"}
    assert broken == set()


def test_disc_reads_what_arrived_and_nothing_above():
    broken = {(name, other) for name, targets in graph().items() if domain(name) == "disc"
              for other in targets if other not in BASE | {"mkiso.dicom.received"} and domain(other) != "disc"}
    assert broken == set()


def test_http_never_imports_what_wires_it():
    broken = {(name, other) for name, targets in graph().items() if domain(name) == "http"
              for other in targets if other in {"mkiso.steps", "mkiso.service", "mkiso.server", "mkiso.demo"}}
    assert broken == set()


def test_the_spine_stays_small_and_each_domain_says_its_rule():
    flat = sorted(path.name for path in ROOT.iterdir() if path.suffix in (".py", ".pyx"))
    assert len(flat) <= FLAT_AT_MOST, flat
    assert (ROOT / "_fastcopy.pyx").is_file()  # the extension's path is fixed: mkiso/_fastcopy.pyx
    for name in DOMAINS:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc is not None and len(doc.splitlines()) == 2 and "never" in doc, name
