"""A two-node torchrun job on one machine: each "node" is a network namespace made by
`launch/netns_hosts.sh` (its own address on a bridge, hostname and TMPDIR), and
`launch/torchrun.sh` runs once per node (`--nnodes 2 --node-rank 0/1`, c10d rendezvous on node 0's
address, one gloo process per node), as on two machines sharing a filesystem.

What a single node hides and this checks: the rendezvous across hosts, each worker's global, local
and node rank, the per-machine catalogue cache built once per node (each node's own TMPDIR, the
default `data.cache_dir`), the run folder written once (rank 0) on the shared filesystem, and the
metrics of the same world size on one node. A node lost mid-job (every process SIGKILLed) stops
the job in seconds and a rerun resumes to the same metrics. The same two hosts also form a live
two-node SLURM cluster (slurmctld on node 0, a slurmd per node), where `launch/slurm.sbatch` runs
with `--nodes 2`.

Skipped, with the reason, only where namespaces cannot be made: not root, no `ip` (Debian's
iproute2; `.ci/run` installs it), or the kernel refuses `ip netns add`; the SLURM test also where
slurm-wlm is missing or munged is not running (`.ci/run` has both as root). Marked `serial`:
`make test` runs it alone after the parallel tests, so that its processes and timeouts do not
share the cores with another worker's multi-process test.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tiny
from helpers import sbatch_job, twotower

pytestmark = pytest.mark.serial
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "netns_hosts.sh"
NODES = 2
RDZV_PORT = 29400  # each namespace has its own ports: no clash with the root namespace's; one port per job
TIMEOUT_S = 480
LOSS_DETECTED_S = 120  # the surviving node must have failed within this after the loss
SKIPPED_BY_SCRIPT = 77  # netns_hosts.sh up: the kernel or container refused `ip netns add`


@dataclass
class Hosts:
    """The namespaces of one `netns_hosts.sh up`: commands run on node i, its address, its TMPDIR."""
    env: dict
    prefix: str
    folder: Path

    def command(self, node: int, *argv: str) -> list[str]:
        return ["bash", str(SCRIPT), "exec", str(node), *argv]

    def address(self, node: int) -> str:
        return f"10.77.0.{node + 1}"

    def tmp(self, node: int) -> Path:
        return self.folder / f"{self.prefix}{node}" / "tmp"

    def kill(self, node: int, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` (SIGKILL: a node lost; SIGSTOP: a node frozen) to every process of node i (`ip
        netns pids`: torchrun's workers are in sessions of their own, so a process group would miss
        them); the pids signalled."""
        listed = subprocess.run(["ip", "netns", "pids", f"{self.prefix}{node}"], capture_output=True, text=True, timeout=30)
        pids = [int(pid) for pid in listed.stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # ended meanwhile
                pass
        return pids


def _cannot_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (launch/netns_hosts.sh)"
    if not shutil.which("ip"):
        return "no `ip` command (Debian: apt-get install iproute2)"
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts for this module; a prefix of this process's own so that two test sessions on one
    machine do not take each other's namespaces."""
    reason = _cannot_make_namespaces()
    if reason:
        pytest.skip(reason)
    prefix = f"tt{os.getpid() % 100000}n"
    folder = tmp_path_factory.mktemp("nodes")
    env = {**os.environ, "NETNS_PREFIX": prefix, "NETNS_DIR": str(folder)}
    made = subprocess.run(["bash", str(SCRIPT), "up", str(NODES)], env=env, capture_output=True, text=True, timeout=60)
    if made.returncode == SKIPPED_BY_SCRIPT:
        pytest.skip(made.stderr.strip())
    assert made.returncode == 0, made.stderr
    made = Hosts(env, prefix, folder)
    try:
        yield made
    finally:
        for node in range(NODES):  # nothing of a failed test left running in a namespace
            made.kill(node)
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=60)


PROBE = """
import os, socket, sys
name = socket.gethostname()
print(name, socket.gethostbyname(name), os.environ["TMPDIR"])
if sys.argv[1:]:  # connect to the other host's listener
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).sendall(name.encode())
"""


