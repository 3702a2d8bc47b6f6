"""Execution: MPI launch, collectives, the torch executor, generation, sampling, backend adapters.

Nothing here knows HF tensor names (that is convert/) or chat text (that is chat/); it
takes token ids and per-rank checkpoints or engines and returns token ids.
"""
