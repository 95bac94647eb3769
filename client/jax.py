"""A registered graph as a JAX function whose derivatives come from the service.

    import jax
    from gradserve.client.jax import remote_function

    f = remote_function(client, graph)            # graph: a GraphBuilder or Graph proto
    jax.grad(lambda x, y: f(x, y).sum())(x, y)    # values and VJPs from the service

Three JAX primitives carry the three service calls, each with the rules JAX needs:

- `gradserve_evaluate` (the values): its JVP rule calls the next one;
- `gradserve_jvp` (forward mode, linear in the tangents): transposed into the next
  one, which is how JAX's reverse mode (jax.grad, jax.vjp) reaches the service;
- `gradserve_vjp` (reverse mode, linear in the cotangents).

So one function serves jax.jvp and jax.grad alike, first order. (custom_jvp cannot
do it, because JAX transposes a JVP only when it is written in JAX ops, which a
pure_callback is not; custom_vjp has no forward mode.) Outside jit the primitives
call the Client directly; under jit they lower to jax.pure_callback.

Shapes and dtypes come from the graph: the inputs' as declared (-1 takes the
argument's size), the outputs' from the service (an earlier call with inputs of those
shapes, else one Evaluate of zeros when a trace first meets them).

Batching (jax.vmap): tangents and cotangents batched along any axis become the
service's leading axis of directions, one request for the whole batch (so
jax.jacfwd and jax.jacrev cost one round trip each for the derivatives). A vmap over
the primal inputs is refused with an error that says what to do instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from gradserve.client._remote import FLOAT_DTYPES, RemoteError, RemoteGraph

__all__ = ["RemoteError", "remote_function"]


def remote_function(client, graph, outputs=None):
    """The graph as a JAX function of its inputs (by position or by name), returning
    one array for one output, else a tuple in the order of `outputs` (default: the
    graph's outputs). Differentiable in both modes (jax.grad, jax.vjp, jax.jvp), under
    jax.jit, and under jax.vmap of its tangents or cotangents (see the module docs).

    Registers the graph at once (one round trip); service errors raise RemoteError
    (a grpc.RpcError) with the server's message, which names the node and field.
    """
    remote = RemoteGraph(client, graph, outputs)

    def call(*args, **kwargs):
        if not jax.config.jax_enable_x64:
            for spec in remote.inputs:
                if spec.dtype.itemsize == 8:
                    raise TypeError(f"input '{spec.name}' is {spec.dtype.name} in the graph: "
                                    "enable 64-bit arrays in JAX first with "
                                    "jax.config.update('jax_enable_x64', True)")
        values = [jnp.asarray(v) if hasattr(v, "dtype") else jnp.asarray(v, spec.dtype)
                  for v, spec in zip(remote.bind(args, kwargs), remote.inputs)]
        remote.check_dtypes([v.dtype for v in values])
        out = evaluate_p.bind(*values, remote=remote)
        return out[0] if len(out) == 1 else tuple(out)

    call.remote = remote
    call.__doc__ = f"{remote!r} as a JAX function."
    return call


# --- the primitives ---------------------------------------------------------------------

evaluate_p = Primitive("gradserve_evaluate")
jvp_p = Primitive("gradserve_jvp")
vjp_p = Primitive("gradserve_vjp")
for _p in (evaluate_p, jvp_p, vjp_p):
    _p.multiple_results = True

# Parameters: `remote` the RemoteGraph; `wrt` the input indices differentiated (their
# tangents or cotangents follow the primal inputs, in that order); `of` the output
# indices (into remote.outputs) with tangents or cotangents; `batch` the leading
# direction axes every seed carries (vmap adds one per level).


def _split(args, remote):
    n = len(remote.inputs)
    return args[:n], args[n:]


def _numpy(args):
    return [np.asarray(a) for a in args]


def _evaluate_host(args, *, remote, keep=False):
    return remote.evaluate(_numpy(args), keep)


def _jvp_host(args, *, remote, wrt, of, batch):
    primals, tangents = _split(_numpy(args), remote)
    out = remote.jvp(primals, dict(zip(wrt, tangents)), batch)
    return [out[j] for j in of]


def _vjp_host(args, *, remote, wrt, of, batch):
    primals, cotangents = _split(_numpy(args), remote)
    return remote.vjp(primals, dict(zip(of, cotangents)), wrt, batch)


def _avals_out(remote, primal_avals):
    return remote.signature([a.shape for a in primal_avals], [a.dtype for a in primal_avals])


def _evaluate_abstract(*avals, remote, keep=False):
    return [ShapedArray(shape, dtype) for shape, dtype in _avals_out(remote, avals)]


def _jvp_abstract(*avals, remote, wrt, of, batch):
    outs = _avals_out(remote, _split(avals, remote)[0])
    return [ShapedArray(tuple(batch) + outs[j][0], outs[j][1]) for j in of]


def _vjp_abstract(*avals, remote, wrt, of, batch):
    primals = _split(avals, remote)[0]
    return [ShapedArray(tuple(batch) + primals[i].shape, primals[i].dtype)
            for i in wrt]


def _lowering(host, abstract):
    """Under jit: the host function as a pure_callback (its batching never runs: the
    primitives' own batching rules have already put every batch into `batch`)."""
    def lower(*args, **params):
        shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype)
                  for a in abstract(*(jax.typeof(x) for x in args), **params)]
        def host_fn(*xs):
            return [np.asarray(r) for r in host(xs, **params)]
        return jax.pure_callback(host_fn, shapes, *args, vmap_method="sequential")
    return mlir.lower_fun(lower, multiple_results=True)


