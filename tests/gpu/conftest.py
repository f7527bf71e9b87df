import pytest
import torch

import gfcoll


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_configure(config):
    config.addinivalue_line("markers", "ipc: runs on the ipc transport; any number of ranks on one GPU")
    config.addinivalue_line("markers", "timeout(seconds): per-test bound (pytest-timeout, where installed)")


def pytest_collection_modifyitems(config, items):
    have = _gpus()
    transports = gfcoll.build_info()["transports"]
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        if item.get_closest_marker("ipc") is not None:
            # ipc places ranks round-robin: one GPU serves any number of ranks.
            if "ipc" not in transports:
                item.add_marker(pytest.mark.skip(reason="gfcoll was built without CUDA (no ipc transport)"))
            elif have < 1:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU, none visible"))
            continue
        need = item.callspec.params.get("n", 1) if hasattr(item, "callspec") else 1
        if "nccl" not in transports:
            item.add_marker(
                pytest.mark.skip(
                    reason="gfcoll was built without the nccl transport (no CUDA toolkit or nccl.h)"
                )
            )
        elif have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPUs, {have} visible"))
