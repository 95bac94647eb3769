"""What a request names and seeds, checked against a plan, and a sweep's results per name.

Seeds carry a leading axis of k directions, or none (one direction, the axis added
here and removed from the results again).
"""

from __future__ import annotations

import numpy as np

from .errors import DifferentiationError, InputError
from .ir import FLOAT_DTYPES
from .shapes import fill_seed, fmt_shape


def names(plan, names, allowed, default, what, field) -> tuple:
    """`names` checked: each once, each in `allowed`, each floating (or `default`)."""
    if names is None:
        return default
    names = tuple(names)
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DifferentiationError(f"names {twice} more than once; name each {what} "
                                   "once", field=field)
    for name in names:
        if name not in allowed:
            if what == "input" and name in plan.slot:
                why = "is not a graph input (only inputs can be differentiated with respect to)"
            elif what == "input":
                why = "is not a graph input"
            else:
                why = "is not a graph output"
            raise DifferentiationError(why, node=name, field=field)
        if plan.dtypes[name] not in FLOAT_DTYPES:
            raise DifferentiationError(f"has dtype {plan.dtypes[name]}; only floating "
                                       f"{what}s have derivatives", node=name, field=field)
    return names


def seeds(plan, seeds, shapes, field):
    """Seeds shaped like their value, or with a leading axis of k directions:
    (slot -> (k,) + shape, k, batched)."""
    out, ks, batched = {}, set(), set()
    for name, seed in seeds.items():
        shape, dtype = tuple(shapes[name]), plan.np_dtypes[name]
        seed = np.asarray(seed)
        if seed.dtype != dtype:
            raise InputError(f"seed dtype {seed.dtype} does not match the value's "
                             f"{dtype}", node=name, field=field)
        if seed.shape == shape:
            seed, is_batched = seed[None], False
        elif seed.shape[1:] == shape:
            is_batched = True
        else:
            raise InputError(f"seed shape {fmt_shape(seed.shape)} is neither "
                             f"{fmt_shape(shape)} nor (k,) + {fmt_shape(shape)}",
                             node=name, field=field)
        out[plan.slot[name]] = seed
        ks.add(seed.shape[0])
        batched.add(is_batched)
    if len(batched) > 1 or len(ks) > 1:
        raise InputError("seeds must all be batched with the same number of directions, "
                         "or all unbatched", field=field)
    return out, (ks.pop() if ks else 1), (batched.pop() if batched else False)


def per_name(plan, results, names, shapes, k, batched) -> dict:
    """A sweep's per-slot results for `names`, zeros where nothing flowed, each with
    its k directions in front (batched) or its one direction removed."""
    out = {}
    for name in names:
        r = results[plan.slot[name]]
        shape = tuple(shapes[name])
        r = np.zeros((k,) + shape, plan.dtypes[name]) if r is None else fill_seed(r, shape)
        out[name] = r if batched else r[0]
    return out
