"""fewstep.methods.transfer: only copies from the host to another device are asynchronous."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fewstep.methods.transfer import copy_to


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            self.seen.append((args[0].device.type, torch.device(kwargs["device"]).type, bool(kwargs.get("non_blocking")),
                              kwargs.get("dtype")))
        return func(*args, **kwargs)


def test_only_host_to_device_copies_are_asynchronous():
    """A non-blocking copy from a GPU to the host lands after the call returns: the host would read it first. So a
    copy towards the host blocks, and one from the host to another device (the meta device stands in) does not."""
    host, dev = torch.arange(3.0), torch.ones(3, device="meta")
    with _Copies() as copies:
        out = copy_to(host, "meta", torch.bfloat16)
        with pytest.raises(NotImplementedError):  # meta has no values to copy back; the call is what matters
            copy_to(dev, "cpu")
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert copies.seen == [("cpu", "meta", True, torch.bfloat16), ("meta", "cpu", False, torch.float32)]
    assert copy_to(host, "cpu") is host  # nothing to copy
