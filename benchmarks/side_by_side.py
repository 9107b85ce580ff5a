"""``make bench``: mimzoo against the official code, side by side in one process.

For MAE, ConvMAE and iBOT it times, round after round and in a rotating order, one training step (forward,
backward, AdamW; iBOT also its gradient clipping and EMA teacher update) of four variants on the same model
size, batch and mask ratio: the official code in fp32 and under bf16 autocast, mimzoo in fp32 and in its
default precision (``trainer.precision=auto``: :func:`mimzoo.precision.resolve_precision`, with the attention
kernel :func:`mimzoo.precision.configure_attention` picks). A speed-up is the median over rounds of the per-round
ratio of official fp32 time to mimzoo time (with the quartiles as its spread), so a load that changes during the
run hits both sides alike. Before timing, both compute the loss on the same weights, images and mask (mimzoo's
module is loaded from the official weights by ``mimzoo.load_official``): the results column. SG-MAE is timed
against mimzoo's MAE (its overhead). On a GPU it adds img/s and model FLOP utilisation (FLOPs of one step from
:class:`torch.utils.flop_counter.FlopCounterMode`, over the device's dense peak).

The official code is a checkout of its repository when given, else the tests' re-statement of it::

    python benchmarks/side_by_side.py --json bench.json --markdown bench.md
    python benchmarks/side_by_side.py --official-mae ~/src/mae --official-ibot ~/src/ibot --size gpu
    python benchmarks/side_by_side.py --size toy --rounds 1 --warmup 0 --methods mae   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402  (benchmarks/official.py, beside this file)
from mimzoo.callbacks.cost import dense_peak_flops  # noqa: E402
from mimzoo.errors import ConfigError, user_errors  # noqa: E402
from mimzoo.precision import configure_attention, resolve_precision  # noqa: E402
from mimzoo.rundir import atomic_write  # noqa: E402
from mimzoo.runs import CONFIG_DIR  # noqa: E402

METHODS = ("mae", "convmae", "ibot", "sgmae")
VARIANTS = ("official_fp32", "official_bf16", "mimzoo_fp32", "mimzoo_default")

_VIT_T4 = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
_VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
_TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
# Per size: mae (also SG-MAE's), convmae, ibot. cpu: the CIFAR models of mimzoo's configs, ~5 min in all on 2 cores
# (ConvMAE-CIFAR as src/mimzoo/conf/model/convmae_encoder/cifar.yaml); gpu: the papers' Base models at 224 px.
SIZES = {
    "toy": dict(
        mae=dict(encoder=_TINY, decoder=dict(dim=32, depth=1, num_heads=2), batch=4),
        convmae=dict(
            encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[8, 16, 32], depth=[1, 1, 2], num_heads=2),
            decoder=dict(dim=32, depth=1, num_heads=2),
            batch=4,
        ),
        ibot=dict(encoder=_TINY, head=dict(out_dim=64, hidden_dim=32, bottleneck_dim=16), local=(2, 16), batch=4),
    ),
    "cpu": dict(
        mae=dict(encoder=_VIT_T4, decoder=dict(dim=256, depth=4, num_heads=8), batch=64),
        convmae=dict(
            encoder=dict(img_size=32, patch_size=[1, 2, 2], embed_dim=[64, 128, 256], depth=[2, 2, 8], num_heads=4),
            decoder=dict(dim=256, depth=4, num_heads=8),
            batch=64,
        ),
        ibot=dict(
            encoder=_VIT_T4, head=dict(out_dim=8192, hidden_dim=2048, bottleneck_dim=256), local=(2, 12), batch=32
        ),
    ),
    "gpu": dict(
        mae=dict(encoder=_VIT_B16, decoder=dict(dim=512, depth=8, num_heads=16), batch=128),
        convmae=dict(
            encoder=dict(img_size=224, patch_size=[4, 2, 2], embed_dim=[256, 384, 768], depth=[2, 2, 11], num_heads=12),
            decoder=dict(dim=512, depth=8, num_heads=16),
            batch=128,
        ),
        ibot=dict(
            encoder=_VIT_B16, head=dict(out_dim=8192, hidden_dim=2048, bottleneck_dim=256), local=(10, 96), batch=64
        ),
    ),
}


# --- variants -----------------------------------------------------------------------------------------------
def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision.startswith("bf16") else nullcontext()


def default_precision(device: str) -> str:
    """What ``trainer.precision=auto`` trains in on this device."""
    return resolve_precision("auto", "gpu" if device == "cuda" else "cpu")


def adamw(params_or_groups, lr=1.5e-4):
    return torch.optim.AdamW(params_or_groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)


def module_groups(module: torch.nn.Module) -> list[dict]:
    """The official recipes' groups: no weight decay on 1-D tensors (norms, biases) and the tokens."""
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(module, 0.05, no_weight_decay_list=("cls_token", "mask_token", "pos_embed"))


