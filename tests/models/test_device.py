"""resolve_device and device_info on this machine (CPU only: the absent devices are tested for real)."""

from __future__ import annotations

import pytest
import torch

from wsi_screen.errors import DeviceError, WsiScreenError
from wsi_screen.models.device import device_info, resolve_device, worker_device

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@needs_no_gpu
def test_auto_is_the_cpu_without_a_gpu() -> None:
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_by_name_and_as_a_torch_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert device_info(resolve_device("cpu")) == {"type": "cpu"}


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "mps:1", "cuda:", "", "cuda:-1"])
def test_a_bad_name_is_one_line_naming_it(name: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(name)
    message = str(caught.value)
    assert repr(name) in message and "auto, cpu, cuda, cuda:N, mps" in message and "\n" not in message
    assert isinstance(caught.value, WsiScreenError) and isinstance(caught.value, ValueError)


@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_absent(name: str) -> None:
    with pytest.raises(DeviceError, match=rf"device '{name}' asked for, but this machine has no CUDA GPU .*"
                                          r"use 'cpu' or 'auto'"):
        resolve_device(name)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_absent() -> None:
    with pytest.raises(DeviceError, match=r"device 'mps' asked for, but Apple's MPS is not available"):
        resolve_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_present() -> None:  # runs only where there is a GPU
    device = resolve_device("cuda")
    assert device.type == "cuda" and device.index == torch.cuda.current_device()
    assert device_info(device)["name"] == torch.cuda.get_device_name(device.index)
    with pytest.raises(DeviceError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_worker_device_keeps_the_cpu_and_explicit_choices() -> None:
    assert worker_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(DeviceError):
        worker_device("gpu", 0)


@needs_no_gpu
def test_worker_device_auto_without_a_gpu_is_the_cpu() -> None:
    assert worker_device("auto", 5) == torch.device("cpu") and worker_device("auto", None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        worker_device("cuda", 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_workers_spread_over_the_gpus() -> None:  # runs only where there are several GPUs
    count = torch.cuda.device_count()
    assert [worker_device("auto", i).index for i in range(count + 1)] == [*range(count), 0]
    assert worker_device("cuda:1", 0) == torch.device("cuda", 1)


@needs_no_gpu
def test_load_model_takes_a_device_name() -> None:
    from wsi_screen.models import load_model

    model = load_model(device="auto")
    assert model.device == torch.device("cpu") and next(model.module.parameters()).device.type == "cpu"
    assert model.to(torch.device("cpu")) is model
    with pytest.raises(DeviceError, match="device 'cuda' asked for"):
        load_model(device="cuda")
    with pytest.raises(DeviceError, match="device 'cuda:1' asked for"):
        model.to("cuda:1")
