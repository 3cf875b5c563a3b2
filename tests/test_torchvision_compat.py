import subprocess
import sys
import textwrap

from histolab import _torchvision_compat as compat


def test_torchvision_and_dependents_import():
    assert compat.STATE in ("native", "patched")
    import timm  # noqa: F401  (imports torchvision)
    import torchvision
    from diffusers import UNet2DConditionModel  # noqa: F401  (peft -> transformers -> torchvision)
    from torchvision import transforms

    assert torchvision.__version__
    assert transforms.Resize(8)


def test_compiled_ops_fail_loudly_not_silently():
    """The shim makes the Python parts import; it does not fake the C++ ops."""
    import pytest
    import torch
    from torchvision.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11]], dtype=torch.float32)
    if compat.STATE == "patched":
        with pytest.raises(RuntimeError, match="C\\+\\+ ops"):
            nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    else:
        assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]


def test_plain_import_fails_without_the_shim_on_cpu_torch():
    """Documents why the shim exists: on this CPU torch, bare `import torchvision` breaks.

    On an install where torchvision imports natively (CUDA torch, or a CPU
    torchvision build), the shim reports 'native' and this test checks that
    the bare import works instead: the shim is harmless either way.
    """
    code = "import torchvision"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if compat.STATE == "patched":
        assert res.returncode != 0 and "torchvision::nms" in res.stderr
    else:
        assert res.returncode == 0


def test_shim_is_idempotent_in_a_fresh_process():
    code = textwrap.dedent(
        """
        from histolab._torchvision_compat import ensure_torchvision_importable as e
        a = e(); b = e()
        import timm
        print(a, b)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = res.stdout.split()
    assert a == b and a in ("native", "patched")
