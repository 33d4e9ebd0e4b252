"""``afdserve bench serve`` against a real server: vLLM's report and JSON keys, exact counts."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serve_reports_and_saves_json(server, tmp_path):
    out = tmp_path / "result.json"
    # vLLM's spellings (`vllm bench serve --backend vllm --dataset-name random --random-input-len ...`)
    r = subprocess.run([sys.executable, "-m", "afdserve", "bench", "serve", "--backend", "vllm", "--host", "127.0.0.1",
                        "--port", str(server.port), "--api-key", server.api_key, "--num-prompts", "12",
                        "--request-rate", "20", "--dataset-name", "random", "--random-input-len", "24",
                        "--random-output-len", "6", "--metric-percentiles", "50,99", "--result-filename", str(out)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("Successful requests:", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):",
                 "P50 E2EL (ms):", "Output token throughput (tok/s):"):
        assert line in r.stdout
    res = json.loads(out.read_text())
    assert res["completed"] == 12 and res["failed"] == 0 and res["model_id"] == server.model_name
    assert res["total_input_tokens"] == 12 * 24 and res["total_output_tokens"] == 12 * 6
    # one gap per text chunk after the first; a chunk may carry two tokens (a character split in two)
    assert all(len(itl) <= 5 for itl in res["itls"]) and sum(map(len, res["itls"])) >= 12 * 5 // 2
    assert 0 < res["mean_ttft_ms"] <= res["mean_e2el_ms"] and res["p99_itl_ms"] >= res["median_itl_ms"]
    assert res["output_throughput"] > 0 and res["duration"] > 0
