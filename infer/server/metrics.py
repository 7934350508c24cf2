"""/metrics: Prometheus text from the engine's counters and the server's HTTP counts."""

from infer.server.core import Server


def metrics_text(server: Server) -> str:
    """/metrics: the engine's counters and gauges and the HTTP counts, as Prometheus text."""
    m = server.engine.metrics()
    rows = [
        ("requests_total", "counter", "Requests received by the engine.", m["requests"]),
        ("requests_finished_total", "counter", "Requests finished (any reason).", m["finished"]),
        ("requests_cancelled_total", "counter", "Requests cancelled (client gone or asked).", m["cancelled"]),
        ("requests_preempted_total", "counter", "Preemptions for lack of cache pages.", m["preempted"]),
        ("prompt_tokens_total", "counter", "Prompt tokens received.", m["prompt_tokens"]),
        ("generation_tokens_total", "counter", "Tokens generated.", m["generated_tokens"]),
        ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
         m["cached_tokens"]),
        ("engine_steps_total", "counter", "Engine scheduling steps.", m["steps"]),
        ("engine_host_seconds_total", "counter",
         "Seconds the engine thread spent on host work (scheduling, inputs, sampling settings, outputs), not "
         "waiting for the device.", m["host_seconds"]),
        ("structured_mask_seconds_total", "counter", "Seconds spent computing structured-output token masks.",
         m["mask_seconds"]),
        ("structured_masked_tokens_total", "counter", "Tokens sampled under a structured-output mask.",
         m["masked_tokens"]),
        ("structured_fallbacks_total", "counter",
         "Structured-output steps where no canonical token was found and the grammar's mask was used as is "
         "(that answer's token ids may not be the tokenizer's encoding of its text).", m["structured_fallbacks"]),
        ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", m["tokens_per_second"]),
        ("queue_depth", "gauge", "Requests waiting for admission.", m["waiting"]),
        ("running_requests", "gauge", "Requests admitted (prefilling or decoding).", m["running"]),
        ("cache_pages_used", "gauge", "Cache pages owned by requests.", m["pages_used"]),
        ("cache_pages_total", "gauge", "Cache pages available to requests.", m["pages_total"]),
        ("cache_usage_ratio", "gauge", "Fraction of cache pages in use.", m["pages_used"] / m["pages_total"]),
    ]
    if "spec_draft_tokens" in m:  # --speculative (infer/speculative/decoder.py)
        rows += [
            ("spec_draft_tokens_total", "counter", "Draft tokens proposed.", m["spec_draft_tokens"]),
            ("spec_accepted_tokens_total", "counter", "Draft tokens accepted.", m["spec_accepted_tokens"]),
            ("spec_verify_rows_total", "counter", "Rows verified (one per request and step).",
             m["spec_verify_rows"]),
            ("spec_acceptance_rate", "gauge", "Accepted / proposed draft tokens.", m["spec_acceptance_rate"]),
            ("spec_mean_accepted_length", "gauge", "Tokens gained per row and verify step.",
             m["spec_mean_accepted_length"]),
        ]
    lines = []
    for name, kind, doc, value in rows:
        lines += [f"# HELP small4_{name} {doc}", f"# TYPE small4_{name} {kind}", f"small4_{name} {value}"]
    lines += ["# HELP small4_http_requests_total HTTP requests by path and status.",
              "# TYPE small4_http_requests_total counter"]
    for (path, status), n in sorted(server.http_counts.items()):
        lines.append(f'small4_http_requests_total{{path="{path}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"
