"""Shared pytest fixtures: the `gpu` marker skips without CUDA, the `detectron2` marker without
Detectron2 (`make setup` always installs it, and checks the import, so CI runs those tests), a
small synthetic corpus, a converted demo backbone, and `module_tmp` for module-scoped folders.

Disk: a pretraining run of the tests writes ResNet-50 checkpoints of ~250 MB, and pytest keeps every
`tmp_path` of a session (and of the last three sessions) by default: 15 GB for one run of the suite,
enough to fill a CI disk. pytest.ini keeps a test's `tmp_path` only when the test failed
(`tmp_path_retention_policy = failed`, one session), and module-scoped fixtures make their folders
with `module_tmp`, which removes them when the module is done unless one of its tests failed."""
import importlib.util
import shutil

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: these tests use tiny tensors, and two spinning OpenMP threads on a
    shared 2-core machine run them 5-20x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    missing = {"gpu": not torch.cuda.is_available(),
               "detectron2": importlib.util.find_spec("detectron2") is None}
    for item in items:
        for marker, absent in missing.items():
            if absent and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"needs {'CUDA' if marker == 'gpu' else marker}"))


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """`mktemp(name)` for module-scoped fixtures: folders removed after the module's last test,
    kept (for a look) when a test of the session failed meanwhile."""
    made, failed_before = [], request.session.testsfailed

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small synthetic shapes corpus (64 px) in the ImageFolder, VOC and COCO layouts."""
    from suite.corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus") / "shapes"
    make_corpus(out, seed=0, num_train=48, num_test=24, size=64)
    return out


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Detectron2 weights of a converted demo backbone: a torchvision resnet18 (seed 0) saved as a
    pretraining checkpoint, through pretrain.convert (test_slurm_cluster has its own)."""
    import torchvision

    from pretrain import convert

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    folder = tmp_path_factory.mktemp("demo_r18")
    torch.save({"model": {f"encoder_q.{k}": v for k, v in net.state_dict().items()}, "epoch": 1},
               folder / "checkpoint.pth")
    convert.convert(folder / "checkpoint.pth", folder / "demo_r18.pkl", log=lambda s: None)
    return folder / "demo_r18.pkl"
