"""The kernels' IR: both variants are valid LLVM, and the portable one is portable."""

import pytest

from lazyfp8.kernels.ir import assemble

llvm = pytest.importorskip("llvmlite.binding")


@pytest.mark.parametrize("vector", [False, True])
def test_module_parses_and_verifies(vector):
    module = llvm.parse_assembly(assemble(vector))
    module.verify()
    exported = {f.name for f in module.functions if not f.is_declaration and f.linkage.name == "external"}
    expected = {"lut16", "lut32", "table_bf16", "grid_bf16"}
    if vector:
        expected |= {"lut16_vbmi", "lut16_stream", "grid_bf16_stream"}
    assert expected <= exported


def test_portable_module_uses_no_x86_intrinsics():
    # The scalar variant is what ARM and pre-AVX-512 CPUs compile: generic IR only.
    source = assemble(False)
    assert "llvm.x86" not in source and "nontemporal" not in source
