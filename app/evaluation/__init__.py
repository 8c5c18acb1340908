"""FlowerTune's medical evaluation (PubMedQA, MedMCQA, MedQA, CareQA) as `fedtune eval`.

`benchmarks` builds the questions (sources, splits, instructions, prompts, gold answers),
`extract` scores a generated answer, `runner` generates the answers (a fast batched path and
the reference's one-prompt-at-a-time path), `cli` wires them into the command line and
`run_eval` evaluates a finished run's final adapter and writes its report.
"""
