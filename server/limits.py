"""What one server accepts: sizes checked before any work is done."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 64 * MiB  # largest request or reply on the wire
    max_nodes: int = 250_000  # nodes in one graph
    max_inputs: int = 10_000  # inputs of one graph (and entries of inputs/tangents/wrt)
    max_constants: int = 100_000  # constants of one graph
    max_tensor_elements: int = 1 << 25  # elements in one input, seed or constant
    max_intermediate_bytes: int = 2048 * MiB  # estimated values + seeds of one request
    max_cached_graphs: int = 1024  # compiled graphs kept, least recently used dropped
    max_cache_bytes: int = 512 * MiB  # memory of the compiled graphs kept (server.registry)
    max_concurrent_rpcs: int = 128  # requests in progress; more get RESOURCE_EXHAUSTED
    max_trace_elements: int = 1_000_000  # array elements in one request's trace
    max_request_flops: int = 10 ** 12  # estimated floating-point operations of one request
    max_residual_sets: int = 64  # Evaluate results kept for a following VJP (0: none)
    max_residual_bytes: int = 256 * MiB  # the arrays those keep, in all
    residual_seconds: int = 30  # how long one is kept
    max_steps_per_call: int = 1024  # SGD steps one TrainSteps call may run
    # DifferentiateStream: open streams wait without a thread (server.calls), bounded here
    stream_idle_seconds: int = 60  # a stream sending nothing this long ends DEADLINE_EXCEEDED
    max_streams_per_client: int = 64  # open streams from one client address
    max_streams: int = 512  # open streams in all
    # The tensor store (server.store): handles put in chunks, named by later requests
    max_store_bytes: int = 1024 * MiB  # held in all (data plus measured overheads)
    max_store_bytes_per_client: int = 512 * MiB  # held by one client address
    max_store_handles: int = 1024  # handles held (least recently used evicted)
    store_seconds: int = 600  # a handle unused this long expires
    # data in one GetTensors chunk: grpc's Python copies of larger messages take the
    # client fresh pages more often (4 MiB: ~1,400 faults a 102 MB get), more messages
    # cost the server (1 MiB: +8 ms of its CPU a 102 MB get over 2 MiB)
    store_chunk_bytes: int = 2 * MiB
    max_rss_bytes: int = 0  # server process RSS over which new requests are refused (0: off)
    max_references: int = 1_000_000  # Node.inputs entries of one graph, all nodes together

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "Limits":
        """Defaults, then GRADSERVE_<FIELD> variables, then explicit overrides."""
        values = {}
        for f in fields(cls):
            raw = environ.get("GRADSERVE_" + f.name.upper())
            if raw:
                values[f.name] = int(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
