"""A worker's tuning defaults (`zmserve worker` / `zmserve serve` options and WorkerConfig): how much it holds,
batches and waits."""

MAX_INFLIGHT_MODEL_CALLS = 64
"""Model calls a worker keeps in flight per servable; the stage PUB sockets have no HWM, so this bound is what
keeps their queues finite and guarantees a publish is never dropped."""
MAX_BATCH_SIZE = 32
"""Instances per model call for servables with a batch dimension (a model exported with a fixed batch size
uses that size instead)."""
MAX_BATCH_DELAY_S = 0.002
"""How long the first instance of a batch may wait for others."""
MAX_SEQUENCES = 16
"""Sequences a worker generates at once (requests whose stage calls a stateful model); more: RESOURCE_EXHAUSTED."""
EXECUTION_TIMEOUT_S = 30.0
"""A pipeline with calls in flight that returns no result for this long is a sick group: its agents restart."""
DRAIN_TIMEOUT_S = 30.0
"""A worker told to stop (SIGTERM) finishes the requests it holds for at most this long, then stops anyway."""
MAX_QUEUED_REQUESTS = 1024
"""Requests a worker holds (running or waiting) before it answers RESOURCE_EXHAUSTED."""