def mimzoo_variants(model, device: str) -> dict:
    """``(model, precision)`` for fp32 and for the default precision (its own copy: the attention switch
    changes the module)."""
    precision = default_precision(device)
    default = copy.deepcopy(model)
    configure_attention(default, precision, device)
    return {"mimzoo_fp32": (model, "32-true"), "mimzoo_default": (default, precision)}


def load_official(method: str, ckpt, **overrides):
    """mimzoo's module from official weights, through the importer a user runs (``mimzoo.load_official``)."""
    import mimzoo

    with tempfile.TemporaryDirectory(prefix="mimzoo-bench-") as folder:
        path = Path(folder) / "official.pth"
        torch.save(ckpt, path)
        return mimzoo.load_official(method, path, **overrides)


def relative(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def mae_like(method: str, size: dict, device: str, checkout: str | None) -> dict:
    """MAE or ConvMAE: steps of the four variants and the loss check on shared weights and one mask."""
    from mimzoo.checkpoints import convmae as convmae_ckpt
    from mimzoo.checkpoints import mae as mae_ckpt
    from mimzoo.methods import MAE, ConvMAE

    enc, dec, batch = size["encoder"], size["decoder"], size["batch"]
    torch.manual_seed(0)
    if checkout:
        theirs = (official.mae_module if method == "mae" else official.convmae_module)(checkout, enc, dec)
        state = theirs.state_dict()
    else:  # official-format weights from mimzoo's initialisation (the importer's names, read backwards)
        ours = (MAE if method == "mae" else ConvMAE)(encoder=enc, decoder=dec)
        to_official = (mae_ckpt if method == "mae" else convmae_ckpt)._official_name
        state = {to_official(k): v for k, v in ours.state_dict().items()}
        grid = ours.grid_size[0]
        theirs = official.RestatedMAE(state, f"reference_{method}", enc["num_heads"], dec["num_heads"], grid)
    model = (
        load_official(
            method,
            {"model": state},
            encoder={"num_heads": enc["num_heads"]},
            decoder={"num_heads": dec["num_heads"]},
            norm_pix_loss=True,
        )
        .to(device)
        .train()
    )
    theirs = theirs.to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, enc["img_size"], enc["img_size"], generator=g).to(device)

    mine = mimzoo_variants(model, device)
    with torch.no_grad():  # the results check, on the same weights and the official step's own mask
        torch.manual_seed(2)
        ref_loss, _, ref_mask = theirs(x, mask_ratio=0.75)
        check = {"loss_official": float(ref_loss)}
        for name, (m, precision) in mine.items():
            with autocast(device, precision):
                check[f"loss_{name}"] = float(m(x, mask=ref_mask.bool()).loss)
    check["rel_diff_fp32"] = relative(check["loss_mimzoo_fp32"], ref_loss)
    check["rel_diff_default"] = relative(check["loss_mimzoo_default"], ref_loss)

    steps = {}
    for name, precision in (("official_fp32", "32-true"), ("official_bf16", "bf16-mixed")):
        m = theirs if name == "official_fp32" else copy.deepcopy(theirs)
        steps[name] = official_mae_step(m, adamw(module_groups(m)), x, device, precision)
    for name, (m, precision) in mine.items():
        steps[name] = mimzoo_step(m, adamw(m.param_groups(0.05)), lambda: (x,), device, precision)
    return dict(
        steps=steps,
        check=check,
        batch=batch,
        mask=repr(model.mask_strategy),
        precisions={"official_fp32": "32-true", "official_bf16": "bf16-mixed", **{n: p for n, (_, p) in mine.items()}},
    )


