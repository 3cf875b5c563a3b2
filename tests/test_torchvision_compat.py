import subprocess
import sys
import textwrap

import pytest

from histolab import _torchvision_compat as compat


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_torchvision_and_dependents_import():
    import timm  # noqa: F401  (imports torchvision)
    import torchvision
    from diffusers import UNet2DConditionModel  # noqa: F401  (peft -> transformers -> torchvision)
    from torchvision import transforms

    assert compat.STATE in ("native", "patched")
    assert torchvision.__version__
    assert transforms.Resize(8)


def test_import_histolab_does_not_import_torch():
    res = _run(
        """
        import sys, histolab
        print("torch" in sys.modules, "torchvision" in sys.modules)
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "stmt",
    ["import timm", "from transformers import CLIPTextModel", "from diffusers import UNet2DConditionModel"],
)
def test_dependents_import_in_a_fresh_process(stmt):
    res = _run(
        f"""
        import histolab
        {stmt}
        from histolab import _torchvision_compat as c
        print(c.STATE, c._FINDER in __import__("sys").meta_path)
        """
    )
    assert res.returncode == 0, res.stderr
    state, finder_left = res.stdout.split()
    assert state in ("native", "patched") and finder_left == "False"


def test_compiled_ops_fail_loudly_not_silently():
    """The shim makes the Python parts import; it does not fake the C++ ops."""
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

    Where torchvision imports natively (CUDA torch, or a CPU torchvision build),
    the shim reports 'native' and the bare import works instead: the shim is
    harmless either way.
    """
    import torchvision  # noqa: F401  (make sure STATE is decided)

    res = _run("import torchvision")
    if compat.STATE == "patched":
        assert res.returncode != 0 and "torchvision::nms" in res.stderr
    else:
        assert res.returncode == 0


def test_eager_call_is_idempotent():
    res = _run(
        """
        from histolab._torchvision_compat import ensure_torchvision_importable as e
        a = e(); b = e()
        import timm
        print(a, b)
        """
    )
    assert res.returncode == 0, res.stderr
    a, b = res.stdout.split()
    assert a == b and a in ("native", "patched")