def test_each_host_has_its_own_name_address_and_temp_folder_and_reaches_the_others(hosts):
    listener = subprocess.Popen(hosts.command(1, sys.executable, "-c",
                                              "import socket; s = socket.create_server(('10.77.0.2', 5555)); s.settimeout(30); "
                                              "print(s.accept()[0].recv(64).decode())"),
                                env=hosts.env, stdout=subprocess.PIPE, text=True)
    try:
        seen = [subprocess.run(hosts.command(node, sys.executable, "-c", PROBE), env=hosts.env, capture_output=True,
                               text=True, timeout=30).stdout.split() for node in range(NODES)]
        assert seen == [[f"{hosts.prefix}{node}", hosts.address(node), str(hosts.tmp(node))] for node in range(NODES)]
        for _ in range(50):  # until node 1 listens
            sent = subprocess.run(hosts.command(0, sys.executable, "-c", PROBE, hosts.address(1), "5555"), env=hosts.env,
                                  capture_output=True, text=True, timeout=30)
            if sent.returncode == 0:
                break
        assert sent.returncode == 0, sent.stderr
        assert listener.communicate(timeout=30)[0].strip() == f"{hosts.prefix}0"
    finally:
        listener.kill()
        listener.wait()


# ---- two-node torchrun ---------------------------------------------------------------------------
RANK_PROBE = """
import os, socket
if "RANK" in os.environ and os.environ.get("RANK_PROBE_DIR"):  # a torchrun worker: what it was told
    with open(os.path.join(os.environ["RANK_PROBE_DIR"], os.environ["RANK"]), "w") as f:
        f.write(" ".join([os.environ[k] for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE")] + [socket.gethostname()]))
"""


@dataclass
class Job:
    run: Path
    outputs: list[str]
    "Each node's stdout + stderr."
    ranks: dict[str, list[str]]
    "Global rank -> [RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE, hostname] as each worker saw them."

    @property
    def summary(self) -> dict:
        return json.loads((self.run / "summary.json").read_text())


def _launch(hosts: Hosts, nodes: list[int], nproc: int, overrides: list[str], run: Path, probe: Path,
            port: int) -> list[subprocess.Popen]:
    """`launch/torchrun.sh` on each of `nodes` at once (node rank = position in the list),
    rendezvous on the first one's address; each worker records its ranks in `probe`."""
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(RANK_PROBE)
    env = {**hosts.env, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])),
           "RANK_PROBE_DIR": str(probe), "RDZV_ID": probe.name}
    return [subprocess.Popen(hosts.command(node, "bash", str(ROOT / "launch" / "torchrun.sh"), "--nnodes", str(len(nodes)),
                                           "--node-rank", str(rank), "--nproc-per-node", str(nproc),
                                           "--rdzv-endpoint", f"{hosts.address(nodes[0])}:{port}", "--",
                                           *overrides, f"run.dir={run}"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank, node in enumerate(nodes)]


def _wait(hosts: Hosts, nodes: list[int], launches: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[str]:
    """Each node's output once it has ended; on timeout every process of `nodes` is killed."""
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=timeout)[0])
    finally:
        if len(outputs) < len(launches):
            for node in nodes:
                hosts.kill(node)
            for launch in launches:
                launch.wait()
    return outputs


def _torchrun(hosts: Hosts, nodes: list[int], nproc: int, overrides: list[str], run: Path, probe: Path, port: int) -> Job:
    """A job that must succeed on every node."""
    launches = _launch(hosts, nodes, nproc, overrides, run, probe, port)
    outputs = _wait(hosts, nodes, launches)
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-6000:]
    ranks = {path.name: path.read_text().split() for path in probe.iterdir() if path.name != "sitecustomize.py"}
    return Job(run, outputs, ranks)


@pytest.fixture(scope="module")
def shared(tiny_bert, tmp_path_factory) -> tuple[Path, list[str]]:
    """The shared filesystem: the tiny run's shards, prepared once; the overrides of every job."""
    folder = tmp_path_factory.mktemp("shared")
    overrides = [o for o in tiny(tiny_bert, folder) if not o.startswith("run.dir=")]
    overrides += ["trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.num_threads=1"]
    prepared = twotower("prepare", *overrides, cwd=folder, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-4000:]
    return folder, overrides