def _params(host):
    """Outside jit: the host function on the arguments' values."""
    return lambda *args, **params: [jnp.asarray(r) for r in host(args, **params)]


evaluate_p.def_impl(_params(_evaluate_host))
evaluate_p.def_abstract_eval(_evaluate_abstract)
mlir.register_lowering(evaluate_p, _lowering(_evaluate_host, _evaluate_abstract))
jvp_p.def_impl(_params(_jvp_host))
jvp_p.def_abstract_eval(_jvp_abstract)
mlir.register_lowering(jvp_p, _lowering(_jvp_host, _jvp_abstract))
vjp_p.def_impl(_params(_vjp_host))
vjp_p.def_abstract_eval(_vjp_abstract)
mlir.register_lowering(vjp_p, _lowering(_vjp_host, _vjp_abstract))


# --- differentiation --------------------------------------------------------------------


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _evaluate_jvp(primals, tangents, *, remote, keep=False):
    """Values by one Evaluate, output tangents by one JVP of the inputs whose tangents
    are not symbolic zeros (two round trips; the Evaluate keeps residuals, so that a
    VJP transposed from this JVP runs only the reverse sweep)."""
    # keep: a VJP (the transpose of this JVP) may follow; the server keeps what it
    # needs, and the VJP then skips the forward sweep
    outs = evaluate_p.bind(*primals, remote=remote, keep=True)
    wrt = tuple(i for i, (spec, t) in enumerate(zip(remote.inputs, tangents))
                if spec.floating and not _is_zero(t))
    of = tuple(j for j, o in enumerate(outs) if np.dtype(jax.typeof(o).dtype) in FLOAT_DTYPES)
    out_tangents = [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in outs]
    if wrt and of:
        seeds = [tangents[i] for i in wrt]
        for j, t in zip(of, jvp_p.bind(*primals, *seeds, remote=remote, wrt=wrt, of=of,
                                       batch=())):
            out_tangents[j] = t
    return outs, out_tangents


def _jvp_transpose(cts, *args, remote, wrt, of, batch):
    """The JVP is linear in its tangents; its transpose is the VJP (one round trip)."""
    primals, tangents = _split(args, remote)
    if any(ad.is_undefined_primal(p) for p in primals):
        raise NotImplementedError("gradserve: second derivatives of a remote function are "
                                  "not supported (the transpose of its JVP needs the primal "
                                  "inputs as values)")
    given = [(j, ct) for j, ct in zip(of, cts) if not _is_zero(ct)]
    if not given:
        return [None] * len(primals) + [ad.Zero(t.aval) for t in tangents]
    grads = vjp_p.bind(*primals, *(ct for _, ct in given), remote=remote, wrt=wrt,
                       of=tuple(j for j, _ in given), batch=batch)
    return [None] * len(primals) + list(grads)


def _no_second_order(name):
    def rule(*args, **params):
        raise NotImplementedError(f"gradserve: {name} of a remote function has no derivative "
                                  "of its own here: second derivatives (e.g. jax.hessian) are "
                                  "not supported by the JAX bridge")
    return rule


ad.primitive_jvps[evaluate_p] = _evaluate_jvp
ad.primitive_transposes[jvp_p] = _jvp_transpose
ad.primitive_jvps[jvp_p] = _no_second_order("the JVP")
ad.primitive_jvps[vjp_p] = _no_second_order("the VJP")


# --- batching ---------------------------------------------------------------------------

_PRIMAL_VMAP = ("gradserve: jax.vmap over the primal inputs of a remote function is not "
                "supported: the service batches derivative directions (tangents, "
                "cotangents), not inputs. Give the graph a batch dimension instead (declare "
                "it -1) and call the function on the whole batch, or loop with jax.lax.map "
                "(one round trip per element)")


def _evaluate_batch(args, dims, *, remote, keep=False):
    raise NotImplementedError(_PRIMAL_VMAP)


def _seed_batch(prim):
    """Batched seeds, unbatched primals: the batch axis joins the leading direction axes,
    so the whole batch is one request."""
    def rule(args, dims, *, remote, wrt, of, batch):
        primals, seeds = _split(args, remote)
        primal_dims, seed_dims = _split(dims, remote)
        if any(d is not None for d in primal_dims):
            raise NotImplementedError(_PRIMAL_VMAP)
        size = next(s.shape[d] for s, d in zip(seeds, seed_dims) if d is not None)
        seeds = [batching.bdim_at_front(s, d, size) for s, d in zip(seeds, seed_dims)]
        out = prim.bind(*primals, *seeds, remote=remote, wrt=wrt, of=of,
                        batch=(size,) + tuple(batch))
        return out, [0] * len(out)
    return rule


batching.primitive_batchers[evaluate_p] = _evaluate_batch
batching.primitive_batchers[jvp_p] = _seed_batch(jvp_p)
batching.primitive_batchers[vjp_p] = _seed_batch(vjp_p)
