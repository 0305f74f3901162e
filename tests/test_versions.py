"""kernels.versions.release: the one reader of version strings behind the Triton, cudnn-frontend
and flashinfer-cubin checks."""
import pytest

from comfyui_nvfp4.kernels.versions import release


@pytest.mark.parametrize("version,expected", [
    ("3.6.0", (3, 6, 0)),
    ("3.3.1.post19", (3, 3, 1)),  # triton-windows: the suffix is a fourth part
    ("2.11.0+cu130", (2, 11, 0)),  # a local version on the last part
    ("1.13.0rc1", (1, 13, 0)),  # a pre-release tail
    ("4.0.0+git1234", (4, 0, 0)),
    ("3.10", (3, 10)),  # 10 > 9: compared as numbers, not text
    ("unknown", (0,)),
    ("", (0,)),
])
def test_release_reads_the_first_three_parts_as_numbers(version, expected):
    assert release(version) == expected


def test_release_orders_as_the_version_checks_need():
    assert release("3.10.0")[:2] > release("3.9.0")[:2] > release("3.3.1.post19")[:2] >= (3, 3)
    assert release("0.7.2") == release("0.7.2")  # flashinfer-cubin must match flashinfer-python exactly
    assert release("0.7.2") != release("0.7.3")