@pytest.fixture(scope="module")
def jobs(hosts, shared) -> dict[str, Job]:
    """The tiny run with 2 ranks: on one node (2 processes on node 0) and on two nodes (1 each)."""
    folder, overrides = shared
    return {"one node": _torchrun(hosts, [0], 2, overrides, folder / "one-node", folder / "probe-one", RDZV_PORT),
            "two nodes": _torchrun(hosts, [0, 1], 1, overrides, folder / "two-nodes", folder / "probe-two", RDZV_PORT + 1)}


@pytest.mark.slow
def test_two_nodes_reach_the_metrics_of_one_node_with_the_same_world_size(jobs):
    """Same seeds, same world size, same maths: only the transport differs (tolerance of the
    DDP vs ZeRO comparison in tests/trainers/test_distributed.py)."""
    one, two = jobs["one node"].summary, jobs["two nodes"].summary
    print({key: (one[key], two[key]) for key in ("steps", "best/val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/mrr@20")})
    assert one["steps"] == two["steps"] > 0
    for key in ("best/val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/mrr@20"):
        assert two[key] == pytest.approx(one[key], abs=2e-3), key


@pytest.mark.slow
def test_every_rank_is_told_its_global_local_and_node_rank(jobs, hosts):
    two = jobs["two nodes"]
    assert two.ranks == {"0": ["0", "0", "0", "2", f"{hosts.prefix}0"], "1": ["1", "0", "1", "2", f"{hosts.prefix}1"]}
    for node, output in enumerate(two.outputs):  # Lightning's world, as each node's worker joined it
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in output, output[-4000:]
    one = jobs["one node"]
    assert one.ranks == {"0": ["0", "0", "0", "2", f"{hosts.prefix}0"], "1": ["1", "1", "0", "2", f"{hosts.prefix}0"]}


@pytest.mark.slow
def test_each_node_builds_its_own_catalogue_cache_once(jobs, hosts):
    """The default data.cache_dir is in the temp folder, which is each node's own: one built entry
    per node, the same one (same shards), and none on the shared filesystem's /tmp."""
    entries = [sorted(path.name for path in (hosts.tmp(node) / f"twotower-{os.getuid()}" / "catalogue").iterdir()
                      if path.name.startswith("catalogue-")) for node in range(NODES)]
    assert len(entries[0]) == 1 and entries[1] == entries[0], entries


@pytest.mark.slow
def test_rank_zero_alone_writes_the_run_folder(jobs):
    """One run folder on the shared filesystem, one summary.json, one pair of checkpoints: node 1
    wrote nothing of its own, and the two-node job leaves exactly the files of the one-node job."""
    run = jobs["two nodes"].run
    assert sorted(path.relative_to(run.parent) for path in run.parent.glob("**/summary.json")) == [
        Path("one-node/summary.json"), Path("two-nodes/summary.json")]
    assert sorted(path.relative_to(run) for path in run.glob("**/*.ckpt")) == [
        Path("checkpoints/best.ckpt"), Path("checkpoints/last.ckpt")]
    files = {name: sorted(str(path.relative_to(job.run)) for path in job.run.rglob("*")) for name, job in jobs.items()}
    assert files["two nodes"] == files["one node"], files


