"""profiler_ft: UELLM's output-length predictor (a LoRA-tuned classifier over length buckets).

Modules: `buckets` (the classes), `text` (what the backbone reads), `dataset` (build-dataset),
`backbone` (resolve and wrap a backbone), `train` + `checkpoints` (resumable LoRA training),
`artifact` (the predictor folder), `predictor` (the API the router uses), `evaluate` (metrics and
baselines), `__main__` (the CLI). See docs/profiler_ft.md.
"""
