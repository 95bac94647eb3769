"""The copies of a tensor's data on each side of a call, with the generated code and with
gradserve.v1.tensor_wire: time and MB/s of each step for a 16 MiB float32 tensor.

    python bench/bench_tensor_wire.py [--mib 16] [--rounds 21]

Per direction, a sender writes the message and a receiver reads it; grpcio itself adds
one copy on each side (Python bytes -> its slice, and its slice -> Python bytes), the
same on both paths and not timed here. With the generated code the sender copies the
data three times (ndarray.tobytes, the assignment to Tensor.data, SerializeToString)
and the receiver twice (FromString, reading Tensor.data); tensor_wire writes it once
(one join of the headers and the arrays' memoryviews) and reads it not at all
(np.frombuffer over the received bytes). The `Python bytes allocated` column is
tracemalloc's peak, which sees Python's allocations but not protobuf's arena, so it
confirms tensor_wire's counts and is a lower bound for the generated code's. Medians of
`--rounds`; never asserts on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import fill_tensors, from_tensors
from gradserve.v1.tensor_wire import TensorMessage, decode


def generated_write(a):
    request = pb.DifferentiateRequest(graph_id="g" * 64, request_id="1")
    fill_tensors(request.inputs, {"x": a})
    return request.SerializeToString()


def generated_read(data):
    return from_tensors(pb.DifferentiateRequest.FromString(data).inputs, "inputs")["x"]


def tensor_wire_write(a):
    return TensorMessage(pb.DifferentiateRequest(graph_id="g" * 64, request_id="1"),
                         {"inputs": {"x": a}}).SerializeToString()


def tensor_wire_read(data):
    return decode(pb.DifferentiateRequest, data).inputs["x"]


def timed(fn, arg, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def allocated(fn, arg) -> int:
    tracemalloc.start()
    result = fn(arg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    a = np.random.default_rng(0).standard_normal(args.mib << 18).astype(np.float32)
    data = generated_write(a)
    assert tensor_wire_write(a) == pb.DifferentiateRequest.FromString(data).SerializeToString(
        deterministic=True)
    assert np.array_equal(tensor_wire_read(data), a)
    print(f"{a.nbytes / 2 ** 20:.0f} MiB float32 tensor in a DifferentiateRequest "
          f"({len(data):,} B), medians of {args.rounds}; grpcio's own copy on each side "
          "not included")
    print(f"  {'step':<36}{'copies':>7}{'median ms':>11}{'MB/s':>9}"
          f"{'Python bytes allocated':>24}")
    for step, fn, arg, copies in (
            ("send, generated code", generated_write, a, 3),
            ("send, tensor_wire", tensor_wire_write, a, 1),
            ("receive, generated code", generated_read, data, 2),
            ("receive, tensor_wire", tensor_wire_read, data, 0)):
        t = timed(fn, arg, args.rounds)
        print(f"  {step:<36}{copies:>7}{t * 1e3:>11.2f}{a.nbytes / t / 1e6:>9.0f}"
              f"{allocated(fn, arg):>24,}")


if __name__ == "__main__":
    main()
