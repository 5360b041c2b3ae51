"""The steps of benchmarks/bench_engine.py: (label, policy preset, overrides, token group). Torch-free, so
that the simulator side (benchmarks/resim_engine.py) rebuilds a measured step's policy from its label.
Overrides that are not policy fields (ENGINE_ONLY) are the engine's and loader's switches; bench_engine
pops them before building the policy."""

ENGINE_ONLY = ("read_threads", "direct_dispatch", "copy_chunks", "gate_reads", "defer_insert")

STEPS = [  # (label, policy preset, overrides, token group)
    ("naive", "naive", {}, "naive"),
    ("predictor", "predictor", {}, "unbundled"),
    ("windowing", "windowing", {}, "unbundled"),
    ("windowing_bundling", "windowing_bundling", {}, "main"),
    ("wb+depth64", "windowing_bundling", {"reads_in_flight": 64}, "main"),
    ("wb+depth128", "windowing_bundling", {"reads_in_flight": 128}, "main"),
    ("wb+lru", "windowing_bundling", {"eviction": "lru"}, "main"),
    ("wb+lru+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lru"}, "main"),
    ("wb+lfu", "windowing_bundling", {"eviction": "lfu"}, "main"),
    ("wb+lfu+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu"}, "main"),
    ("wb+lfu+depth128", "windowing_bundling", {"reads_in_flight": 128, "eviction": "lfu"}, "main"),
    # the cache filled at the first (warm-up) token with the hottest neurons of an activation profile (the trace's
    # calibration tokens, which are not measured), then kept by how often neurons fire, window or not
    ("wb+freq+warm+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                    "warm_start": True}, "main"),
    # each layer's cache insert queued after the next layer's reads are submitted (real.engine FlashFFN defer_insert)
    ("wb+freq+warm+depth64+deferinsert", "windowing_bundling", {"reads_in_flight": 64, "eviction": "frequency",
                                                                "warm_start": True, "defer_insert": True}, "main"),
    ("wb+lfu+warm+depth64", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "warm_start": True},
     "main"),
    # kernels launched through Triton's autotuner on every call (before 2026-11-23 15:40 UTC) instead of
    # directly with the config it chose for that shape
    ("wb+lfu+depth64+autotuner", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                        "direct_dispatch": False}, "main"),
    # a layer's reads as three loader jobs, the host waiting for each and then queueing its copy to the
    # device, instead of one job copied at the end (real.engine.COPY_CHUNKS; measured before gating existed)
    ("wb+lfu+depth64+3copies", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "copy_chunks": 3,
                                                      "gate_reads": False}, "main"),
    # three loader jobs, each job's copy queued on the device behind a wait on its own flag (gated), so all
    # but the last chunk's copy overlap the reads. (engine-chunks*.txt, 17:24-17:33 UTC, also ran a layer's
    # cache insert deferred to while the next layer's reads flew, the default there; "+insertnow" steps
    # inserted at once, as the engine does since: no consistent difference, so the deferral was removed)
    ("wb+lfu+depth64+3chunks", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu", "copy_chunks": 3},
     "main"),
    # the host waits for a layer's reads, then queues the copy of the new rows and the FFN over them (before
    # 2026-11-23 16:40 UTC) instead of queueing both before the reads end, behind a device-side wait on a flag
    # the reader threads set (real.engine.GATE_READS; labelled "+gated" in engine-gated.txt)
    ("wb+lfu+depth64+hostwait", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                       "gate_reads": False}, "main"),
    ("wb+concat", "windowing_bundling", {"mem_strategy": "concat"}, "unbundled"),   # memory-management baseline
    # the loader's Python reader threads instead of its default native (pthread) pool; the 2026-11-23 15:00 UTC
    # run had Python as the default and labelled the native steps "+native" instead
    ("wb+pythreads", "windowing_bundling", {"read_threads": "python"}, "main"),
    ("wb+lfu+pythreads", "windowing_bundling", {"eviction": "lfu", "read_threads": "python"}, "main"),
    ("wb+lfu+depth64+pythreads", "windowing_bundling", {"reads_in_flight": 64, "eviction": "lfu",
                                                        "read_threads": "python"}, "main"),
]
