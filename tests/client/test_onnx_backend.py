"""ONNX's own operator test suite (issue 19, item 12): every node test case the installed
onnx package generates (onnx.backend.test.case.node: ~1,900 models with their inputs and
expected outputs, the suite runtimes are certified with) is imported twice: as it is, and
with its inputs turned into initializers (so that the import-time folds compute the
whole model). Each import either succeeds or raises OnnxImportError: 0 crashes. Every
model that imports with its inputs as graph inputs is run by the engine (in-process) and
its outputs checked against ONNX's expected ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
from onnx import numpy_helper  # noqa: E402

from gradserve import engine  # noqa: E402
from gradserve.client.extras import MissingExtra  # noqa: E402
from gradserve.client.onnx import OnnxImportError, from_onnx  # noqa: E402
from gradserve.server.convert import graph_from_proto  # noqa: E402


@pytest.fixture(scope="module")
def cases():
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(None) if c.data_sets]


def folded(case):
    """The case's model with its test inputs as initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    inputs, _ = case.data_sets[0]
    for value_info, array in zip(case.model.graph.input, inputs):
        if isinstance(array, np.ndarray):
            m.graph.initializer.append(numpy_helper.from_array(array, value_info.name))
    return m


def try_import(m):
    """('ok', import) | ('refused', message) | ('crash', description)."""
    try:
        with np.errstate(all="ignore"):
            return "ok", from_onnx(m)
    except (OnnxImportError, MissingExtra) as err:
        return "refused", str(err)
    except BaseException as err:  # noqa: BLE001 - what this test exists to find
        return "crash", f"{type(err).__name__}: {err}"


def test_the_operator_suite_never_crashes_the_importer(cases):
    assert len(cases) > 1500, len(cases)
    crashes, imported = [], 0
    for case in cases:
        for how, m in (("as is", case.model), ("folded", folded(case))):
            status, result = try_import(m)
            if status == "crash":
                crashes.append(f"{case.name} ({how}): {result}")
            imported += status == "ok"
    assert not crashes, "\n".join(crashes)
    assert imported > 1200, imported  # about 540 as is and 900 folded today


def test_imported_cases_compute_onnx_expected_outputs(cases):
    checked, wrong = 0, []
    for case in cases:
        status, imported = try_import(case.model)
        if status != "ok":
            continue
        inputs, expected = case.data_sets[0]
        names = [i.name for i in case.model.graph.input]
        feeds = {n: np.asarray(a) for n, a in zip(names, inputs) if n in imported.inputs}
        try:
            plan = engine.compile(graph_from_proto(imported.graph.build()))
            with np.errstate(all="ignore"):
                got = plan.evaluate(feeds)
        except engine.EngineError:
            continue  # refused by the engine (e.g. an empty reduction): not a wrong value
        for name, want in zip(imported.outputs, expected):
            want = np.asarray(want)
            tol = 1e-3 if want.dtype == np.float32 else 1e-7
            if got[name].shape != want.shape or not np.allclose(
                    got[name], want, rtol=tol, atol=tol, equal_nan=True):
                wrong.append(f"{case.name}: output {name}")
        checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 500, checked


def test_an_empty_max_is_refused_clearly(cases):
    case = next(c for c in cases if c.name == "test_reduce_max_empty_set_bool")
    status, message = try_import(folded(case))
    assert status == "refused"
    assert "ReduceMax" in message and "max over an empty axis" in message, message
