"""A sparse nonlinear program solved by scipy's trust-constr with the constraint Jacobian
and the Lagrangian's Hessian from gradserve, sparse (issue 23's optimizer example).

Optimal control of x' = x - x^3 + u on [0, T], discretized by explicit Euler with N steps
of h = T / N: the variables are z = (x_0..x_N, u_0..u_{N-1}), n = 2 N + 1,

    minimize    h * sum_k (x_k^2 + u_k^2) + (x_N - 1/2)^2
    subject to  x_{k+1} - x_k - h (x_k - x_k^3 + u_k) = 0    (k < N)
                x_0 - 1 = 0

The constraint Jacobian has three nonzeros per row, the Lagrangian's Hessian is diagonal:
the service finds both patterns from the graph and answers with a few compressed sweeps
(3 forward directions for the Jacobian, 1 Hessian-vector product for the Hessian) instead
of n. `solve(derivatives="service")` and `solve(derivatives="exact")` (derivatives written
by hand) take the same iterations to the same point.

    python docs/sparse_optimal_control.py [--steps 500] [--server HOST:PORT]
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
from scipy import sparse
from scipy.optimize import NonlinearConstraint, minimize

from gradserve.client import Client, GraphBuilder

T = 2.0


def graphs(steps: int):
    """(objective, constraints, Lagrangian) graphs over z (n = 2 steps + 1); the
    Lagrangian also reads the multipliers `lam` (one per constraint)."""
    n, h = 2 * steps + 1, T / steps

    def parts(g):
        z = g.input("z", "float64", [n])
        x = g.slice(z, starts=[0], stops=[steps + 1], axes=[0])
        u = g.slice(z, starts=[steps + 1], stops=[n], axes=[0])
        xk = g.slice(x, starts=[0], stops=[steps], axes=[0])
        xn = g.slice(x, starts=[1], stops=[steps + 1], axes=[0])
        last = g.slice(x, starts=[steps], stops=[steps + 1], axes=[0])
        f = h * (g.sum(g.square(x)) + g.sum(g.square(u))) + g.sum(g.square(last - 0.5))
        dynamics = xn - xk - h * (xk - xk * xk * xk + u)
        first = g.slice(x, starts=[0], stops=[1], axes=[0]) - 1.0
        return f, g.concat([dynamics, first], axis=0)

    objective = GraphBuilder()
    f, _ = parts(objective)
    objective.output("f", f)
    constraints = GraphBuilder()
    _, c = parts(constraints)
    constraints.output("c", c)
    lagrangian = GraphBuilder()
    f, c = parts(lagrangian)
    lam = lagrangian.input("lam", "float64", [steps + 1])
    lagrangian.output("L", f + lagrangian.sum(lam * c))
    return objective, constraints, lagrangian


def exact(steps: int):
    """The same derivatives written by hand: (f, grad, c, jac, hess of lam . c, hess f)."""
    n, h = 2 * steps + 1, T / steps
    k = np.arange(steps)

    def split(z):
        return z[:steps + 1], z[steps + 1:]

    def f(z):
        x, u = split(z)
        return h * (x @ x + u @ u) + (x[-1] - 0.5) ** 2

    def grad(z):
        x, u = split(z)
        gx = 2 * h * x
        gx[-1] += 2 * (x[-1] - 0.5)
        return np.concatenate([gx, 2 * h * u])

    def c(z):
        x, u = split(z)
        xk = x[:-1]
        return np.concatenate([x[1:] - xk - h * (xk - xk ** 3 + u), [x[0] - 1.0]])

    def jac(z):
        x, _ = split(z)
        xk = x[:-1]
        rows = np.concatenate([k, k, k, [steps]])
        cols = np.concatenate([k + 1, k, steps + 1 + k, [0]])
        vals = np.concatenate([np.ones(steps), -1 - h * (1 - 3 * xk ** 2),
                               np.full(steps, -h), [1.0]])
        return sparse.csr_matrix((vals, (rows, cols)), shape=(steps + 1, n))

    def hess_c(z, lam):
        x, _ = split(z)
        d = np.zeros(n)
        d[:steps] = lam[:steps] * h * 6 * x[:-1]
        return sparse.diags(d).tocsr()

    def hess_f(z):
        d = np.full(n, 2 * h)
        d[steps] += 2.0
        return sparse.diags(d).tocsr()

    return f, grad, c, jac, hess_c, hess_f


def served(client: Client, steps: int):
    """The same six functions, every derivative from the service (sparse blocks)."""
    objective, constraints, lagrangian = graphs(steps)
    zero = np.zeros(steps + 1)

    def f(z):
        return float(client.evaluate(objective, {"z": z})["f"])

    def grad(z):
        return np.asarray(client.grad(objective, {"z": z})["z"]).ravel()

    def c(z):
        return np.asarray(client.evaluate(constraints, {"z": z})["c"])

    def jac(z):
        return client.jacobian(constraints, {"z": z}, sparsity="sparse")["c", "z"]

    def hess_c(z, lam):
        # the Hessian of L = f + lam . c minus that of f: lam . c's alone
        return (client.hessian(lagrangian, {"z": z, "lam": np.asarray(lam)}, of="L", wrt=["z"],
                               sparsity="sparse")["z", "z"] - hess_f(z))

    def hess_f(z):
        return client.hessian(lagrangian, {"z": z, "lam": zero}, of="L", wrt=["z"],
                              sparsity="sparse")["z", "z"]

    return f, grad, c, jac, hess_c, hess_f


def solve(functions, steps: int, maxiter: int = 200):
    f, grad, c, jac, hess_c, hess_f = functions
    n = 2 * steps + 1
    z0 = np.zeros(n)
    z0[:steps + 1] = 1.0
    constraint = NonlinearConstraint(c, 0.0, 0.0, jac=jac, hess=hess_c)
    return minimize(f, z0, method="trust-constr", jac=grad, hess=lambda z: hess_f(z),
                    constraints=[constraint], options={"maxiter": maxiter, "gtol": 1e-8,
                                                       "xtol": 1e-10})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="Euler steps N (n = 2 N + 1)")
    parser.add_argument("--server", help="HOST:PORT of a running gradserve (default: start "
                        "one in this process on a free port)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        address = args.server
        if address is None:
            from gradserve.server.app import create_server
            server = stack.enter_context(create_server("127.0.0.1:0"))
            address = f"127.0.0.1:{server.port}"
        client = stack.enter_context(Client(address))
        by_hand = solve(exact(args.steps), args.steps)
        by_service = solve(served(client, args.steps), args.steps)
    for name, r in (("hand-written", by_hand), ("service", by_service)):
        print(f"{name:13} iterations {r.nit:4}  objective {r.fun:.10f}  "
              f"constraint violation {r.constr_violation:.2e}  status {r.status}")
    print(f"max |z_service - z_hand| = {np.abs(by_service.x - by_hand.x).max():.2e}")


if __name__ == "__main__":
    main()
