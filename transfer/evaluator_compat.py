"""Two quirks of the third-party code under Detectron2's LVIS and Cityscapes evaluators, worked around
without touching either package:
- lvis 0.5.3, the LVIS API's last release on PyPI, computes AP with `np.float`, an alias numpy 1.24
  removed (the API's repository fixed it after that release; Detectron2 installs it from there):
  its eval module gets a view of numpy with the alias back, numpy itself is left as it is.
- cityscapesscripts' evaluateImgLists writes `matches.json` into the working directory (every
  stage's is the repository root, shared by concurrent runs): CityscapesEvaluator sends it into the
  evaluator's own temporary folder."""
import os
import types

import numpy
from detectron2.evaluation import CityscapesInstanceEvaluator


class _NumpyWithFloat(types.ModuleType):
    float = float  # what np.float always was

    def __getattr__(self, name):
        return getattr(numpy, name)


def patch_lvis_eval():
    """Give lvis.eval its numpy view where numpy lacks np.float; idempotent."""
    import lvis.eval

    if not hasattr(numpy, "float") and not isinstance(lvis.eval.np, _NumpyWithFloat):
        lvis.eval.np = _NumpyWithFloat("numpy")


class CityscapesEvaluator(CityscapesInstanceEvaluator):
    """Detectron2's CityscapesInstanceEvaluator whose cityscapesscripts writes its relative-path files
    (matches.json) into the evaluator's temporary folder instead of the working directory."""

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        write = cityscapes_eval.writeDict2JSON
        folder = self._temp_dir
        cityscapes_eval.writeDict2JSON = lambda d, path: write(d, path if os.path.isabs(path)
                                                               else os.path.join(folder, path))
        try:
            return super().evaluate()
        finally:
            cityscapes_eval.writeDict2JSON = write
