"""`gradserve train`: flags, progress bar, summary, JSON and plot around the SGD worker
(gradserve.client's Trainer and remote_gradient), against the --server addresses or
an in-process server."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace

import grpc

from gradserve.client.datasets import DatasetError, load_dataset
from gradserve.client.extras import MissingExtra, import_optional
from gradserve.client.gradients import DEFAULT_RETRIES, remote_gradient
from gradserve.client.local_sgd import OuterConfig, local_sgd_trainer
from gradserve.client.models import ACTIVATIONS, ModelSpec, OnnxModelSpec
from gradserve.client.training import CheckpointError, Trainer, TrainConfig, save_checkpoint

from .in_process import server_address

DEFAULT_HIDDEN = [64]
UNAVAILABLE_HINT = ("\nIs a gradserve server running there (gradserve serve --port PORT)? Leave "
                    "out --server to train against an in-process server.")


class UsageError(ValueError):
    """Flags that do not fit together."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    add = parser.add_argument
    add("--model", default="mlp", metavar="logreg|mlp|PATH.onnx",
        help="logistic regression, a multilayer perceptron, or an ONNX classifier whose "
             "first input takes the features (reshaped to its shape) and whose first output "
             "is the logits; its initializers are the parameters (default: %(default)s)")
    add("--hidden", type=int, action="append", metavar="WIDTH",
        help=f"an MLP hidden layer's width; repeat for more layers (default: {DEFAULT_HIDDEN[0]})")
    add("--activation", choices=ACTIVATIONS,
        help="the MLP's nonlinearity (default: relu)")
    add("--l2", type=float, default=0.0, help="L2 penalty on the weights (default: 0)")
    add("--dataset", default="digits", metavar="digits|PATH.npz|PATH.csv",
        help="scikit-learn's 8x8 digits, or a file: .npz with arrays X and y, or .csv with "
             "the label in the last column (default: %(default)s)")
    add("--test-fraction", type=float, default=0.2,
        help="share of each class held out for testing (default: %(default)s)")
    add("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    add("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    add("--momentum", type=float, default=d.momentum, help="default: %(default)s")
    add("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    add("--seed", type=int, default=d.seed,
        help="seeds the split, the initial parameters and the batch order (default: %(default)s)")
    add("--server", action="append", metavar="HOST:PORT",
        help="a gradserve server; give several to split each minibatch across them "
             "(default: start one in-process)")
    add("--stream", action="store_true",
        help="send the steps over one DifferentiateStream per server instead of unary calls")
    add("--steps-per-call", type=int, default=d.steps_per_call, metavar="K",
        help="run K SGD steps on the server per call (the TrainSteps RPC): one round trip "
             "for K steps, the same parameters as one step per call. Pays when a step's "
             "round trip is most of its time (small models; K = 16 is plenty); needs one "
             "--server (or none) and no --stream (default: %(default)s)")
    add("--pipeline", action=argparse.BooleanOptionalAction, default=None,
        help="against one --server (unary calls, the state stored there): send each call "
             "before the previous one's reply has come (two in flight), so that the "
             "server's work and this side's overlap: the same steps and results, bitwise, "
             "faster when both sides have a core to run on. Off against the in-process "
             "server: client and server share one Python interpreter lock there and "
             "cannot overlap, so it only adds thread hand-offs "
             "(default: on with --server, off without)")
    add("--sync-every", type=int, metavar="H",
        help="local SGD (DiLoCo): each --server runs H steps on its shard of each "
             "minibatch in one call, then the client averages the parameter changes and "
             "applies the outer optimizer (SGD with Nesterov momentum, --outer-lr, "
             "--outer-momentum): one round of communication per H steps instead of per "
             "step. H = 1 with --outer-lr 1 --outer-momentum 0 is plain data parallelism "
             "(default: off, one round per step)")
    add("--outer-lr", type=float, metavar="ETA",
        help=f"with --sync-every: the outer learning rate (default: {OuterConfig().outer_lr})")
    add("--outer-momentum", type=float, metavar="MU",
        help="with --sync-every: the outer Nesterov momentum "
             f"(default: {OuterConfig().outer_momentum})")
    add("--retries", type=int, default=DEFAULT_RETRIES,
        help="retries of an unreachable server before giving up, with backoff up to 2 s "
             "(default: %(default)s, about a minute)")
    add("--checkpoint", metavar="PATH", help="save the training state to this file")
    add("--checkpoint-every", type=int, default=0, metavar="N",
        help="save every N steps (default: at the end of each epoch)")
    add("--resume", action="store_true",
        help="continue from --checkpoint if it exists; the result equals an uninterrupted run")
    add("--plot", metavar="PNG", help="write train and test loss per epoch to this PNG file")
    add("--json", action="store_true",
        help="no progress bar; print the summary as one JSON object on the last line of stdout")


def run(args: argparse.Namespace) -> int:
    if args.server:
        return _run(args, args.server)
    with server_address(None) as address:
        return _run(args, [address], in_process=True)


def _run(args: argparse.Namespace, addresses: list[str], in_process: bool = False) -> int:
    try:
        return _train(args, addresses, in_process)
    except (UsageError, DatasetError, CheckpointError, MissingExtra) as err:
        print(f"gradserve train: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        hint = UNAVAILABLE_HINT if err.code() == grpc.StatusCode.UNAVAILABLE else ""
        print(f"gradserve train: error from {', '.join(addresses)}: "
              f"{err.code().name}: {err.details()}{hint}", file=sys.stderr)
        return 1


def _train(args, addresses, in_process) -> int:
    show_progress = not args.json and sys.stderr.isatty()
    tqdm = import_optional("tqdm", "tqdm", "the progress bar").tqdm if show_progress else None
    if args.plot:
        import_optional("matplotlib", "matplotlib", "--plot")
    data = load_dataset(args.dataset, args.test_fraction, args.seed)
    spec, config = _spec_and_config(args, data)
    config = replace(config, pipeline=not in_process if args.pipeline is None
                     else args.pipeline)
    outer = _outer_config(args)

    if outer is None:
        gradient = remote_gradient(addresses, spec.build_graph(), spec.param_names,
                                   stream=args.stream, retries=args.retries)
    else:  # the trainer holds the clients (close() closes them)
        gradient = local_sgd_trainer(spec, data, addresses, config, outer,
                                     retries=args.retries)
    try:
        trainer = Trainer(spec, data, gradient, config) if outer is None else gradient
        state = trainer.start(resume=args.resume)
        if args.resume:
            _note_resume(args.checkpoint, state, config)
        first_step, started = state.step, time.perf_counter()
        progress = _Progress(tqdm, trainer, first_step)
        try:
            state = trainer.run(state, on_step=progress)
        except KeyboardInterrupt:
            return _interrupted(trainer, config)
        finally:
            progress.close()
        seconds = time.perf_counter() - started
    finally:
        gradient.close()

    summary = _summary(args, spec, data, state, state.step - first_step, seconds,
                       progress.last, addresses, in_process, config)
    if outer is not None:
        summary["local_sgd"] = {"sync_every": outer.sync_every, "outer_lr": outer.outer_lr,
                                "outer_momentum": outer.outer_momentum,
                                "rounds_this_run": trainer.rounds}
    if args.plot:
        plot_losses(state.history, args.plot, f"{spec.description} on {data.name}")
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, spec, data)
    return 0


def _spec_and_config(args, data) -> tuple[ModelSpec, TrainConfig]:
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    if args.steps_per_call > 1 and (args.stream or len(args.server or ()) > 1):
        raise UsageError("--steps-per-call K > 1 runs K steps in one unary call on one "
                         "server: it goes with neither --stream nor several --server "
                         "(data parallelism splits each step across servers)")
    if args.sync_every is not None and (args.stream or args.steps_per_call > 1):
        raise UsageError("--sync-every H runs H steps per call on each server itself: it "
                         "goes with neither --stream nor --steps-per-call")
    if args.pipeline and (args.stream or len(args.server or ()) > 1
                          or args.sync_every is not None):
        raise UsageError("--pipeline pipelines the TrainSteps calls of a state stored on "
                         "one server: it goes with neither --stream, several --server nor "
                         "--sync-every")
    if args.sync_every is None and (args.outer_lr is not None
                                    or args.outer_momentum is not None):
        raise UsageError("--outer-lr and --outer-momentum go with --sync-every H")
    onnx_model = args.model.lower().endswith(".onnx")
    if args.model not in ("logreg", "mlp") and not onnx_model:
        raise UsageError(f"--model {args.model}: expected logreg, mlp or a PATH.onnx file")
    for flag, given in (("--hidden", args.hidden), ("--activation", args.activation)):
        if given and args.model != "mlp":
            raise UsageError(f"{flag} applies to --model mlp only")
    try:
        if onnx_model:
            spec = OnnxModelSpec(args.model, data.num_features, data.num_classes, args.l2)
        elif args.model == "logreg":
            spec = ModelSpec.logistic_regression(data.num_features, data.num_classes, args.l2)
        else:
            spec = ModelSpec.mlp(data.num_features, data.num_classes,
                                 args.hidden or DEFAULT_HIDDEN, args.activation or "relu",
                                 args.l2)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             momentum=args.momentum, seed=args.seed,
                             checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                             steps_per_call=args.steps_per_call)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return spec, config