def official_mae_step(model, opt, x, device, precision):
    """``engine_pretrain.train_one_epoch``: forward, ``loss.item()`` and its finiteness check, backward, step."""

    def step():
        with autocast(device, precision):
            loss, _, _ = model(x, mask_ratio=0.75)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"official loss {loss.item()}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def mimzoo_step(model, opt, inputs, device, precision, after_backward=None, after_step=None):
    """What Lightning runs per batch: the method's forward (its own mask draws) under the precision's autocast,
    backward, the method's gradient clipping hook, the optimiser step, the method's after-step (EMA) update."""

    def step():
        with autocast(device, precision):
            loss = model(*inputs()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward:
            after_backward()
        opt.step()
        if after_step:
            after_step()
        return loss.detach()

    return step


def ibot(size: dict, device: str, checkout: str | None) -> dict:
    """iBOT with its multi-crop: two masked global crops and ``local`` unmasked small crops per image."""
    ref = official.reference("reference_ibot")
    enc, head, batch = size["encoder"], size["head"], size["batch"]
    (n_local, local_size), p = size["local"], enc["patch_size"]
    args = ref.official_args(
        arch="vit",
        patch_size=p,
        out_dim=head["out_dim"],
        patch_out_dim=head["out_dim"],
        shared_head=True,
        shared_head_teacher=True,
        norm_last_layer=False,
        teacher_temp=0.07,
        local_crops_number=n_local,
        freeze_last_layer=0,
        epochs=100,
    )
    ckpt = ref.official_checkpoint(
        args, enc["img_size"], enc["embed_dim"], enc["depth"], head["hidden_dim"], head["bottleneck_dim"], epoch=40
    )  # past the temperature warm-up
    theirs = official.ibot_official(checkout, ckpt, enc["num_heads"], device)
    # the mask model=ibot trains with (a model from mimzoo.load_official has MAE's random 75% otherwise)
    mask = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "mask" / "ibot.yaml"))
    model = load_official("ibot", ckpt, encoder={"num_heads": enc["num_heads"]}, mask=mask).to(device).train()
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, enc["img_size"], enc["img_size"], generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(n_local)]
    crops = [c.to(device) for c in crops]
    flat = [model.draw_mask(batch, torch.Generator().manual_seed(3 + i), device="cpu") for i in range(2)]
    grid = enc["img_size"] // p
    masks = [m.view(batch, grid, grid).to(device) for m in flat]
    masks += [torch.zeros(batch, local_size // p, local_size // p, dtype=torch.bool, device=device)] * n_local

    mine = mimzoo_variants(model, device)
    check = {}
    with torch.no_grad():  # drop-path off (eval) on both sides; the centres are not updated by this check
        loss_fn = copy.deepcopy(theirs.loss)
        train = theirs.student.training
        theirs.student.eval()
        official_loss = loss_fn(*theirs.forward(theirs.student, theirs.teacher, crops, masks), masks, theirs.epoch)
        theirs.student.train(train)
        check["loss_official"] = float(official_loss["loss"])
        for name, (m, precision) in mine.items():
            m.eval()
            with autocast(device, precision):
                check[f"loss_{name}"] = float(m(crops, flat).loss)
            m.train()
    check["rel_diff_fp32"] = relative(check["loss_mimzoo_fp32"], check["loss_official"])
    check["rel_diff_default"] = relative(check["loss_mimzoo_default"], check["loss_official"])

    steps = {}
    for name, precision in (("official_fp32", "32-true"), ("official_bf16", "bf16-mixed")):
        t = theirs if name == "official_fp32" else copy.deepcopy(theirs)
        opt = adamw(module_groups(t.student), lr=5e-4)
        steps[name] = lambda t=t, opt=opt, precision=precision: t.step(opt, crops, masks, autocast(device, precision))
    for name, (m, precision) in mine.items():
        opt = adamw(m.param_groups(0.04), lr=5e-4)
        steps[name] = mimzoo_step(
            m,
            opt,
            lambda: (crops, flat),
            device,
            precision,
            after_backward=lambda m=m, opt=opt: m.configure_gradient_clipping(opt),
            after_step=lambda m=m: m.update_teacher(0.996),
        )
    return dict(
        steps=steps,
        check=check,
        batch=batch,
        mask=repr(model.mask_strategy),
        precisions={"official_fp32": "32-true", "official_bf16": "bf16-mixed", **{n: p for n, (_, p) in mine.items()}},
    )


def sgmae(size: dict, device: str) -> dict:
    """SG-MAE after its switch (informed masks: the extra feature pass and the Ncut) against MAE, same weights,
    each in fp32 and in the default precision."""
    from mimzoo.methods import MAE, SGMAE

    enc, dec, batch = size["encoder"], size["decoder"], size["batch"]
    torch.manual_seed(0)
    mae = MAE(encoder=enc, decoder=dec).to(device).train()
    sg = SGMAE(encoder=enc, decoder=dec).to(device).train()
    sg.load_state_dict(mae.state_dict(), strict=False)
    sg.sg_informed.fill_(True)
    x = torch.randn(batch, 3, enc["img_size"], enc["img_size"], generator=torch.Generator().manual_seed(1)).to(device)
    steps, precisions = {}, {}
    for name, model in (("mae", mae), ("sgmae", sg)):
        for variant, (m, precision) in mimzoo_variants(model, device).items():
            key = f"{name}_{variant.split('_', 1)[1]}"
            steps[key] = mimzoo_step(m, adamw(m.param_groups(0.05)), lambda: (x,), device, precision)
            precisions[key] = precision
    return dict(steps=steps, check={}, batch=batch, precisions=precisions, mask=repr(sg.informed_strategy))


# --- timing -------------------------------------------------------------------------------------------------
def alternate(steps: dict, rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds per step of each variant, ``rounds`` rounds of one step each, the order rotated every round."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(num: list[float], den: list[float]) -> dict:
    """Median of per-round ratios ``num / den``, with the lower and upper quartiles."""
    r = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0], r[0], r[0]]
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}


