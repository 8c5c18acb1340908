"""What a run leaves behind: adapter checkpoints and resume points (`checkpoint`), the per-round
`metrics.jsonl`, summary and plot (`metrics`), and the run report (`report`). Written at the
coordinator (the ServerApp) and read by `fedtune report`."""
