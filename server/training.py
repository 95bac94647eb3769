"""TrainSteps on a stored training state (server.store): the parameters and momentum
buffers stay on the server, a call carries only its minibatches (or rows of a stored
data set) and returns the losses and the state's new version.

Exactly once: a call names the version it steps from; the state keeps the reply of
the call that made its current version, so a retry of that call (its reply lost)
gets the same reply without stepping again, and any other version is refused
(FAILED_PRECONDITION). Calls on one state run one at a time (its lock); a call that
fails changes nothing (the new arrays replace the old only once all steps are done).
"""

from __future__ import annotations

import numpy as np

from gradserve import engine
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.tensor_wire import TensorMessage

from .errors import BadRequest, StateConflict
from .limits import Limits
from .store import VELOCITY, TensorStore, tensor_nbytes


class TrainState:
    def __init__(self, store: TensorStore, limits: Limits):
        self.store, self.limits = store, limits

    def batches(self, request):
        """The steps' minibatches: stacked `batches` (with stored_batches), or a list of
        per-step dicts gathered from the rows of the stored data set `data`."""
        if request.data:
            if request.batches or request.stored_batches:
                raise BadRequest("give batches or data (with rows), not both", field="data")
            return self._rows(request)
        if request.rows or request.batch_sizes:
            raise BadRequest("rows and batch_sizes need data (a stored data set)",
                             field="rows")
        return self.store.tensors(request.stored_batches, "stored_batches", request.batches)

    def _rows(self, request) -> list:
        data = self.store.entry(request.data, "data").tensors
        sizes = list(request.batch_sizes)
        rows = np.fromiter(request.rows, np.int64, len(request.rows))
        limit = self.limits.max_steps_per_call
        if limit and len(sizes) > limit:
            raise engine.ResourceLimitError(f"{len(sizes)} steps in one call, over the limit "
                                            f"of {limit} (max_steps_per_call)",
                                            field="batch_sizes")
        if not sizes or min(sizes) < 1 or sum(sizes) != len(rows):
            raise BadRequest(f"batch_sizes ({len(sizes)} steps, {sum(sizes)} rows, smallest "
                             f"{min(sizes, default=0)}) must be >= 1 each and sum to "
                             f"len(rows) = {len(rows)}", field="batch_sizes")
        lengths = {len(a) if a.ndim else None for a in data.values()}
        if len(lengths) != 1 or None in lengths:
            raise BadRequest("the data set's tensors need one leading axis of examples, the "
                             f"same for all (got {sorted(map(str, lengths))})", field="data")
        n = lengths.pop()
        if len(rows) and rows.view(np.uint64).max() >= n:  # (negatives too: one reduction)
            bad = int(rows[(rows < 0) | (rows >= n)][0])
            raise BadRequest(f"row {bad} is outside the data set's {n} examples",
                             field="rows")
        steps, start = [], 0
        for size in sizes:
            picked = rows[start:start + size]
            start += size
            steps.append({name: a[picked] for name, a in data.items()})
        return steps

    def steps(self, request, graph_id: str, plan, check, run_limits: dict) -> TensorMessage:
        if request.parameters or request.velocity:
            raise BadRequest("with a stored state, parameters and velocity come from it: "
                             "send neither", field="parameters")
        entry = self.store.entry(request.state, "state")
        with entry.lock:
            version = request.state_version
            if entry.last_reply is not None and entry.last_reply[0] == version:
                # a retry of the call that made this version: its reply again (the
                # state it returns is the current one)
                message, evaluation = entry.last_reply[1]
                state = {}
                if request.return_state:
                    tensors = entry.tensors
                    state = {"parameters": {n: a for n, a in tensors.items()
                                            if not n.startswith(VELOCITY)},
                             "velocity": {n[len(VELOCITY):]: a for n, a in tensors.items()
                                          if n.startswith(VELOCITY)}}
                return TensorMessage(message, {"evaluation": evaluation, **state})
            if version != entry.version:
                raise StateConflict(
                    f"the state is at version {entry.version}, this call steps from "
                    f"{version}: send the version of the last reply", field="state_version")
            params = {n: a for n, a in entry.tensors.items() if not n.startswith(VELOCITY)}
            velocity = {n[len(VELOCITY):]: a for n, a in entry.tensors.items()
                        if n.startswith(VELOCITY)}
            result = engine.sgd_steps(
                plan, params, self.batches(request), velocity=velocity,
                learning_rate=request.learning_rate, momentum=request.momentum,
                loss=request.loss or None, max_steps=self.limits.max_steps_per_call,
                max_block_elements=self.limits.max_tensor_elements, check=check,
                **run_limits)
            evaluation = None
            if request.return_state:
                state = {"parameters": result.parameters, "velocity": result.velocity}
            else:
                state = {}
            if request.evaluate_data:
                data = self.store.entry(request.evaluate_data, "evaluate_data").tensors
                outputs = plan.evaluate({**data, **result.parameters}, check=check,
                                        **run_limits)
                names = list(request.evaluate_outputs) or list(outputs)
                for i, name in enumerate(names):
                    if name not in outputs:
                        raise BadRequest(f"'{name[:200]}' is not a graph output",
                                         field=f"evaluate_outputs[{i}]")
                evaluation = {name: outputs[name] for name in names}
            tensors = dict(result.parameters)
            tensors.update({VELOCITY + n: v for n, v in result.velocity.items()})
            self.store.resize(entry, tensor_nbytes(tensors), "state")
            entry.tensors = tensors
            entry.version += 1
            entry.steps += len(result.losses)
            message = pb.TrainStepsResponse(graph_id=graph_id, losses=result.losses,
                                            state_version=entry.version, state_steps=entry.steps)
            entry.last_reply = (version, (message, evaluation))
            return TensorMessage(message, {"evaluation": evaluation, **state})
