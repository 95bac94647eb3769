"""The op table: every op in one row (engine/ops/table.py's OpDef) holding everything
about it: shape, dtype and attribute rules, eval, jvp, vjp, its second-order rule and
its declared costs. The rows live by op group, one module each; importing this
package fills OPS.

Adding an op: one row in its group's module (and one row in tests/support/op_table.py's
TABLE); the client's builder methods, the op table in docs/engine.md and GetServerInfo's op list
come from OPS or are checked against it.
"""

from . import elementwise, reductions, shape, indexing, linalg, nn, select, conv  # noqa: F401
from .table import (OPS, REQUIRED, ZERO, AttrSpec, OpDef, check_attrs, check_dtypes,
                    shared_dtype)

__all__ = ["AttrSpec", "OPS", "OpDef", "REQUIRED", "ZERO", "check_attrs", "check_dtypes",
           "shared_dtype"]
