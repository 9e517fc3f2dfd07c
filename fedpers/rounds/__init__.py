"""The round machinery: the engine-agnostic server loop (:mod:`~fedpers.rounds.server`), one client's
round (:mod:`~fedpers.rounds.client_round`) and the in-process transport (:mod:`~fedpers.rounds.engine`)
with its helpers: mixed-client batches (:mod:`~fedpers.rounds.batched`), exact caches
(:mod:`~fedpers.models.cache`), worker processes (:mod:`~fedpers.rounds.workers`), the thread policy
(:mod:`~fedpers.rounds.threads`) and fault drills (:mod:`~fedpers.rounds.faults`). Flower's transport
lives in :mod:`fedpers.flower`."""
