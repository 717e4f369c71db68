"""Resume state of the one-process training loops that follow pretraining (the linear probe, the
semi-supervised fine-tune): killed or requeued, a rerun with the same settings continues after the
last finished epoch, to the same numbers as a run that was never stopped.

OUTPUT_DIR/train_state.pth (suite.contract.TRAIN_STATE), written atomically after each epoch (after
that epoch's metrics.jsonl record): the state dicts of the modules and the optimizer, the epoch and
iteration reached, the random number generators (torch's CPU and CUDA ones and the DataLoader's
`generator`), and the run's settings. It is read with weights_only (pretrain.safe_load). A state of
other settings (another --epochs, --lr, checkpoint ...) or a damaged one is not used: the run starts
over and says why; one that safe loading refuses (objects: not this suite's) stops the run. The
folder's metrics.jsonl is the loop's own: a resumed run drops the records logged after its state
(checkpoint.rewind_metrics), a run that starts over drops them all. The state file is removed once
the run has written its result."""
import json
from pathlib import Path

import torch

from pretrain.checkpoint import nonfinite, rewind_metrics
from pretrain.safe_load import WeightsFileError, load_torch
from pretrain.utils import UserError
from suite import contract


class EpochState:
    """`restore(modules, generator)` -> (epoch, iteration) to continue from; `save(...)` after each
    epoch; `remove()` when done. `modules`: {name: object with state_dict/load_state_dict}."""

    def __init__(self, out_dir, settings, log=print):
        self.path = Path(out_dir) / contract.TRAIN_STATE
        self.metrics = Path(out_dir) / contract.METRICS
        self.settings = json.dumps(settings, sort_keys=True, default=str)
        self.log = log

    def restore(self, modules, generator=None):
        state = self._read()
        if state is None:
            rewind_metrics(self.metrics, 0)  # a run that starts over logs anew
            return 0, 0
        try:
            for name, module in modules.items():
                module.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{self.path}: does not fit this run ({first[:200]}); remove it to start over") from None
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if generator is not None:
            generator.set_state(state["generator"])
        rewind_metrics(self.metrics, state["iter"])
        self.log(f"resuming from {self.path}: epoch {state['epoch']}, iteration {state['iter']}")
        return state["epoch"], state["iter"]

    def _read(self):
        if not self.path.is_file():
            return None
        try:
            state = load_torch(self.path)
        except WeightsFileError as e:
            if e.unsafe:
                raise UserError(f"{e} (in this run's output folder)") from None
            self.log(f"{e}; starting over")
            return None
        if not isinstance(state, dict) or state.get("settings") != self.settings:
            self.log(f"{self.path}: the state of a run with other settings; starting over")
            return None
        return state

    def save(self, modules, epoch, it, generator=None):
        state = {name: module.state_dict() for name, module in modules.items()}
        bad, _ = nonfinite(state)
        if bad:  # the loop stops on the loss; never keep a NaN state to resume from
            return
        state.update(epoch=epoch, iter=it, settings=self.settings, rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     generator=generator.get_state() if generator is not None else None)
        contract.write_atomic(self.path, lambda f: torch.save(state, f), fsync=True, mkdir=True)

    def remove(self):
        self.path.unlink(missing_ok=True)
