"""Models exported by a real exporter (torch.onnx.export) imported and differentiated
through a real server: LeNet-5, a small ResNet with batch norm, a transformer encoder
layer (embedding, multi-head attention, GELU, layer norm), each checked against the
same model in PyTorch: outputs, and the gradient of a scalar loss with respect to
every parameter against PyTorch autograd. Then training: a small CNN for the 8x8
digits, exported from PyTorch, reaches >= 95% test accuracy through the service, and
an interrupted run resumed from its checkpoint ends where an uninterrupted one does.

The models are in tests/support/exported_models.py (also what bench/bench_onnx.py,
P9, measures).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

torch = pytest.importorskip("torch", reason="exporting models needs torch==2.13.0 "
                                            "(the test extra)")
pytest.importorskip("onnx", reason="ONNX import needs the onnx package (the test extra)")
nn = torch.nn

from gradserve.client.onnx import from_onnx  # noqa: E402
from support.exported_models import (randomize_batch_norm, perturb, make, export, torch_gradients, COMMON)  # noqa: E402


# --- exported models against PyTorch ---------------------------------------------------------

@pytest.mark.parametrize("name, exporter", [
    ("lenet5", "torchscript"), ("resnet", "torchscript"), ("encoder", "torchscript"),
    ("lenet5", "dynamo"), ("resnet", "dynamo"), ("encoder", "dynamo"),
    ("encoder", "dynamo-optimized")])
def test_exported_model_values_and_gradients_match_pytorch(client, name, exporter):
    module, example = make(name)
    data = export(module, example, dynamo=exporter != "torchscript",
                  optimize=exporter == "dynamo-optimized")
    imported = from_onnx(data, parameters="inputs")
    assert imported.inputs == ["x"] and imported.outputs == ["y"]
    assert imported.input_shapes["x"][0] == -1  # the batch dimension stays dynamic
    want, w, grads = torch_gradients(module, example)
    x = example.numpy()
    trainable = [n for n in grads if n in imported.parameters]
    # every PyTorch parameter is an imported parameter, under its own name (but the
    # optimizer's pre-transposed weights: attention's in_proj and the two feed-forward ones)
    missing = 3 if exporter == "dynamo-optimized" else 0
    assert len(trainable) == len(grads) - missing, (sorted(grads), sorted(imported.parameters))
    values = {"x": x, **imported.parameters}
    out, cot = client.vjp(imported.graph, values, {"y": w.astype(np.float32)}, wrt=trainable)
    assert_allclose(out["y"], want, rtol=2e-4, atol=2e-5)
    for n in trainable:
        scale = float(np.max(np.abs(grads[n]))) or 1.0
        assert_allclose(cot[n], grads[n], rtol=1e-3, atol=2e-4 * scale, err_msg=n)
    # another batch size through the same graph
    smaller = example[:3]
    assert_allclose(client.evaluate(imported.graph, {**values, "x": smaller.numpy()})["y"],
                    module(smaller).detach().numpy(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", COMMON)
def test_common_exports_match_pytorch(client, name, exporter):
    make_module, make_input = COMMON[name]
    torch.manual_seed(0)
    module = perturb(randomize_batch_norm(make_module())).eval()
    example = make_input()
    imported = from_onnx(export(module, example, dynamo=exporter == "dynamo"),
                         parameters="inputs")
    assert imported.input_shapes["x"][0] == -1
    want, w, grads = torch_gradients(module, example)
    out, cot = client.vjp(imported.graph, {"x": example.numpy(), **imported.parameters},
                          {"y": w}, wrt=list(grads))
    assert_allclose(out["y"], want, rtol=2e-4, atol=2e-5)
    for n, g in grads.items():
        assert_allclose(cot[n], g, rtol=1e-3, atol=2e-4 * (float(np.max(np.abs(g))) or 1.0),
                        err_msg=n)


def test_constants_mode_sends_only_the_data(client):
    module, example = make("lenet5")
    imported = from_onnx(export(module, example))
    assert imported.parameters == {}
    proto = imported.graph.build()
    assert [i.name for i in proto.inputs] == ["x"]
    assert sum(int(np.prod(t.shape)) for t in proto.constants.values()) == 61706
    x = example.numpy()
    assert_allclose(client.evaluate(imported.graph, {"x": x})["y"],
                    module(example).detach().numpy(), rtol=2e-4, atol=2e-5)


def test_gradient_with_respect_to_the_input_matches_pytorch(client):
    module, example = make("resnet")
    imported = from_onnx(export(module, example))
    x = example.clone().requires_grad_(True)
    y = module(x)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * w).sum().backward()
    _, cot = client.vjp(imported.graph, {"x": example.numpy()}, {"y": w.numpy()})
    assert_allclose(cot["x"], x.grad.numpy(), rtol=1e-3, atol=1e-5)


# --- training an exported model --------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits data set needs the train extra")
    from gradserve.client.datasets import load_dataset
    return load_dataset("digits", test_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    module, example = make("digits_cnn")
    path = tmp_path_factory.mktemp("onnx") / "digits_cnn.onnx"
    path.write_bytes(export(module, example))
    return path


def train_onnx(path, data, config, addresses, resume=False, on_step=None):
    from gradserve.client.gradients import remote_gradient
    from gradserve.client.models import OnnxModelSpec
    from gradserve.client.training import Trainer

    spec = OnnxModelSpec(path, data.num_features, data.num_classes)
    gradient = remote_gradient(addresses, spec.build_graph(), spec.param_names)
    try:
        trainer = Trainer(spec, data, gradient, config)
        return spec, trainer.run(trainer.start(resume), on_step)
    finally:
        gradient.close()


def test_digits_cnn_from_pytorch_reaches_95_percent(address, digits, digits_cnn):
    from gradserve.client.training import TrainConfig

    config = TrainConfig(epochs=12, lr=0.1, momentum=0.9, seed=1)
    spec, state = train_onnx(digits_cnn, digits, config, [address])
    assert state.history[-1].test_accuracy >= 0.95, state.history
    assert spec.param_names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert spec.num_params == 8 * 9 + 8 + 128 * 10 + 10
    assert all(a.dtype == np.float32 for a in state.params.values())
    assert state.step == 12 * math.ceil(len(digits.y_train) / 64)


def test_onnx_model_interrupt_and_resume_equals_the_uninterrupted_run(address, digits,
                                                                      digits_cnn, tmp_path):
    from gradserve.client.training import TrainConfig, load_checkpoint

    class Stop(Exception):
        pass

    def stop_at(step):
        def on_step(state, gradient):
            if state.step == step:
                raise Stop
        return on_step

    checkpoint = str(tmp_path / "cnn.ckpt")
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2, checkpoint=checkpoint,
                         checkpoint_every=5)
    _, full = train_onnx(digits_cnn, digits, TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2),
                         [address])
    with pytest.raises(Stop):
        train_onnx(digits_cnn, digits, config, [address], on_step=stop_at(27))
    assert load_checkpoint(checkpoint).step == 25
    _, resumed = train_onnx(digits_cnn, digits, config, [address], resume=True)
    assert resumed.step == full.step
    for name in full.params:
        assert_allclose(resumed.params[name], full.params[name], rtol=1e-5, atol=1e-6,
                        err_msg=name)


def test_data_parallel_gradient_of_an_onnx_model_equals_one_servers(address, start_server,
                                                                   digits, digits_cnn):
    from gradserve.client.gradients import remote_gradient
    from gradserve.client.models import OnnxModelSpec, one_hot

    spec = OnnxModelSpec(digits_cnn, digits.num_features, digits.num_classes)
    other = f"127.0.0.1:{start_server().port}"
    params = spec.init_params(np.random.default_rng(0))
    X, Y = digits.X_train[:50], one_hot(digits.y_train[:50], digits.num_classes)
    one = remote_gradient([address], spec.build_graph(), spec.param_names)
    two = remote_gradient([address, other], spec.build_graph(), spec.param_names)
    try:
        a, b = one(params, X, Y), two(params, X, Y)
    finally:
        one.close()
        two.close()
    assert_allclose(a.loss, b.loss, rtol=1e-5)
    for name in spec.param_names:
        assert_allclose(a.grads[name], b.grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
