"""Every benchmark's `--quick` smoke run, so that none can rot: each runs to the end on tiny data
and prints its table with the ratios it exists to measure (bench/quality.py's quick run is
checked number by number in test_quality_bench.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# benchmark: what its table must show (a column or line only a complete run prints)
EXPECTED = {
    "length_buckets.py": ["speed-up vs first row", "max abs diff of vectors"],
    "memory.py": ["peak vs unchunked", "## frozen-layer cache"],
    "rank_memory.py": ["| after |", "predicted drop"],
    "prepare_scale.py": ["wall ray / pandas", "## memory ceiling"],
    "train_throughput.py": ["x naive", "+act_ckpt"],
    "update.py": ["NDCG@10 vs stale", "| full retrain |", "update kept:"],
    "serve.py": ["recall@10 user vectors", "goal p99"],
    "online.py": ["| all | learner |", "NDCG@10 - stale", "events/s learnt", "Goals (issue 22):"],
}


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(EXPECTED))
def test_quick_run_prints_its_table(bench, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "bench" / bench), "--quick"], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for text in EXPECTED[bench]:
        assert text in result.stdout, f"{bench} --quick printed no {text!r}:\n{result.stdout[-3000:]}"
