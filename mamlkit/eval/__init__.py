"""Eval: fixed test tasks, means with 95% confidence intervals, baselines, reports and figures."""
