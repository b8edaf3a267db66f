"""The replay benchmark (``python -m scripts.bench run CONFIG.yaml``).

Modules, by who owns what: ``workload`` (trace/dataset -> timed requests), ``client`` (the open-loop
streaming sender, one result per request), ``metrics`` (percentiles, throughput, goodput, the
load sampler), ``report`` (plots), ``run`` (config, runs, JSON).
"""
