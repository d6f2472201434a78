"""Tiny pipelines per family, saved once per session and loaded through the user path (`adapter.load(dir)`)."""
import pytest
import torch

FAMILY_NAMES = ("flux", "sd3", "qwenimage", "sdxl")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core box; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory holding its saved tiny pipeline (built lazily)."""
    from fewstep.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_tiny_pipeline(family, root / family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_dirs):
    """family -> (adapter, ModelComponents) loaded from the saved tiny pipeline. Tests must not mutate them."""
    from fewstep.models import get_adapter

    cache = {}

    def get(family):
        if family not in cache:
            adapter = get_adapter(family)
            cache[family] = (adapter, adapter.load(tiny_dirs(family)))
        return cache[family]

    return get
