"""Static checks of the workflow: `snakemake --lint`, the profiles and the conda environments."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import yaml

from conftest import REPO


def _snakemake(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_lint_reports_nothing():
    out = _snakemake("--lint")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Lints for" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_the_slurm_profile_sizes_every_rule_and_gives_gpu_rules_a_gpu(tmp_path):
    """Each rule of the demo's DAG has threads and resources in the SLURM profile, and asks
    there for a GPU exactly when the rule itself does (`gpu=1` where it uses one)."""
    dry = _snakemake("-n", "--forceall", "--cores", "2", "--directory", str(tmp_path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    gpu = {}
    # jobs of a group (one slide's steps) are printed indented; each job starts with its [time] line
    for rule, job in re.findall(r"^\s*(?:local)?rule (\w+):\n(.*?)(?=^\s*\[|^\S|\Z)", dry.stdout + dry.stderr, re.M | re.S):
        if rule != "all":
            gpu[rule] = "gpu=1" in job
    assert {"extract_features", "train_fold"} <= {r for r, g in gpu.items() if g}
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    for rule, asks in gpu.items():
        assert rule in profile["set-threads"], rule
        resources = profile["set-resources"][rule]
        assert {"mem_mb", "runtime"} <= set(resources) and "attempt" in resources["mem_mb"], rule
        assert resources.get("gpu", 0) == int(asks), rule


def test_conda_env_pip_installs_this_checkout(tmp_path):
    """What `conda env create` does with the env file's pip section, where Snakemake builds it:
    the specs go to a requirements file beside the copy under .snakemake/conda/ and pip runs
    there; ${MSAMIL_SOURCE} (set by the Snakefile) must lead pip to this repository."""
    env = yaml.safe_load((REPO / "envs" / "msamil.yaml").read_text())
    pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_dir = tmp_path / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True)
    (conda_dir / "condaenv.requirements.txt").write_text("\n".join(pip_specs) + "\n")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--quiet",
         "--report", str(report), "-r", "condaenv.requirements.txt"],
        capture_output=True, text=True, cwd=conda_dir, env=dict(os.environ, MSAMIL_SOURCE=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in installs] == ["msamil"]
    assert installs[0]["download_info"]["url"] == REPO.as_uri()
    # and the Snakefile sets the variable to its own folder
    assert "os.environ.update(MSAMIL_SOURCE=workflow.basedir)" in (REPO / "Snakefile").read_text()


# ----------------------------------------------------------------------------- package structure


@functools.lru_cache(maxsize=1)
def _imports() -> dict[str, list[tuple[str, str]]]:
    """Module -> (imported msamil_core module, name or "") of every import in msamil_core, at
    module level and inside functions alike."""
    import ast

    package = REPO / "msamil_core"
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, is_package)
    found = {}
    for name, (path, is_package) in modules.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(a.name, "") for a in node.names if a.name.startswith("msamil_core")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("msamil_core"):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    edges.append((submodule, "") if submodule in modules else (target, alias.name))
        found[name] = edges
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{module} imports {name} from {target}" for module, edges in _imports().items()
                 for target, name in edges if name.startswith("_") and not name.startswith("__") and target != module]
    assert offenders == []


def _package(module: str) -> str:
    """The node of ``module`` in the package-level graph: its subpackage of msamil_core
    (``training``) or top-level module (``pipeline``); ``msamil_core`` itself for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The nodes of each cycle of ``graph`` (node -> nodes it points to): its strongly connected
    components of more than one node."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = {module: {target for target, _ in edges if target != module} for module, edges in _imports().items()}
    assert _cycles(graph) == []


def test_no_package_import_cycles():
    """Nor between packages (each subpackage and top-level module a node): ``a.x`` importing
    ``b.y`` while ``b.z`` imports ``a.w`` is no cycle of modules, but it is one of packages."""
    graph = {}
    for module, edges in _imports().items():
        graph.setdefault(_package(module), set()).update(_package(target) for target, _ in edges)
    assert _cycles({package: targets - {package} for package, targets in graph.items()}) == []


def test_layers_point_one_way():
    """``reporting`` may import ``training``, never the reverse; ``evaluation`` (metrics and
    statistics) lies below both; the command line is the top layer, which only ``__main__`` imports."""
    below = {"training": {"reporting"}, "evaluation": {"training", "reporting"}}

    def forbidden(package: str) -> set[str]:
        return below.get(package, set()) | (set() if package in ("cli", "__main__") else {"cli"})

    offenders = [f"{module} imports {target}" for module, edges in _imports().items() for target, _ in edges
                 if _package(target) in forbidden(_package(module))]
    assert offenders == []


def test_commands_import_no_other_command():
    commands = {m for m in _imports() if m.startswith("msamil_core.cli.") and m != "msamil_core.cli.options"}
    offenders = [f"{m} imports {t}" for m in commands for t, _ in _imports()[m] if t in commands and t != m]
    assert offenders == []