# ---- a node lost mid-job -------------------------------------------------------------------------
@pytest.mark.slow
def test_a_lost_node_stops_the_job_and_a_rerun_resumes_to_the_uninterrupted_metrics(hosts, shared, jobs):
    """Every process of node 1 is SIGKILLed once the first epoch's checkpoint exists (during the
    second epoch): node 0's rank fails at its next collective (the peer's sockets are closed) and
    torchrun ends with an error naming that peer's address, well within a bounded time; the same
    two commands with trainer.resume=auto continue from checkpoints/last.ckpt to the metrics of
    the uninterrupted two-node job (the resume tolerance of tests/trainers/test_distributed.py)."""
    folder, overrides = shared
    run = folder / "lost"
    launches = _launch(hosts, [0, 1], 1, overrides, run, folder / "probe-lost", RDZV_PORT + 2)
    last = run / "checkpoints" / "last.ckpt"
    started = time.monotonic()
    while not last.exists() and time.monotonic() - started < TIMEOUT_S and launches[0].poll() is None:
        time.sleep(0.05)
    assert hosts.kill(1), "node 1 had no processes left"
    killed = time.monotonic()
    outputs = _wait(hosts, [0, 1], launches, timeout=LOSS_DETECTED_S)
    failed_after = time.monotonic() - killed
    assert launches[0].returncode != 0, outputs[0][-4000:]
    assert failed_after < LOSS_DETECTED_S
    naming = [line for line in outputs[0].splitlines() if hosts.address(1) in line]
    assert naming, outputs[0][-4000:]
    print(f"node 0 ended {failed_after:.1f} s after node 1 was killed (exit {launches[0].returncode}): {naming[0][:300]}")
    assert not (run / "summary.json").exists()

    resumed = _torchrun(hosts, [0, 1], 1, [*overrides, "trainer.resume=auto"], run, folder / "probe-resumed", RDZV_PORT + 3)
    assert f"Restoring states from the checkpoint path at {last}" in resumed.outputs[0], resumed.outputs[0][-4000:]
    full = jobs["two nodes"].summary
    print({key: (full[key], resumed.summary[key]) for key in ("steps", "best/val/ndcg@10", "test/ndcg@10")})
    assert resumed.summary["steps"] == full["steps"]
    for key in ("best/val/ndcg@10", "test/ndcg@10", "test/mrr@20"):
        assert resumed.summary[key] == pytest.approx(full[key], abs=1e-4), key


@pytest.mark.slow
def test_a_frozen_node_fails_the_job_within_the_collective_timeout(hosts, shared):
    """Every process of node 1 is SIGSTOPped during the second epoch: its connections stay open, so
    only `trainer.collective_timeout_s` can stop node 0 from waiting at its next collective (30
    minutes by default); with 20 s it fails within that bound plus the time to tear down."""
    folder, overrides = shared
    run = folder / "frozen"
    launches = _launch(hosts, [0, 1], 1, [*overrides, "trainer.collective_timeout_s=20"], run, folder / "probe-frozen", RDZV_PORT + 4)
    last = run / "checkpoints" / "last.ckpt"
    started = time.monotonic()
    while not last.exists() and time.monotonic() - started < TIMEOUT_S and launches[0].poll() is None:
        time.sleep(0.05)
    assert hosts.kill(1, signal.SIGSTOP), "node 1 had no processes left"
    frozen = time.monotonic()
    try:
        output = launches[0].communicate(timeout=LOSS_DETECTED_S)[0]
    finally:
        hosts.kill(1)  # a stopped process still takes SIGKILL
        _wait(hosts, [0, 1], launches, timeout=60)
    failed_after = time.monotonic() - frozen
    print(f"node 0 ended {failed_after:.1f} s after node 1 froze (exit {launches[0].returncode})")
    assert launches[0].returncode != 0 and 20 <= failed_after < LOSS_DETECTED_S, output[-4000:]
    assert not (run / "summary.json").exists()


# ---- two-node SLURM ------------------------------------------------------------------------------
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "munge")


