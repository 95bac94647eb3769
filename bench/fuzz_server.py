"""Long fuzz run of the real server: the structure-aware strategies of tests/server/test_fuzz.py
(random graphs valid and subtly invalid, random tensors, wrt/of/modes/seeds, inline or
by id, unary or streamed, or serialized bytes with a few bytes corrupted), driven by
atheris (libFuzzer, coverage-guided over the instrumented gradserve code) when it is
installed, else by random buffers, through hypothesis's fuzz_one_input.

    python bench/fuzz_server.py --examples 100000 [--engine atheris|random]
                                [--max-seconds 1500] [--seed 1] [--artifacts DIR]

Two in-process servers on 127.0.0.1 (default limits and small ones), the raw stub, a
30 s deadline on every call. A finding is a reply that is not OK or a documented code
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED) with a message and a BadRequest detail,
a wrong worked example after an input, or any other exception: each is counted, its
first traceback printed and its input saved under --artifacts; the run goes on. Inputs
of the known bug class (a zero dimension next to a huge one, see
tests/server/test_hardening.py) are counted apart. Prints inputs tried, examples run, codes
seen, findings, the slowest input and the RSS of this process (servers included).
Exit code: 0 when nothing new was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))  # test_fuzz.py: its strategies


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self, target: int, max_seconds: float, artifacts: Path, engine: str):
        self.target, self.max_seconds, self.artifacts, self.engine = (
            target, max_seconds, artifacts, engine)
        self.inputs = 0  # buffers given to hypothesis
        self.examples = 0  # scenarios built and sent
        self.calls = 0
        self.codes: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()
        self.findings: collections.Counter = collections.Counter()
        self.first_trace: dict[str, str] = {}
        self.known = collections.Counter()
        self.slowest = (0.0, "")
        self.started = time.monotonic()
        self.rss_start = rss_mib()
        self.rss_warm = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> None:
        print(f"[{self.elapsed():7.1f} s] inputs {self.inputs:,}  examples {self.examples:,}  "
              f"calls {self.calls:,}  findings {sum(self.findings.values())}  known "
              f"{sum(self.known.values())}  RSS {rss_mib():.0f} MiB", flush=True)

    def report(self) -> int:
        seconds = self.elapsed()
        print("\n=== gradserve fuzz report ===")
        print(f"engine            {self.engine}")
        print(f"inputs tried      {self.inputs:,} in {seconds:.0f} s "
              f"({self.inputs / max(seconds, 1e-9):.0f}/s)")
        print(f"examples run      {self.examples:,} (inputs hypothesis turned into requests)")
        print(f"calls made        {self.calls:,} (plus one worked example after each example)")
        print("codes seen        " + ", ".join(f"{c} {n:,}" for c, n in self.codes.most_common()))
        print("first call kinds  " + ", ".join(f"{k} {n:,}" for k, n in sorted(self.kinds.items())))
        print(f"slowest input     {self.slowest[0]:.2f} s ({self.slowest[1]})")
        warm = self.rss_warm if self.rss_warm is not None else self.rss_start
        print(f"RSS               {self.rss_start:.0f} MiB at start, {warm:.0f} after 1,000 "
              f"inputs, {rss_mib():.0f} at the end")
        print(f"known bug class   {sum(self.known.values()):,} inputs "
              + (", ".join(f"{k} {n}" for k, n in self.known.items()) if self.known else ""))
        if not self.findings:
            print("findings          none: every reply OK or a documented code, no hang")
        else:
            print(f"findings          {sum(self.findings.values())} in "
                  f"{len(self.findings)} kinds (inputs saved in {self.artifacts}):")
            for key, n in self.findings.most_common():
                print(f"  {n:6,} x {key}")
                print("         " + self.first_trace[key].strip().replace("\n", "\n         "))
        return 1 if self.findings else 0


def build(stats: Stats):
    """The hypothesis test whose fuzz_one_input each fuzzer input goes through."""
    import test_fuzz as tf
    from hypothesis import HealthCheck, given, settings

    servers = tf.start_servers()

    @settings(database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(sc=tf.scenarios())
    def one(sc):
        stats.examples += 1
        stats.kinds[sc.calls[0][0]] += 1
        started = time.monotonic()
        known = tf.zero_next_to_huge(sc)
        try:
            codes = tf.send(servers, sc)
            tf.check_alive(servers, sc)
        except tf.Finding as finding:
            if known and "INTERNAL" in str(finding):
                stats.known["INTERNAL on a zero-size shape next to a huge dim"] += 1
                tf.check_alive(servers, sc)
                return
            raise
        finally:
            took = time.monotonic() - started
            if took > stats.slowest[0]:
                stats.slowest = (took, f"{sc.calls[0][0]}, {len(sc.graph.nodes)} nodes")
        stats.calls += len(codes)
        stats.codes.update(codes)

    return one.hypothesis.fuzz_one_input, servers, tf


def classify(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    for code in ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"):
        if code in text:
            # keep the code and the exception type named in the message, drop the values
            words = text.split(":")
            return ":".join(words[:3])[:160]
    return f"{type(exc).__name__}: {text[:120]}"


def make_target(stats: Stats, fuzz_one_input, on_done):
    def target(data: bytes) -> None:
        stats.inputs += 1
        examples = stats.examples
        try:
            fuzz_one_input(data)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding; go on
            key = classify(exc)
            if stats.examples == examples:  # raised before any request was sent
                key = "in the generator (a test bug, not the server's): " + key
            stats.findings[key] += 1
            if key not in stats.first_trace:
                stats.first_trace[key] = "".join(traceback.format_exception(exc))[-3000:]
            name = hashlib.sha1(data).hexdigest()[:16]
            (stats.artifacts / f"finding-{name}.bin").write_bytes(data)
        if stats.inputs == 1000:
            stats.rss_warm = rss_mib()
        if stats.inputs % 10_000 == 0:
            stats.progress()
        if stats.examples >= stats.target or stats.elapsed() > stats.max_seconds:
            on_done()
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000,
                        help="examples to run (inputs hypothesis turns into requests)")
    parser.add_argument("--engine", choices=["atheris", "random"], default=None,
                        help="default: atheris when installed, else random")
    parser.add_argument("--max-seconds", type=float, default=1500.0,
                        help="stop (and report) after this long even if short of --examples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=8192, help="bytes per input")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="where inputs that found something are saved")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # NumPy's RuntimeWarnings from the server
    engine = args.engine
    if engine is None:
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="gradserve-fuzz-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    stats = Stats(args.examples, args.max_seconds, artifacts, engine)
    print(f"gradserve fuzz: {args.examples:,} examples with {engine}, at most "
          f"{args.max_seconds:.0f} s; artifacts in {artifacts}", flush=True)

    if engine == "atheris":
        import atheris
        with atheris.instrument_imports(include=["gradserve", "test_fuzz"]):
            import gradserve.server.app  # noqa: F401 - instrumented for coverage
            import gradserve.v1.codec  # noqa: F401
            import test_fuzz  # noqa: F401 - the generator's branches guide the fuzzer too
        fuzz_one_input, servers, tf = build(stats)

        def done():
            code = stats.report()
            sys.stdout.flush()
            os._exit(code)  # libFuzzer would otherwise go on or exit without the report

        atheris.Setup([sys.argv[0], f"-seed={args.seed}", f"-max_len={args.max_len}",
                       "-rss_limit_mb=8192", "-timeout=300", "-print_final_stats=1", "-len_control=0",
                       f"-runs={10 * args.examples}"],
                      make_target(stats, fuzz_one_input, done))
        atheris.Fuzz()
        return done()  # not reached

    fuzz_one_input, servers, tf = build(stats)
    rng = random.Random(args.seed)
    stop = []
    target = make_target(stats, fuzz_one_input, lambda: stop.append(True))
    while not stop:
        target(rng.randbytes(rng.randint(16, args.max_len)))
    code = stats.report()
    tf.stop_servers(servers)
    return code


if __name__ == "__main__":
    sys.exit(main())
