"""The Dockerfile and the GitHub workflows, checked without a Docker engine or GitHub:
linted with tools that know their formats, and the Dockerfile's paths and runtime command
resolved against the repository."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import die_with_parent, READY_LINE, REPO, free_port, llama_pow_bin, read_text, stop_process, wait_until

VENV_BIN = Path(sys.executable).parent
WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))


def tool(name):
    path = VENV_BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} not installed (worker/requirements-test.txt)"
        return found
    return str(path)


def instructions(dockerfile):
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(dockerfile):
    """Each stage's instructions, keyed by stage name."""
    result, name = {}, None
    for ins, args in instructions(dockerfile):
        if ins == "FROM":
            parts = args.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else parts[0]
            result[name] = []
        elif name is not None:
            result[name].append((ins, args))
    return result


def copies(stage):
    """(sources, destination, from_stage) of each COPY in a stage."""
    out = []
    for ins, args in stage:
        if ins != "COPY":
            continue
        words = shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        out.append((paths[:-1], paths[-1], from_stage))
    return out


def dockerignore_excludes(path):
    """Whether .dockerignore keeps `path` (relative, with /) out of the build context: the
    last rule matching the path or one of its parent folders decides."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in rules:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def git_ignored(rel):
    """Whether git ignores `rel` (such a file is missing from a fresh clone, as CI uses)."""
    done = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", rel], cwd=REPO, capture_output=True
    )
    return done.returncode == 0


def test_hadolint_finds_nothing():
    done = subprocess.run(
        [tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_copied_path_exists_and_is_in_the_build_context():
    all_stages = stages(REPO / "Dockerfile")
    assert list(all_stages) == ["build", "runtime"]
    checked = 0
    for name, stage in all_stages.items():
        for sources, _dest, from_stage in copies(stage):
            if from_stage is not None:
                assert from_stage in all_stages, f"COPY --from={from_stage}: no such stage"
                continue
            for src in sources:
                path = REPO / src
                assert path.exists(), f"COPY {src}: missing from the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                assert files, f"COPY {src}: empty"
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not dockerignore_excludes(rel), f"{rel} is excluded by .dockerignore"
                    assert not git_ignored(rel), f"{rel} is ignored by git"
                checked += 1
    assert checked >= 6
    # What cargo reads to build the binary is all in the build stage.
    build_sources = {src for srcs, _d, f in copies(all_stages["build"]) if f is None for src in srcs}
    assert {"Cargo.toml", "Cargo.lock", "src"} <= build_sources
    if (REPO / "build.rs").exists():
        assert "build.rs" in build_sources, "build.rs is not copied into the build stage"
    if (REPO / "benches").exists():
        assert "benches" in build_sources, "Cargo.toml's benches are not copied"
    # Files the sources embed at compile time (include_bytes!, include_str!) are copied too.
    embedded = 0
    for rs in list((REPO / "src").rglob("*.rs")) + list((REPO / "benches").rglob("*.rs")):
        for m in re.finditer(r'include_(?:bytes|str)!\(\s*"([^"]+)"\s*\)', rs.read_text()):
            target = (rs.parent / m.group(1)).resolve().relative_to(REPO).as_posix()
            copied = target in build_sources or target.split("/")[0] in build_sources
            assert copied, f"{rs.name} embeds {target}, not copied"
            assert (REPO / target).is_file(), f"{rs.name} embeds {target}, missing"
            assert not dockerignore_excludes(target), f"{target} is excluded by .dockerignore"
            embedded += 1


def test_the_runtime_command_resolves():
    runtime = dict(stages(REPO / "Dockerfile"))["runtime"]
    cmd = json.loads(next(args for ins, args in runtime if ins == "CMD"))
    assert cmd == ["/app/start_server.sh"]
    dests = {}
    for sources, dest, from_stage in copies(runtime):
        for src in sources:
            target = dest + Path(src).name if dest.endswith("/") else dest
            dests[target] = (src, from_stage)
    # The script comes from the repository, executable, with a shebang.
    src, from_stage = dests["/app/start_server.sh"]
    assert from_stage is None
    assert os.access(REPO / src, os.X_OK) and not git_ignored(src)
    assert (REPO / src).read_text().startswith("#!/usr/bin/env bash\n")
    # It runs the llama-pow beside it, which the build stage built from Cargo.toml's binary.
    assert '"$here/llama-pow"' in (REPO / src).read_text()
    src, from_stage = dests["/app/llama-pow"]
    assert from_stage == "build" and src == "/usr/local/bin/llama-pow"
    build = " ".join(args for ins, args in dict(stages(REPO / "Dockerfile"))["build"] if ins == "RUN")
    assert "cargo build --release --locked --bin llama-pow" in build
    assert "target/release/llama-pow /usr/local/bin/llama-pow" in build
    assert re.search(r'\[\[bin\]\]\s*name = "llama-pow"', (REPO / "Cargo.toml").read_text())
    # The worker files the image carries.
    assert dests["/app/worker/worker.py"][0] == "worker/worker.py"
    assert dests["/app/worker/runpod_handler.py"][0] == "worker/runpod_handler.py"
    # Unprivileged, the server's port, a health check on /health.
    users = [args for ins, args in runtime if ins == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert ("EXPOSE", "18000") in runtime
    health = next(args for ins, args in runtime if ins == "HEALTHCHECK")
    assert "/health" in health


def image_env():
    env = {}
    runtime = dict(stages(REPO / "Dockerfile"))["runtime"]
    for ins, args in runtime:
        if ins == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def test_the_image_layout_starts_and_passes_its_health_check(tmp_path):
    """The runtime command as the image runs it: start_server.sh with llama-pow beside it and
    the image's environment, then the HEALTHCHECK command."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy2(REPO / "start_server.sh", app / "start_server.sh")
    os.symlink(llama_pow_bin(), app / "llama-pow")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_POW_")}
    for key, value in image_env().items():
        if key != "PATH":
            env[key] = value
    assert env["MODEL_LOG"] == "/var/log/model/server.log"
    env["MODEL_LOG"] = str(tmp_path / "var/log/model/server.log")
    env["LLAMA_POW_PORT"] = str(port)
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [str(app / "start_server.sh")],
            env=env,
            cwd=app,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    try:
        assert wait_until(30, lambda: READY_LINE in read_text(env["MODEL_LOG"]).splitlines()), read_text(out_path)
        runtime = dict(stages(REPO / "Dockerfile"))["runtime"]
        health = next(args for ins, args in runtime if ins == "HEALTHCHECK")
        check = json.loads(health.split(" CMD ", 1)[1])
        assert check[0] == "python3"
        done = subprocess.run(
            [sys.executable] + check[1:], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
    finally:
        assert stop_process(proc) == 0


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_actions_schema(workflow):
    done = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = ["start_server.sh", "scripts/test.sh", "scripts/gpu-acceptance.sh", ".ci/run"]
    done = subprocess.run(
        [tool("shellcheck"), "--color=never"] + scripts,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_finds_nothing():
    # The workflows' shell steps go through the pinned shellcheck; Python snippets (there are
    # none) are not linted, so the result does not depend on what else is installed.
    done = subprocess.run(
        [tool("actionlint"), "-no-color", f"-shellcheck={tool('shellcheck')}", "-pyflakes="]
        + [str(w) for w in WORKFLOWS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflows_run_the_checks_the_project_relies_on():
    names = sorted(w.name for w in WORKFLOWS)
    assert names == ["ci.yml", "docker.yml"]
    ci = (REPO / ".github/workflows/ci.yml").read_text()
    assert "cargo fmt --all -- --check" in ci
    assert "-- -D warnings" in ci
    assert "run: scripts/test.sh\n" in ci
    assert "scripts/test.sh --sdk-only" in ci
    docker = (REPO / ".github/workflows/docker.yml").read_text()
    assert "ghcr.io" in docker and '"v*"' in docker and "branches: [main]" in docker
    assert "push: true" in docker
    assert (REPO / ".ci/run").read_text().rstrip().endswith("exec scripts/test.sh")
