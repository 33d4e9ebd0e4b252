"""The /metrics text under another namespace (vLLM's names for its dashboards)."""

from __future__ import annotations

from afdserve.server.metrics import ServerMetrics


def test_metrics_prefix_renames_every_series():
    default, vllm = ServerMetrics("m"), ServerMetrics("m", prefix="vllm")
    for m in (default, vllm):
        m.watch(lambda: {"running": 3, "waiting": 1, "kv_usage": 0.5, "num_preemptions": 2})
        m.on_tokens(4, 0.01, True, "stop", 0.2, queue_s=0.001)
    plain, renamed = default.render().decode(), vllm.render().decode()
    assert "afdserve:num_requests_running{model_name=\"m\"} 3.0" in plain
    assert "vllm:num_requests_running{model_name=\"m\"} 3.0" in renamed and "afdserve:" not in renamed
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in renamed
    assert renamed.replace("vllm:", "afdserve:") == plain