def flops_of(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def peak_flops(device: str, precision: str) -> float | None:
    if device != "cuda":
        return None
    return dense_peak_flops(torch.cuda.get_device_name(), precision)


def device_stats(case: dict, ms: dict, device: str) -> dict:
    """img/s and model FLOP utilisation of each variant: FLOPs per implementation counted on its fp32 step (the
    work it does, whatever the precision), over the median step time and the device's dense peak for the
    variant's precision (None: a device not in PEAK_TFLOPS)."""
    flops = {impl: flops_of(case["steps"][f"{impl}_fp32"]) for impl in {n.rsplit("_", 1)[0] for n in case["steps"]}}
    mfu = {}
    for name in case["steps"]:
        peak = peak_flops(device, case["precisions"][name])
        mfu[name] = None if peak is None else flops[name.rsplit("_", 1)[0]] / (ms[name] / 1e3) / peak
    return {
        "img_per_s": {n: case["batch"] / (t / 1e3) for n, t in ms.items()},
        "mfu": mfu,
        "gflops_per_step": {impl: f / 1e9 for impl, f in flops.items()},
    }


def run_method(method: str, size: dict, device: str, checkouts: dict, rounds: int, warmup: int) -> dict:
    if method == "sgmae":
        case = sgmae(size["mae"], device)
    elif method == "ibot":
        case = ibot(size["ibot"], device, checkouts.get("ibot"))
    else:
        case = mae_like(method, size[method], device, checkouts.get(method))
    times = alternate(case["steps"], rounds, warmup, device)
    result = {
        "batch": case["batch"],
        "mask": case["mask"],
        "precisions": case["precisions"],
        "check": case["check"],
        "official": ("checkout " + official.SOURCES[method])
        if checkouts.get(method)
        else (f"tests/reference_{method}.py" if method != "sgmae" else None),
        "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
    }
    if method == "sgmae":
        result["overhead"] = {p: ratio(times[f"sgmae_{p}"], times[f"mae_{p}"]) for p in ("fp32", "default")}
    else:
        result["speedup"] = {
            "same_precision": ratio(times["official_fp32"], times["mimzoo_fp32"]),
            "default": ratio(times["official_fp32"], times["mimzoo_default"]),
            "official_bf16": ratio(times["official_fp32"], times["official_bf16"]),
            "default_vs_official_bf16": ratio(times["official_bf16"], times["mimzoo_default"]),
        }
    if device == "cuda":
        result.update(device_stats(case, result["ms"], device))
    return result


# --- report -------------------------------------------------------------------------------------------------
def _r(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})"


