"""deploy/Dockerfile and .dockerignore, checked without a container engine; docs/deploy.md's Container
image and Kubernetes sections.

The image must install with the command the README's `make serve` and `make test` run (`make install`),
run the launcher as a numeric non-root user on port 3000, keep its caches on the volume, and set only
known variables.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    DOCKERFILE,
    DOCKERFILE_ENV,
    PASS_THROUGH_ENV,
    ROOT,
    SETTINGS_ENV,
    doc_section,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_user,
    final_stage,
)


def test_dockerfile_installs_with_the_readme_command() -> None:
    runs = [args for op, args in final_stage() if op == "RUN"]
    assert any(re.match(r"make install\b", args) for args in runs), "the image must run `make install`"
    # The README's `make serve` and `make test` install through the same target.
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test"):
        assert re.search(rf"^{target}: install\b", makefile, re.M)
        assert f"make {target}" in (ROOT / "README.md").read_text()
    assert "make install" in doc_section("docs/deploy.md", "Container image")


def test_dockerfile_runs_the_launcher_as_non_root_on_port_3000() -> None:
    stage = final_stage()
    assert dockerfile_user() != 0
    entrypoint = [args for op, args in stage if op == "ENTRYPOINT"][-1]
    assert json.loads(entrypoint) == ["/app/.venv/bin/python", "/app/launcher.py"]
    assert "3000" in [args for op, args in stage if op == "EXPOSE"]
    env = dockerfile_env()
    assert env["PORT"] == "3000" and env["HOSTNAME"] == "0.0.0.0"
    volumes = json.loads([args for op, args in stage if op == "VOLUME"][-1])
    for name in ("HUGGINGFACE_HUB_CACHE", "MULTILORA_CACHE", *("HOME", "HF_HOME", "CUPY_CACHE_DIR")):
        assert any(env[name].startswith(v) for v in volumes), f"{name} is not on a volume"


def test_dockerfile_variants_choose_base_and_torch() -> None:
    instructions = dockerfile_instructions()
    assert ("ARG", "VARIANT=cpu") in instructions
    stages = {args.split(" AS ")[1] for op, args in instructions if op == "FROM" and " AS " in args}
    assert stages == {"base-cpu", "base-cuda"}
    assert ("FROM", "base-${VARIANT}") in instructions
    assert "TORCH_SPEC=torch==2.13.0+cpu" in DOCKERFILE.read_text()  # the Makefile's CPU pin
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


def make_install_commands(path: str) -> str:
    """What `make install` would run from scratch with `path` as PATH (dry run, nothing installed)."""
    env = {"PATH": path, "HOME": "/nonexistent"}
    out = subprocess.run(
        ["/usr/bin/make", "-n", "-B", "-C", str(ROOT), "install"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not Path("/usr/bin/make").exists(), reason="make is not installed")
def test_make_install_adds_the_gpu_extra_where_nvidia_smi_exists(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\n")
    (fake / "nvidia-smi").chmod(0o755)
    cuda = make_install_commands(f"{fake}:/usr/bin:/bin")
    cpu = make_install_commands("/usr/bin:/bin")
    assert "-e '.[dev,gpu]'" in cuda and '"torch"' in cuda
    assert "-e '.[dev]'" in cpu and '"torch==2.13.0"' in cpu


def test_dockerfile_variants_set_the_makefiles_extras() -> None:
    """A build sees no GPU: the CUDA variant passes what `make install` picks on a CUDA machine."""
    stages: dict[str, dict[str, str]] = {}
    for op, args in dockerfile_instructions():
        if op == "FROM":
            current = stages.setdefault(args.split(" AS ")[-1], {})
        elif op == "ENV":
            current.update({k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S*)', args)})
    assert stages["base-cpu"]["INSTALL_EXTRAS"] == "dev"
    assert stages["base-cuda"]["INSTALL_EXTRAS"] == "dev,gpu"
    runs = [args for op, args in final_stage() if op == "RUN"]
    assert any('make install TORCH_SPEC="$TORCH_SPEC" INSTALL_EXTRAS="$INSTALL_EXTRAS"' in r for r in runs)
    assert not any("pip install -e" in r for r in runs), "the extras go through make install"


def test_dockerfile_env_vars_are_known() -> None:
    unknown = set(dockerfile_env()) - SETTINGS_ENV - set(PASS_THROUGH_ENV) - set(DOCKERFILE_ENV)
    assert not unknown, f"unexplained image variables: {sorted(unknown)}"


def test_dockerignore_keeps_what_make_install_needs() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
            for pat in patterns
            for p in prefixes
        )

    for needed in (
        "Makefile",
        "pyproject.toml",
        "README.md",
        "launcher.py",
        "router/app.py",
        "worker/__main__.py",
        "proto/generate.proto",
        "proto/generate_stubs.py",
        "demo_adapters/pirate/adapter_config.json",
        "csrc",
    ):
        assert (ROOT / needed).exists(), needed
        assert not ignored(needed), f".dockerignore drops {needed}"
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "router/__pycache__/app.cpython-311.pyc",
        "proto/generate_pb2.py",
    ):
        assert ignored(dropped), f".dockerignore keeps {dropped}"


def test_docs_document_the_deployment() -> None:
    image = doc_section("docs/deploy.md", "Container image")
    for needed in ("docker build -f deploy/Dockerfile", "VARIANT=cuda"):
        assert needed in image, needed
    section = doc_section("docs/deploy.md", "Kubernetes")
    for needed in (
        "deploy/k8s/base",
        "deploy/k8s/overlays/gpu",
        "tgi_queue_size",
        "prometheus-adapter-rules.yaml",
        "/health",
        "LeaderWorkerSet",
        "KV_CACHE_MEMORY",
        "LORA_ADAPTERS",
    ):
        assert needed in section, needed
