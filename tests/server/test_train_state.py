"""TrainSteps on a stored state: parameters and momentum buffers stay on the server, a
call carries only its minibatches (or rows of a stored data set), and the result
equals the same steps made one Differentiate at a time with the worker's own update
rule; exactly once on retries; stale versions and lost states refused by field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradserve.server.store import tensor_nbytes
from gradserve.v1 import gradient_service_pb2 as pb
from support.regression import data, initial, model


def oracle(client, g, params, steps, lr, momentum):
    """One Differentiate per step and PyTorch's SGD rule in float32, on the client."""
    params = dict(params)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    losses = []
    for batch in steps:
        r = client.differentiate(g, {**batch, **params}, wrt=list(params), of=["loss"])
        losses.append(float(r.outputs["loss"]))
        for name, p in params.items():
            velocity[name] = np.float32(momentum) * velocity[name] + r.jacobian["loss", name]
            params[name] = (p - np.float32(lr) * velocity[name]).astype(np.float32)
    return params, velocity, losses


def field_of(err) -> str:
    detail = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(detail)
    return detail.field_violations[0].field


def test_stored_state_equals_one_step_at_a_time(client):
    g, params, d = model(), initial(), data()
    state = client.put(params)
    stacked = {n: a[:48].reshape(6, 8, -1) for n, a in d.items()}
    first = client.train_steps(g, state, {n: a[:4] for n, a in stacked.items()},
                               learning_rate=0.1, momentum=0.9, loss="loss")
    assert first.velocity == {}
    assert (first.state_version, first.state_steps, first.parameters) == (1, 4, {})
    second = client.train_steps(g, state, {n: a[4:] for n, a in stacked.items()},
                                learning_rate=0.1, momentum=0.9, loss="loss",
                                state_version=first.state_version, return_state=True)
    assert (second.state_version, second.state_steps) == (2, 6)
    expected, velocity, losses = oracle(client, g, params, [
        {n: a[k] for n, a in stacked.items()} for k in range(6)], 0.1, 0.9)
    assert first.losses + second.losses == losses
    stored = client.get(state)
    for name in params:
        np.testing.assert_array_equal(stored[name], expected[name])
        np.testing.assert_array_equal(stored["velocity/" + name], velocity[name])
        np.testing.assert_array_equal(second.parameters[name], expected[name])
        np.testing.assert_array_equal(second.velocity[name], velocity[name])


