"""longside.eval: the evaluations run as `longside eval NAME`.

One module per evaluation (`ppl`, `chapterbreak`, `icl`, `passkey`), each with a config
dataclass (`.quick()` for the small version), `run(model, info, config, data=None)`
returning a JSON-ready report, and `plot(report, path)`. `common` holds what they share,
above all `score_after_prefix` (prefix in memory + local window).
"""
