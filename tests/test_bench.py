"""``make bench`` (benchmarks/side_by_side.py) at toy size, one step per variant, so it cannot rot: every method
runs against the official re-statement, the same loss comes out on the same weights and mask, and the table
and bench.json carry their keys. Also the handling of official checkouts, on small fake ones."""

import json
import sys
from pathlib import Path

import pytest

from mimzoo.errors import ConfigError
from mimzoo.precision import resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import official  # noqa: E402
import side_by_side  # noqa: E402

RATIOS = {"same_precision", "default", "official_bf16", "default_vs_official_bf16"}


def test_bench_runs_end_to_end_and_writes_the_table_and_json(tmp_path):
    report = side_by_side.main(
        [
            "--size",
            "toy",
            "--device",
            "cpu",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(tmp_path / "bench.json"),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["results"].keys() == report["results"].keys() == set(side_by_side.METHODS)
    assert saved["meta"]["default_precision"] == resolve_precision("auto", "cpu")
    table = (tmp_path / "bench.md").read_text()
    for method in ("mae", "convmae", "ibot"):
        r = saved["results"][method]
        assert r["official"] == f"tests/reference_{method}.py"
        assert set(r["ms"]) == set(side_by_side.VARIANTS) and all(ms > 0 for ms in r["ms"].values())
        assert set(r["speedup"]) == RATIOS and all(set(s) == {"median", "q1", "q3"} for s in r["speedup"].values())
        assert r["precisions"]["mimzoo_default"] == saved["meta"]["default_precision"]
        c = r["check"]  # the same results: fp32 to float rounding, the default precision to bf16's
        assert c["rel_diff_fp32"] < 1e-5, (method, c)
        assert c["rel_diff_default"] < 2e-2, (method, c)
        assert f"| {method} | tests/reference_{method}.py | " in table
    assert saved["results"]["ibot"]["mask"].startswith("IBOTMask(ratio=0.3,")  # iBOT's rule, not MAE's 75% random
    assert saved["results"]["mae"]["mask"] == saved["results"]["convmae"]["mask"] == "RandomMask(ratio=0.75, cell=1)"
    assert set(saved["results"]["sgmae"]["overhead"]) == {"fp32", "default"}
    assert "SG-MAE (informed masks) step / MAE step" in table and "speed-up, default" in table


def _fake_checkout(root: Path, value: int) -> Path:
    """A checkout written as facebookresearch/mae is: timm's Block with qk_scale, np.float, its own util package."""
    (root / "util").mkdir(parents=True)
    (root / "util" / "__init__.py").write_text("")
    (root / "util" / "pos_embed.py").write_text(f"VALUE = {value}\n")
    (root / "models_mae.py").write_text(
        "import numpy as np\nfrom timm.models.vision_transformer import Block\nfrom util.pos_embed import VALUE\n\n"
        "def build():\n    return Block(8, 2, 4.0, qkv_bias=True, qk_scale=None), np.float(VALUE)\n"
    )
    return root


def test_official_checkouts_import_with_their_quirks_and_apart(tmp_path):
    """qk_scale and np.float work; two checkouts with a ``util`` package each get their own."""
    first = official.checkout(_fake_checkout(tmp_path / "a", 1), "facebookresearch/mae", ["models_mae"])["models_mae"]
    second = official.checkout(_fake_checkout(tmp_path / "b", 2), "facebookresearch/mae", ["models_mae"])["models_mae"]
    with official._quirks():
        assert first.build()[1] == 1.0 and second.build()[1] == 2.0
        assert first.build()[0].attn.num_heads == 2
    import numpy as np

    assert "models_mae" not in sys.modules and "util" not in sys.modules and not hasattr(np, "float")


def test_wrong_official_paths_and_sizes_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not a checkout of facebookresearch/mae .*git clone"):
        official.checkout(tmp_path, "facebookresearch/mae", ["models_mae"])
    with pytest.raises(ConfigError, match="hard-codes a 224 px image .*--size gpu"):
        official.convmae_module(tmp_path, side_by_side.SIZES["cpu"]["convmae"]["encoder"], {})


def test_ibot_loss_class_compiles_without_the_script_imports(tmp_path):
    """main_ibot.py imports tensorboardX (and sklearn through evaluation/) at module level: only iBOTLoss is taken."""
    (tmp_path / "main_ibot.py").write_text("import tensorboardX\n\nclass iBOTLoss(nn.Module):\n    scale = np.pi\n")
    import numpy as np
    from torch import nn

    cls = official.class_from_source(tmp_path / "main_ibot.py", "iBOTLoss", dict(nn=nn, np=np))
    assert issubclass(cls, nn.Module) and cls.scale == np.pi
    with pytest.raises(ConfigError, match="no class iBOTLoss"):
        official.class_from_source(tmp_path / "main_ibot.py", "iBOTLoss2", {})


def test_gpu_columns_img_per_s_flops_and_peaks(monkeypatch):
    """What a GPU run adds, computed here on the CPU: img/s, FLOPs of one step per implementation, FLOP
    utilisation against the dense peak of the device's name and the variant's precision ('unknown device' else)."""
    case = side_by_side.mae_like("mae", side_by_side.SIZES["toy"]["mae"], "cpu", None)
    ms = {name: 10.0 for name in case["steps"]}
    stats = side_by_side.device_stats(case, ms, "cpu")
    assert stats["img_per_s"] == {name: 400.0 for name in case["steps"]}  # batch 4 in 10 ms
    flops = stats["gflops_per_step"]
    assert set(flops) == {"official", "mimzoo"} and all(f > 0 for f in flops.values())
    assert stats["mfu"] == {name: None for name in case["steps"]}
    for name, bf16, fp32 in (("NVIDIA H200", 989e12, 67e12), ("NVIDIA H100 PCIe", 756e12, 51e12)):
        monkeypatch.setattr(side_by_side.torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert side_by_side.peak_flops("cuda", "bf16-mixed") == bf16
        assert side_by_side.peak_flops("cuda", "32-true") == fp32
    monkeypatch.setattr(side_by_side.torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert side_by_side.peak_flops("cuda", "bf16-mixed") is None
    meta = dict(
        device="cuda",
        device_name="Some GPU",
        torch="x",
        threads=1,
        size="toy",
        rounds=1,
        default_precision="bf16-mixed",
    )
    row = {
        "official": "o",
        "batch": 4,
        "ms": ms,
        "check": dict(rel_diff_fp32=0, rel_diff_default=0),
        "speedup": {k: dict(median=1, q1=1, q3=1) for k in RATIOS},
        **stats,
    }
    report = {"meta": meta, "results": {"mae": row}}
    assert "| mae | mimzoo_default | 400 | unknown device |" in side_by_side.markdown(report)