def test_rows_of_a_stored_data_set_with_a_short_last_batch_and_an_evaluation(client):
    g, params, d = model(), initial(), data()
    state, train, test = client.put(params), client.put(d), client.put(data(20, seed=9))
    order = np.random.default_rng(0).permutation(50)
    sizes = [16, 16, 16, 2]  # an epoch of 50 examples, batch 16: the last one short
    r = client.train_steps(g, state, learning_rate=0.05, momentum=0.9, loss="loss",
                           data=train, rows=order, batch_sizes=sizes,
                           evaluate_data=test, evaluate_outputs=["loss"])
    bounds = np.cumsum([0] + sizes)
    expected, _, losses = oracle(client, g, params, [
        {n: a[order[s:e]] for n, a in d.items()} for s, e in zip(bounds, bounds[1:])],
        0.05, 0.9)
    assert r.losses == losses and r.state_steps == 4
    np.testing.assert_array_equal(
        r.evaluation["loss"], client.evaluate(g, {**data(20, seed=9), **expected})["loss"])
    with pytest.raises(grpc.RpcError) as info:
        client.train_steps(g, state, learning_rate=0.05, loss="loss", data=train,
                           rows=[0, 50], batch_sizes=[2], state_version=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(info.value) == "rows" and "row 50" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.train_steps(g, state, learning_rate=0.05, loss="loss", data=train,
                           rows=[0, 1, 2], batch_sizes=[2], state_version=1)
    assert field_of(info.value) == "batch_sizes"


def test_a_retried_call_does_not_step_twice(client, channel):
    """The same request sent twice (its reply lost) gets the same reply, and the state
    steps once; a stale version is FAILED_PRECONDITION."""
    g, params, d = model(), initial(), data()
    state = client.put(params)
    graph_id = client.register(g)
    request = pb.TrainStepsRequest(graph_id=graph_id, loss="loss", learning_rate=0.1,
                                   momentum=0.5, state=state.id, state_version=0)
    from gradserve.v1.codec import fill_tensor
    for name, a in d.items():
        fill_tensor(request.batches[name], a[:32].reshape(2, 16, -1))
    stub = _stub(channel)
    once = stub.TrainSteps(request, timeout=10)
    again = stub.TrainSteps(request, timeout=10)
    assert once.losses == again.losses and once.state_version == again.state_version == 1
    assert again.state_steps == 2
    expected, _, _ = oracle(client, g, params, [{n: a[:16] for n, a in d.items()},
                                                {n: a[16:32] for n, a in d.items()}], 0.1, 0.5)
    for name, value in client.get(state, list(params)).items():
        np.testing.assert_array_equal(value, expected[name])
    request.return_state = True  # the retry may ask for the state: the one it made
    from gradserve.v1.codec import from_tensor
    third = stub.TrainSteps(request, timeout=10)
    assert third.state_version == 1 and third.losses == once.losses
    for name in params:
        np.testing.assert_array_equal(from_tensor(third.parameters[name]), expected[name])
    request.return_state = False
    request.state_version = 1
    assert stub.TrainSteps(request, timeout=10).state_version == 2
    # the call before the last (a client's call in flight ahead, then a lost reply):
    # its own reply, and no step
    request.state_version = 0
    assert stub.TrainSteps(request, timeout=10) == once
    request.return_state = True  # its parameters were not kept (it did not ask for them)
    with pytest.raises(grpc.RpcError) as info:
        stub.TrainSteps(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert field_of(info.value) == "state_version" and "no longer held" in info.value.details()
    request.return_state = False
    request.state_version = 2
    assert stub.TrainSteps(request, timeout=10).state_version == 3
    for version in (0, 4):  # three versions back, or one ahead: not a retry, no step
        request.state_version = version
        with pytest.raises(grpc.RpcError) as info:
            stub.TrainSteps(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert field_of(info.value) == "state_version"
        assert "the state is at version 3" in info.value.details()
    request.state_version = 3
    assert stub.TrainSteps(request, timeout=10).state_steps == 8


def test_a_lost_reply_after_the_next_call_stepped_gets_its_own_reply(server, client, channel):
    """Call n (an epoch's end: an evaluation and its state returned) and call n+1 sent
    before n's reply came: a retry of n after n+1 stepped gets n's own reply (losses,
    evaluation, the parameters n made) and steps nothing; what the two kept replies hold
    is counted in the store with the state."""
    g, params, d = model(), initial(), data()
    state, train, test = client.put(params), client.put(d), client.put(data(20, seed=9))
    graph_id = client.register(g)

    def request(version, rows, **fields):
        r = pb.TrainStepsRequest(graph_id=graph_id, loss="loss", learning_rate=0.1,
                                 momentum=0.9, state=state.id, state_version=version,
                                 data=train.id, rows=rows, batch_sizes=[len(rows)], **fields)
        return r
    end_of_epoch = request(0, list(range(16)), evaluate_data=test.id,
                           evaluate_outputs=["loss"], return_state=True)
    nxt = request(1, list(range(16, 32)))
    stub = _stub(channel)
    entry = server.servicer.store.entry(state.id, "state")
    first = stub.TrainSteps(end_of_epoch, timeout=10)
    # counted beyond the state: n's evaluation (20 values), then n's state too
    assert entry.nbytes - tensor_nbytes(entry.tensors) >= 20 * 4
    stub.TrainSteps(nxt, timeout=10)
    state_bytes = sum(a.nbytes for a in params.values()) * 2
    assert entry.nbytes - tensor_nbytes(entry.tensors) >= 20 * 4 + state_bytes
    assert server.servicer.store.owner_bytes(entry.owner) >= entry.nbytes
    again = stub.TrainSteps(end_of_epoch, timeout=10)
    assert again == first  # its losses, evaluation and parameters, byte for byte
    expected, velocity, losses = oracle(client, g, params, [
        {n: a[:16] for n, a in d.items()}, {n: a[16:32] for n, a in d.items()}], 0.1, 0.9)
    from gradserve.v1.codec import from_tensor
    assert list(again.losses) == losses[:1] and again.state_version == 1
    n_params, _, _ = oracle(client, g, params, [{n: a[:16] for n, a in d.items()}], 0.1, 0.9)
    for name in params:
        np.testing.assert_array_equal(from_tensor(again.parameters[name]), n_params[name])
    np.testing.assert_array_equal(
        from_tensor(again.evaluation["loss"]),
        client.evaluate(g, {**data(20, seed=9), **n_params})["loss"])
    stored = client.get(state)  # n+1's state, stepped once each
    for name in params:
        np.testing.assert_array_equal(stored[name], expected[name])
        np.testing.assert_array_equal(stored["velocity/" + name], velocity[name])
    assert entry.version == 2 and entry.steps == 2
    client.delete(state)


def test_a_lost_state_is_not_found(client):
    g, params = model(), initial()
    state = client.put(params)
    client.train_steps(g, state, {n: a[:16][None] for n, a in data().items()},
                       learning_rate=0.1, loss="loss")
    client.delete(state)
    with pytest.raises(grpc.RpcError) as info:
        client.train_steps(g, state, {n: a[:16][None] for n, a in data().items()},
                           learning_rate=0.1, loss="loss", state_version=1)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert field_of(info.value) == "state"


def _stub(channel):
    from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
    return pb_grpc.GradientServiceStub(channel)
