"""Backend selection logic: env override, auto by measurement with a disk cache, self-check."""
import json
import logging

import pytest
import torch

from comfyui_nvfp4.kernels import autotune, blackwell, env_override, preparation, registry
from comfyui_nvfp4.kernels.blackwell_layout import prepare_weight
from comfyui_nvfp4.kernels.module import NVFP4LinearModule, active_backend
from comfyui_nvfp4.quant import nvfp4
from comfyui_nvfp4.quant.layers import NVFP4Linear
from readback import ReadbackOps

CPU = torch.device("cpu")


def mod(n=64, k=64, seed=0, name="layer"):
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.randn(n, k // 16, 1, generator=g) * 1.5).expand(n, k // 16, 16).reshape(n, k)
    m = NVFP4LinearModule(k, n, bias=True)
    m.layer_name = name
    m.set_layer(NVFP4Linear([nvfp4.quantize(torch.randn(n, k, generator=g) * spread)],
                            torch.zeros(n, dtype=torch.bfloat16)))
    return m


@pytest.mark.parametrize("value,expected", [("CUTLASS", "cutlass"), ("flashinfer_trtllm", "trtllm"),
                                            ("FlashInfer_cuDNN", "cudnn"), (" auto ", "auto"), ("", None)])
def test_env_override_values(monkeypatch, value, expected):
    monkeypatch.setenv(env_override.ENV_VAR, value)
    assert env_override.read(registry.names()) == expected


def test_env_override_unknown_value_warns_and_is_ignored(monkeypatch, caplog):
    monkeypatch.setenv(env_override.ENV_VAR, "tensorrt-magic")
    with caplog.at_level(logging.WARNING, logger="comfyui_nvfp4"):
        assert env_override.read(registry.names()) is None
    assert "tensorrt-magic" in caplog.text and "ignoring" in caplog.text


def test_env_override_change_clears_auto_decisions(monkeypatch, tmp_path):
    monkeypatch.setenv("NVFP4_CACHE_DIR", str(tmp_path))
    calls = []

    def measure(n, k, backends, device, token_counts):
        calls.append((n, k))
        return {b.name: float(i + 1) for i, b in enumerate(backends)}

    cands = [registry.get("dequant"), registry.get("emulate")]
    monkeypatch.setenv(env_override.ENV_VAR, "auto")
    env_override.read(registry.names())
    autotune.choose({(64, 64, autotune.TOKENS)}, CPU, cands, measure)
    assert autotune._memory
    monkeypatch.setenv(env_override.ENV_VAR, "dequant")
    env_override.read(registry.names())
    assert not autotune._memory  # in-memory decisions dropped when the override changed


def test_autotune_measures_real_backends_then_reuses_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NVFP4_CACHE_DIR", str(tmp_path))
    autotune.clear_memory()
    cands = [registry.get("dequant"), registry.get("emulate")]  # both really run on the CPU
    timed = []

    def measure(n, k, backends, device, token_counts):
        timed.append((n, k, token_counts))
        return autotune.measure_shape(n, k, backends, device, token_counts=tuple(min(t, 32) for t in token_counts))

    # one shape met by token layers and by a vector-fed layer (FLUX.1's 3072 -> 9216), one other
    shapes = {(64, 64, autotune.TOKENS), (64, 64, autotune.VECTOR), (128, 64, autotune.TOKENS)}
    r = autotune.choose(shapes, CPU, cands, measure)
    # each kind timed at its own rows: token layers at text/image token counts, vector ones at batch sizes
    assert sorted(timed) == [(64, 64, (1, 16)), (64, 64, (512, 4096)), (128, 64, (512, 4096))]
    assert set(r) == shapes
    for v in r.values():
        assert v["source"] == "measured" and v["winner"] == min(v["ms"], key=v["ms"].get)
        assert set(v["ms"]) == {"dequant", "emulate"}
    disk = json.loads((tmp_path / "autotune.json").read_text())
    (key,) = disk
    assert key.startswith("cpu|torch ") and "flashinfer" in key and key.endswith("dequant,emulate")
    assert f"|kernels {autotune.kernels_digest()}|" in key  # a kernel update measures again
    assert set(disk[key]) == {"64x64 tokens", "64x64 vector", "128x64 tokens"}
    autotune.clear_memory()  # a new process: decisions come back from disk, nothing is timed
    r2 = autotune.choose(shapes, CPU, cands, measure)
    assert len(timed) == 3 and all(v["source"] == "cache" for v in r2.values())
    assert {k: v["winner"] for k, v in r2.items()} == {k: v["winner"] for k, v in r.items()}
    table = autotune.format_table(r2)
    assert "64x64 tokens (M=512+4096):" in table and "64x64 vector (M=1+16):" in table
    with pytest.raises(ValueError, match="unknown layer kind 'batch' for 64x64"):
        autotune.choose({(64, 64, "batch")}, CPU, cands, measure)


def test_kernels_digest_follows_the_kernel_sources(monkeypatch, tmp_path):
    """The cache key's kernel hash covers every kernels/ source: change one byte, get a new hash."""
    import shutil
    from pathlib import Path

    src = Path(autotune.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(autotune, "__file__", str(copy / "autotune.py"))
    autotune.kernels_digest.cache_clear()
    try:
        same = autotune.kernels_digest()
        (copy / "triton_w4a16.py").write_text((copy / "triton_w4a16.py").read_text() + "\n# changed\n")
        autotune.kernels_digest.cache_clear()
        changed = autotune.kernels_digest()
    finally:
        monkeypatch.undo()
        autotune.kernels_digest.cache_clear()
    assert same == autotune.kernels_digest() != changed


def test_auto_on_cpu_is_dequant_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("NVFP4_CACHE_DIR", str(tmp_path))
    r = autotune.choose({(64, 64, autotune.VECTOR)}, CPU, measure=lambda *a: pytest.fail("nothing to time"))
    assert r[(64, 64, autotune.VECTOR)] == {"winner": "dequant", "ms": {}, "source": "only"}


def test_layers_fed_the_conditioning_vector_are_told_apart_by_name():
    """`auto` times the modulation and embedder layers at batch-size rows and the others at
    token counts: exactly these layers of FLUX.1 and FLUX.2 are vector-fed."""
    from comfyui_nvfp4.quant import names

    flux1 = names.build_name_map(names.FLUX1, 2, 2, has_guidance=True, has_vector=True).linears
    flux2 = names.build_name_map(names.FLUX2, 2, 2, has_guidance=True, has_vector=False).linears
    assert {n for n in flux1 if names.vector_fed(n)} == {
        "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mod.lin", "double_blocks.1.img_mod.lin",
        "double_blocks.1.txt_mod.lin", "single_blocks.0.modulation.lin", "single_blocks.1.modulation.lin",
        "final_layer.adaLN_modulation.1", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
        "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"}
    assert {n for n in flux2 if names.vector_fed(n)} == {
        "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
        "final_layer.adaLN_modulation.1", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
        "guidance_in.out_layer"}
    assert autotune.layer_key(mod(name="double_blocks.3.img_mod.lin")) == (64, 64, autotune.VECTOR)
    assert autotune.layer_key(mod(name="double_blocks.3.img_attn.qkv")) == (64, 64, autotune.TOKENS)
    assert autotune.kind_of("") == autotune.TOKENS  # a layer of unknown role: tokens


def test_module_auto_dispatch_uses_its_own_choice():
    m = mod()
    x = torch.randn(3, 64)
    with active_backend("auto"):
        with pytest.raises(RuntimeError, match="has not chosen"):
            m(x)
        m.auto_choice = "emulate"
        m(x)
        assert m.last_path == "emulate"


def test_preparation_self_check_passes_good_layouts_and_reports_cost():
    mods = [mod(seed=i, name=f"l{i}") for i in range(3)]
    with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
        info = preparation.prepare_modules(mods, registry.get("cutlass"), CPU, self_check=True)
    assert info["prepared_layers"] == 3 and info["self_check_min_cosine"] > 0.98
    assert info["self_check_seconds"] > 0
    assert all(m.prepared_backends() == {"cutlass"} for m in mods)
    # switching backend frees the old layouts and makes the new ones once
    with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
        info2 = preparation.prepare_modules(mods, registry.get("trtllm"), CPU, self_check=True)
    assert info2["freed_bytes"] > 0 and all(m.prepared_backends() == {"trtllm"} for m in mods)
    with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
        again = preparation.prepare_modules(mods, registry.get("trtllm"), CPU, self_check=True)
    assert again["prepared_layers"] == 0 and again["freed_bytes"] == 0


def test_self_check_refuses_a_wrong_layout_naming_layer_and_backend(monkeypatch):
    """A backend whose preparation is wrong (the trtllm shuffle given to cutlass) is caught."""
    m = mod(n=128, seed=7, name="double_blocks.3.img_attn.qkv")
    bad = blackwell.MMFP4Backend("cutlass", 0)
    monkeypatch.setattr(bad, "prepare", lambda module: {k[0] + "0": v for k, v in prepare_weight(
        "trtllm", module.packed_0.data, module.scale_0.data).items()})
    with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
        with pytest.raises(preparation.SelfCheckError) as e:
            preparation.prepare_modules([m], bad, CPU, self_check=True)
    assert "double_blocks.3.img_attn.qkv" in str(e.value) and "'cutlass'" in str(e.value)
    assert m.prepared_backends() == set()  # nothing half-prepared stays behind


def test_self_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("NVFP4_SELF_CHECK", "0")
    m = mod()
    with blackwell.use_ops(ReadbackOps(check_with_flashinfer=False)):
        info = preparation.prepare_modules([m], registry.get("cudnn"), CPU)
    assert info["self_check_min_cosine"] is None and info["prepared_layers"] == 1


def test_flashinfer_tuning_context_runs_where_flashinfer_is_installed(tmp_path):
    """The wrapper around FlashInfer's autotuner enters and leaves on any machine (its profiling
    itself only happens on Blackwell, inside mm_fp4 calls)."""
    with blackwell.flashinfer_tuning(tmp_path / "t.json", tune=True):
        pass
    with blackwell.flashinfer_tuning(tmp_path / "t.json", tune=False):
        pass


def test_fp8_layers_of_mixed_files_run_under_every_choice():
    from comfyui_nvfp4.quant.layers import FP8Linear
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    scale = w.abs().max() / 448
    m = NVFP4LinearModule(64, 32, bias=False)
    m.set_layer(FP8Linear((w / scale).to(torch.float8_e4m3fn), scale.reshape(())))
    x = torch.randn(4, 64)
    ref = x @ m.canonical().dequantize().t()
    for choice in ("auto", "dequant", "emulate", "cutlass"):
        with active_backend(choice):
            y = m(x)
        assert m.last_path == "fp8-dequant", choice
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_auto_only_considers_backends_that_can_output_the_model_dtype():
    assert autotune.dtype_ok(registry.get("cutlass"), torch.bfloat16)
    assert autotune.dtype_ok(registry.get("cutlass"), torch.float16)
    assert not autotune.dtype_ok(registry.get("cutlass"), torch.float32)
    assert not autotune.dtype_ok(registry.get("trtllm"), torch.float16)
    assert autotune.dtype_ok(registry.get("dequant"), torch.float32)
    assert [b.name for b in autotune.auto_candidates(CPU, torch.float32)] == ["dequant"]


class _DenseCopy(registry.Backend):
    """A preparing backend for the preparation machinery: its layout is the dequantized weight."""
    name = "dense-copy"
    prepares = True
    replaces = ("packed", "scale")

    def __init__(self, broken_layer=None):
        self.broken_layer = broken_layer

    def prepare(self, module):
        w = module.canonical().dequantize(torch.float32)
        return {"w": -w if module.layer_name == self.broken_layer else w}

    def run(self, module, x):
        module.last_path = self.name
        return torch.nn.functional.linear(x, module.prep(self.name, "w", x.device).to(x.dtype), module.bias.to(x.dtype))


def test_preparation_in_worker_threads_prepares_every_layer_and_reports_progress():
    mods = [mod(n=64 + 16 * (i % 3), seed=i, name=f"l{i}") for i in range(12)]
    seen = []
    info = preparation.prepare_modules(mods, _DenseCopy(), CPU, self_check=True, workers=4,
                                       progress=lambda i, n: seen.append((i, n)))
    assert info["prepared_layers"] == 12 and info["self_check_min_cosine"] > 0.99
    assert [i for i, _ in seen] == list(range(1, 13)) and all(n == 12 for _, n in seen)
    for m in mods:
        assert torch.equal(m._parameters["prep_dense-copy_w"], m.canonical().dequantize(torch.float32))


def test_preparation_in_worker_threads_stops_at_a_bad_layer():
    mods = [mod(seed=i, name=f"l{i}") for i in range(8)]
    with pytest.raises(preparation.SelfCheckError, match="layer l5 on backend 'dense-copy'"):
        preparation.prepare_modules(mods, _DenseCopy(broken_layer="l5"), CPU, self_check=True, workers=3)
    assert mods[5].prepared_backends() == set()


def test_replaced_originals_leave_the_parameters_but_nothing_is_lost():
    """What a layout replaces is parked off the parameters (ComfyUI would load it into VRAM unused),
    still saved by state_dict, and back as parameters when the layer changes backend."""
    m = mod(n=96, k=128, seed=3, name="l")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    preparation.prepare_modules([m], _DenseCopy(), CPU, self_check=True)
    names = dict(m.named_parameters())
    assert "packed_0" not in names and "scale_0" not in names and "gscale_0" in names
    assert "prep_dense-copy_w" in names
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())  # nothing lost
    y = _DenseCopy().run(m, x)
    assert torch.allclose(y.float(), registry.get("dequant").run(m, x).float(), atol=1e-2)  # dequant reads parked ones
    preparation.prepare_modules([m], registry.get("dequant"), CPU)  # switching backend frees the layout...
    assert "packed_0" in dict(m.named_parameters()) and m.prepared_backends() == set()  # ...and unparks
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


class _BrokenSmallM(_DenseCopy):
    """Right at many rows, wrong at one row (as a faulty small-M kernel would be)."""

    def run(self, module, x):
        y = super().run(module, x)
        return y.flip(-1) if x.shape[0] == 1 else y


def test_self_check_covers_the_small_m_path_too():
    with pytest.raises(preparation.SelfCheckError, match="layer l0"):
        preparation.prepare_modules([mod(seed=0, name="l0")], _BrokenSmallM(), CPU, self_check=True)


class _RecordsTuning(_DenseCopy):
    def __init__(self):
        super().__init__()
        self.allowed = []

    def run(self, module, x):
        from comfyui_nvfp4.kernels.tuning import tuning_allowed
        self.allowed.append((x.shape[0], tuning_allowed()))
        return super().run(module, x)


def test_self_check_runs_layers_without_kernel_tuning():
    """The self-check verifies layouts: its runs (32 rows and 1 row, in worker threads too) must
    not time kernel configs; afterwards tuning is allowed again."""
    from comfyui_nvfp4.kernels.tuning import tuning_allowed
    b = _RecordsTuning()
    mods = [mod(seed=i, name=f"l{i}") for i in range(5)]
    preparation.prepare_modules(mods, b, CPU, self_check=True, workers=3)
    assert sorted(b.allowed) == sorted([(32, False), (1, False)] * 5)
    assert tuning_allowed()
    b.run(mods[0], torch.randn(2, mods[0].in_features, dtype=torch.bfloat16))
    assert b.allowed[-1] == (2, True)
