"""The kernels' IR: every variant is valid LLVM with the declared signatures; the portable one
is portable; the vector ones compile to the instructions they are written for, also for CPUs
this machine is not (cross-compiled: the AVX-512 VBMI and NEON code cannot run everywhere)."""

import re

import pytest

llvm = pytest.importorskip("llvmlite.binding")

from lazyfp8.kernels.ir import KIND_TYPES, SIGNATURES, VARIANTS, assemble


def parsed(variant, triple=None):
    module = llvm.parse_assembly(str(assemble(variant, triple=triple)))
    module.verify()
    return module


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_module_parses_and_verifies(variant):
    module = parsed(variant)
    exported = {f.name for f in module.functions if not f.is_declaration and f.linkage.name == "external"}
    v = VARIANTS[variant]
    assert {"lut16", "lut32", "table_bf16", "grid_bf16", v.lut16, v.lut16_stream, v.grid_bf16_stream} <= exported
    every = {"lut16", "lut32", "table_bf16", "grid_bf16", "group_bf16", "group_f32"}
    expected = every | {
        "portable": set(),
        "vbmi": {"lut16_vbmi", "lut16_stream", "grid_bf16_stream"},
        "neon": {"lut16_neon"},
        "neon-emulated": {"lut16_neon"},
    }[variant]
    assert exported == expected


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_function_has_its_declared_signature(variant):
    # SIGNATURES is the one declaration: the IR's parameters (and jit's ctypes types) follow it.
    for fn in assemble(variant).functions:
        if fn.name in SIGNATURES:
            params = SIGNATURES[fn.name]
            assert [a.name for a in fn.args] == [p.name for p in params]
            assert [a.type for a in fn.args] == [KIND_TYPES[p.kind] for p in params]
            # Pointers never alias: that is what lets LLVM vectorize the scalar loops.
            for a, p in zip(fn.args, params):
                if p.kind in ("in", "out"):
                    assert "noalias" in a.attributes and ("readonly" in a.attributes) == (p.kind == "in")


@pytest.mark.parametrize("variant", ["portable", "neon-emulated"])
def test_portable_modules_use_no_target_intrinsics(variant):
    # The portable variant is what any CPU compiles; the emulated NEON one runs the NEON
    # algorithm on any CPU: generic IR only.
    source = str(assemble(variant))
    assert "llvm.x86" not in source and "llvm.aarch64" not in source and "nontemporal" not in source


def test_streaming_stores_are_marked_and_fenced():
    source = str(assemble("vbmi"))
    assert source.count("!nontemporal") >= 2  # the plain lookup and the grid's rows
    assert len(re.findall(r"fence seq_cst", source)) == 2  # lut16_stream and grid_bf16_stream


def _assembly(variant, triple, cpu, features=""):
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    try:
        target = llvm.Target.from_triple(triple)
    except RuntimeError as e:
        pytest.skip(f"this llvmlite's LLVM has no {triple} target ({e})")
    machine = target.create_target_machine(cpu=cpu, features=features, opt=3)
    module = parsed(variant, triple=triple)
    passes = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(module, passes)
    return machine.emit_assembly(module)


def _function(asm, name):
    """The assembly of function ``name`` (up to the next function's label)."""
    start = asm.index(f"\n{name}:")
    end = asm.find(".Lfunc_end", start)
    return asm[start:end]


def test_vbmi_module_compiles_to_byte_permutes():
    # This CPU may lack AVX-512 VBMI: compile for one that has it and read the instructions.
    asm = _assembly("vbmi", "x86_64-unknown-linux-gnu", "icelake-server")
    for name in ("lut16_vbmi", "lut16_stream", "grid_bf16", "grid_bf16_stream"):
        assert re.search(r"vperm[it]2b\s", _function(asm, name)), f"{name} does not use vpermi2b/vpermt2b"
    for name in ("lut16_stream", "grid_bf16_stream"):
        body = _function(asm, name)
        # fence seq_cst: mfence, or a locked instruction (LLVM's cheaper choice); either drains
        # the write-combining buffers the streaming stores go through.
        assert re.search(r"vmovntdq\s", body), f"{name}: no streaming stores"
        assert re.search(r"\bmfence\b|\block\b", body), f"{name}: no fence after the streaming stores"
    assert not re.search(r"vmovnt", _function(asm, "lut16_vbmi")), "ordinary lookups must not stream"


def test_neon_module_cross_compiles_to_table_lookups():
    asm = _assembly("neon", "aarch64-unknown-linux-gnu", "generic", "+neon")
    for name in ("lut16_neon", "grid_bf16"):
        body = _function(asm, name)
        # tbl with four table registers: tbl v0.16b, { v1.16b, v2.16b, v3.16b, v4.16b }, v5.16b
        assert len(re.findall(r"\btbl\s+v\d+\.16b,\s*\{\s*v\d+\.16b,\s*v\d+\.16b,\s*v\d+\.16b,\s*v\d+\.16b\s*\}", body)) >= 8, name


@pytest.mark.parametrize(
    ("variant", "triple", "cpu", "features", "shuffle"),
    [
        # The portable module's lane-by-lane lookups become the host's byte shuffle: x86 with
        # AVX2 (most x86 CPUs, this one too) or only SSSE3, and AArch64.
        ("portable", "x86_64-unknown-linux-gnu", "haswell", "", r"\bvpshufb\s"),
        ("portable", "x86_64-unknown-linux-gnu", "x86-64", "+ssse3", r"\bpshufb\s"),
        ("portable", "aarch64-unknown-linux-gnu", "generic", "+neon", r"\btbl\s"),
        # The vector variants name the instruction (LLVM does not see it compiling for AVX-512).
        ("vbmi", "x86_64-unknown-linux-gnu", "icelake-server", "", r"\bvpshufb\s"),
        ("neon", "aarch64-unknown-linux-gnu", "generic", "+neon", r"\btbl\s"),
    ],
)
def test_group_kernels_look_codes_up_with_byte_shuffles(variant, triple, cpu, features, shuffle):
    asm = _assembly(variant, triple, cpu, features)
    for name, planes in (("group_bf16", 2), ("group_f32", 4)):
        # one shuffle per byte plane of the results, in the whole-block loop and the general one
        found = len(re.findall(shuffle, _function(asm, name)))
        assert found >= 2 * planes, f"{name}: {found} byte shuffles"
