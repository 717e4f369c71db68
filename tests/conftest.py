"""Shared pytest fixtures: the `gpu` marker skips without CUDA, the `detectron2` marker without
Detectron2 (`make setup` always installs it, and checks the import, so CI runs those tests), a
small synthetic corpus, and a converted demo backbone."""
import importlib.util

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
