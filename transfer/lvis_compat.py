"""lvis 0.5.3, the LVIS API's last release on PyPI, computes AP with `np.float`, an alias numpy 1.24
removed (the API's repository fixed it after that release; Detectron2 installs it from there). Its
eval module gets a view of numpy with the alias back; numpy itself is left as it is."""
import types

import numpy


class _NumpyWithFloat(types.ModuleType):
    float = float  # what np.float always was

    def __getattr__(self, name):
        return getattr(numpy, name)


def patch_lvis_eval():
    """Give lvis.eval its numpy view where numpy lacks np.float; idempotent."""
    import lvis.eval

    if not hasattr(numpy, "float") and not isinstance(lvis.eval.np, _NumpyWithFloat):
        lvis.eval.np = _NumpyWithFloat("numpy")
