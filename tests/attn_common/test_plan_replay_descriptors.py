"""Call-plan replays of launches that take host TMA descriptors (the Hopper Gluon kernels): the plan remakes each
descriptor over the replayed call's address and keeps its shape, strides and padding; a kernel launcher sees what
Triton's launcher reads of a descriptor (``base.data_ptr()``, ``shape``, ``strides``, ``padding``)."""

import torch

from kvflash.attn_common.plan_replay import ARGUMENT, Launch, Pointer, TmaDescriptor, replay_function


def test_a_replay_remakes_descriptors_over_the_new_addresses():
    seen = []

    def launcher(*args):
        seen.append(args)

    descriptor = TmaDescriptor(Pointer(ARGUMENT, 1, 256), (4096, 1024), (1024, 1), "zero")
    launches = [Launch(launcher, (3, 1, 1), ("leading",), [Pointer(ARGUMENT, 0, 0), descriptor, 7, None])]
    replay = replay_function("probe", [], 0, torch.device("cpu"), 0, launches, None, False)

    # The stream handle of a CPU "device" is never asked for by a real plan; stand one in for this probe.
    replay.__globals__["stream_handle"] = lambda index: 99
    for pointers in ([1000, 5000], [2000, 9000]):
        seen.clear()
        assert replay([], pointers) is None
        (args,) = seen
        assert args[:5] == (3, 1, 1, 99, "leading") and args[5] == pointers[0]
        made = args[6]
        assert made.base.data_ptr() == pointers[1] + 256
        assert (made.shape, made.strides, made.padding) == ((4096, 1024), (1024, 1), "zero")
        assert args[7:] == (7, None)