def markdown(report: dict) -> str:
    meta, res = report["meta"], report["results"]
    lines = [
        f"Device: {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads; size `{meta['size']}`, "
        f"{meta['rounds']} rounds; mimzoo default precision: {meta['default_precision']}.",
        "",
        "| method | official | batch | official fp32 | official bf16 | mimzoo fp32 | mimzoo default | "
        "speed-up, same precision | speed-up, default | official bf16 / fp32 | default vs official bf16 | "
        "loss rel. diff fp32 / default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in res.items():
        if method == "sgmae":
            continue
        ms, s, c = r["ms"], r["speedup"], r["check"]
        lines.append(
            f"| {method} | {r['official']} | {r['batch']} | "
            + " | ".join(f"{ms[v]:.0f} ms" for v in VARIANTS)
            + f" | {_r(s['same_precision'])} | {_r(s['default'])} | {_r(s['official_bf16'])} | "
            f"{_r(s['default_vs_official_bf16'])} | {c['rel_diff_fp32']:.1e} / {c['rel_diff_default']:.1e} |"
        )
    if "sgmae" in res:
        o = res["sgmae"]["overhead"]
        lines += ["", f"SG-MAE (informed masks) step / MAE step: fp32 {_r(o['fp32'])}, default {_r(o['default'])}."]
    if meta["device"] == "cuda":
        lines += ["", "| method | variant | img/s | model FLOP utilisation |", "|---|---|---|---|"]
        for method, r in res.items():
            for name, ips in r["img_per_s"].items():
                mfu = r["mfu"][name]
                lines.append(f"| {method} | {name} | {ips:.0f} | {'unknown device' if mfu is None else f'{mfu:.1%}'} |")
    lines += ["", "Speed-up: median over rounds of official fp32 step time / mimzoo step time (quartiles in brackets)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), help="model sizes (default: gpu on a GPU, else cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6 on CPU, 30 on GPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    for method, source in official.SOURCES.items():
        p.add_argument(
            f"--official-{method}",
            metavar="PATH",
            help=f"a checkout of {source} to time (default: "
            f"tests/reference_{method}.py, the re-statement of its forward)",
        )
    p.add_argument("--json", help="write the results here (e.g. bench.json)")
    p.add_argument("--markdown", help="write the table here (e.g. bench.md)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no GPU; drop --device to run on the CPU")
    size = args.size or ("gpu" if device == "cuda" else "cpu")
    rounds = args.rounds or (30 if device == "cuda" else 6)
    checkouts = {m: getattr(args, f"official_{m}") for m in official.SOURCES if getattr(args, f"official_{m}")}
    meta = dict(
        device=device,
        size=size,
        rounds=rounds,
        warmup=args.warmup,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        default_precision=default_precision(device),
        device_name=torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        command="python benchmarks/side_by_side.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    report = {"meta": meta, "results": {}}
    for method in args.methods:
        start = time.perf_counter()
        report["results"][method] = r = run_method(method, SIZES[size], device, checkouts, rounds, args.warmup)
        summary = (
            f"overhead {_r(r['overhead']['default'])}"
            if method == "sgmae"
            else f"same precision {_r(r['speedup']['same_precision'])}, default {_r(r['speedup']['default'])}"
        )
        print(f"{method}: {summary} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    table = markdown(report)
    print(table)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=2).encode()))
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write(table.encode()))
    return report


if __name__ == "__main__":
    with user_errors("side_by_side"):
        main()
