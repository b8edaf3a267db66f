"""profiler_ft: placeholder package; built by a later issue."""
