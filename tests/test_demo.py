"""`make demo` end to end, on a few hundred SST-2 sentences: trains, evaluates, prints the Table-2
row and predictions, and a rerun with the same settings reuses the finished run."""

import os
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path, minilm_dir, data_dir):
    env_cmd = [sys.executable, "-m", "lmforge.demo"]
    env = {**os.environ, "LMFORGE_DATA": str(data_dir), "LMFORGE_DEMO_SAMPLES": "256"}
    first = subprocess.run(env_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    out = first.stdout
    assert "| minilm (lora) | 74.5K |" in out          # the Table-2 row with its trainable parameters
    assert "SST-2" in out and "lmforge serve" in out
    assert sum(line.strip().startswith(("positive", "negative")) for line in out.splitlines()) == 5
    assert (tmp_path / "runs/demo-sst2-lora/best/adapter_model.safetensors").is_file()
    again = subprocess.run(env_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "| minilm (lora) |" in again.stdout