def _slurm_conf(hosts: Hosts, folder: Path) -> str:
    """A cluster of the two hosts: slurmctld on node 0, a slurmd on each (their own spool, pid and
    log files: `%n` is the node's name); ports are per namespace, so the fixed ones clash with nothing."""
    nodes = "\n".join(f"NodeName={hosts.prefix}{node} NodeAddr={hosts.address(node)} CPUs={os.cpu_count()} RealMemory=1000"
                      for node in range(NODES))
    return f"""# Two nodes in network namespaces (tests/launch/test_multinode.py); see docs/slurm-local.md for one.
ClusterName=twotower-{hosts.prefix}
SlurmctldHost={hosts.prefix}0({hosts.address(0)})
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={hosts.prefix}[0-{NODES - 1}] Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(hosts, tmp_path_factory) -> dict:
    """A live two-node SLURM: slurmctld on node 0, slurmd on each node (Debian's slurm-wlm and a
    running munged, as `.ci/run` has them as root); the environment its commands need. The
    daemons end with the hosts (every process of a namespace is killed)."""
    missing = [tool for tool in SLURM_TOOLS if not shutil.which(tool)]
    if missing:
        pytest.skip(f"no SLURM here (missing {' '.join(missing)}; apt-get install slurm-wlm munge)")
    if subprocess.run(["munge", "-n"], capture_output=True, timeout=10).returncode != 0:
        pytest.skip("munged is not running (launch/slurm_local.sh start DIR starts it; docs/slurm-local.md)")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "state").mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(hosts, folder))
    env = {**hosts.env, "SLURM_CONF": str(conf)}
    daemons = [hosts.command(0, "slurmctld", "-f", str(conf))]
    for node in range(NODES):
        (folder / f"spool-{hosts.prefix}{node}").mkdir()
        daemons.append(hosts.command(node, "slurmd", "-f", str(conf), "-N", f"{hosts.prefix}{node}"))
    for daemon in daemons:
        started = subprocess.run(daemon, env=env, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, (daemon, started.stderr)
    states = ""
    for _ in range(60):
        states = subprocess.run(hosts.command(0, "sinfo", "-h", "-N", "-o", "%t"), env=env, capture_output=True,
                                text=True, timeout=30).stdout.split()
        if states == ["idle"] * NODES:
            break
        time.sleep(1)
    logs = "\n".join(path.read_text()[-1500:] for path in folder.glob("*.log"))
    assert states == ["idle"] * NODES, f"sinfo: {states}\n{logs}"
    return env


@pytest.mark.slow
def test_sbatch_on_two_nodes_trains_like_torchrun_on_two_nodes(slurm, hosts, shared, jobs, tmp_path):
    """`sbatch --nodes 2 --ntasks-per-node 1 launch/slurm.sbatch` (less its GPU and CPU requests):
    one srun task on each node, MASTER_ADDR the allocation's first node (a hostname every node
    resolves), SLURM_PROCID/LOCALID/NODEID as on a cluster; the job reaches the metrics of the
    two-node torchrun job, and rank 0 alone writes summary.json."""
    folder, overrides = shared
    # $PYTHON as each task sees it: records the task's SLURM world and host; sbatch passes the
    # submitting host's TMPDIR to every task, so each takes its own node's temp folder back.
    script, python, ranks = sbatch_job(tmp_path, "$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $(hostname)",
                                       f'export TMPDIR="{hosts.folder}/$(hostname)/tmp"\n')
    out, run = tmp_path / "slurm.out", folder / "slurm-two-nodes"
    env = {**slurm, "PYTHON": str(python), "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    submit = subprocess.Popen(hosts.command(0, "sbatch", "--parsable", "--wait", "--time=8", "--nodes=2", "--ntasks-per-node=1",
                                            f"--output={out}", f"--chdir={ROOT}", str(script), *overrides, f"run.dir={run}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = submit.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        submit.kill()
        stdout, stderr = submit.communicate()
        subprocess.run(hosts.command(0, "scancel", "--user", "root"), env=env, timeout=30)
        pytest.fail(f"job still running after {TIMEOUT_S} s (cancelled)\n{out.read_text()[-4000:] if out.exists() else ''}")
    log = out.read_text() if out.exists() else ""
    assert submit.returncode == 0, stderr + log[-4000:]
    assert f"twotower: 2 node(s) x 1 task(s), rendezvous {hosts.prefix}0:" in log, log[-4000:]
    seen = sorted(path.read_text().split() for path in ranks.iterdir())
    assert seen == [["0", "0", "0", f"{hosts.prefix}0"], ["1", "0", "1", f"{hosts.prefix}1"]], seen
    summary, torchrun = json.loads((run / "summary.json").read_text()), jobs["two nodes"].summary
    print({key: (torchrun[key], summary[key]) for key in ("steps", "best/val/ndcg@10", "test/ndcg@10")})
    assert summary["steps"] == torchrun["steps"]
    for key in ("best/val/ndcg@10", "test/ndcg@10", "test/hr@10", "test/mrr@20"):
        assert summary[key] == pytest.approx(torchrun[key], abs=2e-3), key
    assert sorted(path.relative_to(run) for path in run.glob("**/summary.json")) == [Path("summary.json")]
