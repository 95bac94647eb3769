"""Client.train_steps_async over real gRPC on 127.0.0.1: the same results as
train_steps; on a stored state a call sent ahead of its predecessor (versions
predicted, previous + 1) is refused without stepping and steps once when sent
again; a retry of call n after n+1 stepped gets n's own reply; a lost state is
NOT_FOUND on the future, never put again from the handle's old arrays."""

from __future__ import annotations

from concurrent.futures import Future

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.server.limits import Limits
from support.regression import data, initial, model

LR, MU = 0.1, 0.9


def rows(k: int) -> list:
    return list(range(8 * k, 8 * k + 8))


def call(client, g, state, train, version, k, sync=False, **extra):
    send = client.train_steps_async if not sync else client.train_steps
    return send(g, state, learning_rate=LR, momentum=MU, loss="loss", data=train,
                rows=rows(k), batch_sizes=[8], state_version=version, **extra)


def sequential(client, g, steps: int):
    """The oracle: train_steps, one call at a time, on a state of its own."""
    state, train = client.put(initial()), client.put(data())
    results = [call(client, g, state, train, k, k, sync=True) for k in range(steps)]
    return results, client.get(state)


def test_inline_parameters_equal_train_steps(client):
    g, params, d = model(), initial(), data()
    batches = {n: a[:32].reshape(4, 8, -1) for n, a in d.items()}
    want = client.train_steps(g, params, batches, learning_rate=LR, momentum=MU, loss="loss")
    future = client.train_steps_async(g, params, batches, learning_rate=LR, momentum=MU,
                                      loss="loss")
    assert isinstance(future, Future)
    got = future.result(timeout=30)
    assert got.losses == want.losses
    for name in params:
        np.testing.assert_array_equal(got.parameters[name], want.parameters[name])
        np.testing.assert_array_equal(got.velocity[name], want.velocity[name])


def test_two_in_flight_step_as_one_at_a_time(client):
    g = model()
    want, want_state = sequential(client, g, 6)
    state, train = client.put(initial()), client.put(data())
    futures = [call(client, g, state, train, 0, 0)]
    got = []
    for k in range(1, 7):  # call k sent before call k-1's reply is read
        if k < 6:
            futures.append(call(client, g, state, train, k, k))
        result = futures[k - 1].result(timeout=30)
        assert result.state_version == k
        got.append(result)
    assert [r.losses for r in got] == [r.losses for r in want]
    stored = client.get(state)
    for name, value in want_state.items():
        np.testing.assert_array_equal(stored[name], value)


def test_a_call_ahead_of_its_predecessor_is_refused_then_steps_once(client):
    """Call 1 sent (and answered) before call 0: refused naming state_version, nothing
    stepped; sent again after call 0's reply, it steps once."""
    g = model()
    want, want_state = sequential(client, g, 2)
    state, train = client.put(initial()), client.put(data())
    with pytest.raises(grpc.RpcError) as info:
        call(client, g, state, train, 1, 1).result(timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the state is at version 0, this call steps from 1" in info.value.details()
    first = call(client, g, state, train, 0, 0).result(timeout=30)
    second = call(client, g, state, train, 1, 1).result(timeout=30)
    assert (first.losses, second.losses) == (want[0].losses, want[1].losses)
    assert (second.state_version, second.state_steps) == (2, 2)
    stored = client.get(state)
    for name, value in want_state.items():
        np.testing.assert_array_equal(stored[name], value)


def test_a_retry_of_call_n_after_n_plus_1_stepped_gets_its_own_reply(client):
    """The reply of call n lost (its retry sent) after call n+1 stepped: n's own losses
    and, as it asked, the parameters n made; the state steps once per call."""
    g = model()
    state, train = client.put(initial()), client.put(data())
    first = call(client, g, state, train, 0, 0, return_state=True).result(timeout=30)
    second = call(client, g, state, train, 1, 1).result(timeout=30)
    again = call(client, g, state, train, 0, 0, return_state=True).result(timeout=30)
    assert again.losses == first.losses and again.state_version == 1
    for name in first.parameters:
        np.testing.assert_array_equal(again.parameters[name], first.parameters[name])
        np.testing.assert_array_equal(again.velocity[name], first.velocity[name])
    assert call(client, g, state, train, 1, 1).result(timeout=30).losses == second.losses
    assert client.train_steps(g, state, learning_rate=LR, momentum=MU, loss="loss",
                              data=train, rows=rows(2), batch_sizes=[8],
                              state_version=2).state_steps == 3


def test_a_lost_state_is_not_found_and_not_put_again(address):
    g = model()
    with Client(address) as client:
        state, train = client.put(initial()), client.put(data())
        call(client, g, state, train, 0, 0).result(timeout=30)
        client.delete(state)
        with pytest.raises(grpc.RpcError) as info:
            call(client, g, state, train, 1, 1).result(timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert state.id in info.value.details()
        assert not client.delete(state)  # nothing was put again under the handle


def test_a_graph_the_server_dropped_goes_inline(start_server):
    """A server that no longer holds the graph (its cache keeps one graph here): the
    call is sent again with the graph inline, as train_steps does."""
    g = model()
    server = start_server(Limits(max_cached_graphs=1))
    with Client(f"127.0.0.1:{server.port}") as client:
        want, _ = sequential(client, g, 1)
        state, train = client.put(initial()), client.put(data())
        client.register(model(features=5))  # the first graph is dropped
        result = call(client, g, state, train, 0, 0).result(timeout=30)
        assert result.state_version == 1 and result.losses == want[0].losses