def _outer_config(args) -> OuterConfig | None:
    """The local-SGD outer loop's settings (--sync-every), or None."""
    if args.sync_every is None:
        return None
    d = OuterConfig()
    try:
        return OuterConfig(args.sync_every,
                           d.outer_lr if args.outer_lr is None else args.outer_lr,
                           d.outer_momentum if args.outer_momentum is None
                           else args.outer_momentum)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _note_resume(checkpoint: str, state, config: TrainConfig) -> None:
    if state.epoch >= config.epochs:
        _note(f"{checkpoint} has finished {state.epoch} epochs already: nothing to train "
              "(raise --epochs to train further)")
    elif state.step:
        _note(f"resuming from {checkpoint} at step {state.step} "
              f"(epoch {state.epoch + 1} of {config.epochs})")
    else:
        _note(f"no checkpoint at {checkpoint} yet: starting from step 0")


class _Progress:
    """The step callback: a tqdm bar (steps/s, epoch, loss, last test accuracy) when
    shown, and the last gradient (for the mode the server chose)."""

    def __init__(self, tqdm, trainer: Trainer, initial: int):
        self.last = None
        self.steps_per_epoch = trainer.steps_per_epoch
        self.bar = None if tqdm is None else tqdm(
            total=trainer.total_steps, initial=initial, unit="step", file=sys.stderr,
            dynamic_ncols=True)

    def __call__(self, state, gradient) -> None:
        self.last = gradient
        if self.bar is not None:
            postfix = {"epoch": -(-state.step // self.steps_per_epoch),
                       "loss": f"{gradient.loss:.4f}"}
            if state.history:
                postfix["test_acc"] = f"{state.history[-1].test_accuracy:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interrupted(trainer: Trainer, config: TrainConfig) -> int:
    state = trainer.state
    if config.checkpoint and state is not None:
        save_checkpoint(config.checkpoint, state, trainer.run_identity())
        _note(f"interrupted after step {state.step}; saved {config.checkpoint}: "
              "run the same command with --resume to continue")
    else:
        _note("interrupted" + ("" if state is None else f" after step {state.step}"))
    return 130


def stored_pipeline(args, addresses, config) -> bool:
    """Whether the run's calls were pipelined: a state stored on one server, unary calls."""
    return (config.pipeline and len(addresses) == 1 and not args.stream
            and args.sync_every is None)


def _summary(args, spec, data, state, steps_run, seconds, last, addresses, in_process,
             config) -> dict:
    final = state.history[-1]
    return {
        "model": args.model, "widths": spec.widths and list(spec.widths),
        "activation": spec.activation,
        "l2": spec.l2, "parameters": spec.num_params,
        "dataset": data.name, "train_samples": len(data.y_train),
        "test_samples": len(data.y_test),
        "epochs": state.epoch, "steps": state.step, "steps_this_run": steps_run,
        "seconds": round(seconds, 3),
        "steps_per_second": round(steps_run / seconds, 1) if steps_run else None,
        "final_train_loss": final.train_loss, "test_loss": final.test_loss,
        "test_accuracy": final.test_accuracy,
        "mode": last.mode if last else None,
        "planner": None if last is None or last.planner is None else {
            "n": last.planner.n, "m": last.planner.m, "reason": last.planner.reason},
        "servers": addresses, "in_process_server": in_process,
        "data_parallel": len(addresses) > 1, "stream": args.stream,
        "pipeline": stored_pipeline(args, addresses, config),
        "checkpoint": args.checkpoint,
        "history": [asdict(r) for r in state.history],
    }


def _print_summary(s: dict, spec: ModelSpec, data) -> None:
    where = (f"an in-process server on {s['servers'][0]}" if s["in_process_server"]
             else ", ".join(s["servers"]))
    if s.get("local_sgd"):
        local = s["local_sgd"]
        where += (f" (local SGD: each minibatch split in {len(s['servers'])}, averaged every "
                  f"{local['sync_every']} steps; {local['rounds_this_run']} rounds)")
    elif s["data_parallel"]:
        where += f" (data parallel: each minibatch split in {len(s['servers'])})"
    rows = [("model", f"{spec.description}, {s['parameters']:,} parameters"),
            ("data", data.description),
            ("server", where + (", over DifferentiateStream" if s["stream"] else "")
             + (", calls pipelined (two in flight)" if s["pipeline"] else ""))]
    if s["mode"] and s["planner"]:  # (local SGD's rounds report no planner decision)
        rows.append(("mode", f"{s['mode']} (the server's planner: {s['planner']['reason']})"))
    elif s["mode"]:  # TrainSteps: the server's steps report no planner figures
        rows.append(("mode", f"{s['mode']} (TrainSteps: the state kept on the server)"))
    rate = f": {s['steps_per_second']:,.1f} steps/s" if s["steps_this_run"] else ""
    epochs = f"{s['epochs']} epoch" + ("" if s["epochs"] == 1 else "s")
    rows.append(("trained", f"{epochs}, {s['steps']} steps ({s['steps_this_run']} "
                            f"in this run, {s['seconds']:.2f} s{rate})"))
    rows.append(("result", f"final train loss {s['final_train_loss']:.4f}, test loss "
                           f"{s['test_loss']:.4f}, test accuracy {s['test_accuracy']:.2%}"))
    for label, text in rows:
        print(f"{label:8} {text}")


def plot_losses(history, path: str, title: str) -> None:
    """A PNG of train and test loss per epoch (matplotlib's Agg canvas, no pyplot state)."""
    figure_module = import_optional("matplotlib.figure", "matplotlib", "--plot")
    fig = figure_module.Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    epochs = [r.epoch for r in history]
    ax.plot(epochs, [r.train_loss for r in history], marker="o", label="train loss")
    ax.plot(epochs, [r.test_loss for r in history], marker="s", label="test loss")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png", dpi=100)


def _note(text: str) -> None:
    print(f"gradserve train: {text}", file=sys.stderr)
