import pytest
import torch

import gfcoll


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    have = _gpus()
    nccl = "nccl" in gfcoll.build_info()["transports"]
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        need = item.callspec.params.get("n", 1) if hasattr(item, "callspec") else 1
        if not nccl:
            item.add_marker(
                pytest.mark.skip(
                    reason="gfcoll was built without the nccl transport (no CUDA toolkit or nccl.h)"
                )
            )
        elif have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPUs, {have} visible"))
