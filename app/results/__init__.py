"""What a run leaves behind: adapter checkpoints and resume points (`checkpoint`), the per-round
`metrics.jsonl`, summary and plot (`metrics`), and the run report (`report`). Written at the
coordinator (the ServerApp) and read by `fedtune report`; `records` reads metrics lines (what
nodes reported) tolerantly and `charts` draws them with matplotlib for the plot and the report."""
